#!/usr/bin/env bash
# The byte-level study (second round) that produced the embedded default model, in order (each training
# step resumes if interrupted; a finished step is a no-op).  About 75 min of training on a 2-core CPU (AR 40 min, conversion 27, LoRA ~10).
# Usage (from the repository root): bash experiments/small_scale/run_all_bytes.sh [python]
set -euo pipefail
PY=${1:-python}
D=experiments/small_scale
R=$D/runs_bytes
# 0. byte-level tokenizer (256 byte symbols + 4 specials, no merges), block 32, 4 layers x 256 (3.3 M params)
test -f $D/data_bytes/train.npy || $PY $D/prepare_data.py --out $D/data_bytes --vocab 260 --block-size 32 --layers 4
# 1. AR pretraining: 640 steps x 16 x 512 bytes = 5.2 M tokens
$PY -m jaxdlm.training.run $D/configs_bytes/ar_pretrain.toml --no-progress
# 2. conversion (block-causal, uniform masking): 120 steps x 16 x 512 = 0.98 M tokens (13.6 s per step here)
$PY -m jaxdlm.training.run $D/configs_bytes/convert_block_uniform.toml --no-progress
# 3. self-distillation data (the converted model's greedy AR continuations of 512 training prompts)
test -f $R/greedy_train.npy || $PY $D/gen_greedy.py $R/convert_block_uniform $R/greedy_train.npy \
  --rows 512 --prompt-len 128 --new 384 --seed 0
# 4. draft LoRA (rank 32, hard target) on that data: 100 steps x 16 x 512
$PY -m jaxdlm.training.run $D/configs_bytes/lora_draft.toml --no-progress
# 5. decoding modes on held-out prompts, threshold sweep, plot
$PY $D/eval_decode.py $R/lora_draft --eval $D/data_bytes/eval.npy --prompts 16 --prompt-len 128 --new 128 \
  --thresholds 0.5 0.7 0.8 0.9 0.95 --out experiments/results/small_scale_bytes_decode.json \
  --plot experiments/results/small_scale_bytes_threshold_sweep.png
# 6. pack the result as the embedded default model (jaxdlm/default_model/)
$PY $D/export_default.py $R/lora_draft --threshold 0.9 --decode-json experiments/results/small_scale_bytes_decode.json
