#!/usr/bin/env bash
# Round 4 of the byte-level study (needs run_round3_bytes.sh's convert_long first): self-distillation of the
# converted model on its own greedy AR text (full parameters, joint loss), the draft LoRA of the distilled
# model, and the evaluations quoted in experiments/results/small_scale_bytes.md ("Round 4").
# About 60 min on a 2-core CPU (greedy data 5 + 3 min, distillation 28 min, LoRA 10 min, evals 10 min).
# Usage (from the repository root): bash experiments/small_scale/run_round4_bytes.sh [python]
set -euo pipefail
PY=${1:-python}
D=experiments/small_scale
R=$D/runs_bytes
O=experiments/results
# 1. distillation data: 3072 train-split prompts of 128 bytes + 128 greedy AR bytes of convert_long
test -f $R/greedy_distill.npy || $PY $D/gen_greedy.py $R/convert_long $R/greedy_distill.npy \
  --rows 3072 --prompt-len 128 --new 128 --batch 128 --seed 5
# 2. self-distillation: 200 steps x 32 x 256 = 1.6 M bytes (about 2 epochs), joint loss alpha 1.0, position masking
$PY -m jaxdlm.training.run $D/configs_bytes/distill_diffusion.toml --no-progress
# 3. the draft LoRA of the distilled model (same recipe as rounds 2 and 3)
test -f $R/greedy_train_distill.npy || $PY $D/gen_greedy.py $R/distill_diffusion $R/greedy_train_distill.npy \
  --rows 512 --prompt-len 128 --new 384 --seed 0
$PY -m jaxdlm.training.run $D/configs_bytes/lora_draft_distill.toml --no-progress
# 4. teacher-forced draft quality and AR loss of the three bases, on the same held-out windows
$PY $D/eval_draft.py $R/convert_block_uniform $R/convert_long $R/distill_diffusion --sequences 64 --seq-len 256 \
  --eval $D/data_bytes/eval.npy --out $O/small_scale_bytes_round4_draft.json
# 5. decoding modes on round 2's 16 held-out windows, threshold sweep (base, then with its LoRA)
$PY $D/eval_decode.py $R/distill_diffusion $R/lora_draft_distill --eval $D/data_bytes/eval.npy --prompts 16 \
  --prompt-len 128 --new 128 --thresholds 0.5 0.7 0.8 0.9 0.95 --out $O/small_scale_bytes_round4_decode.json \
  --plot $O/small_scale_bytes_round4_threshold_sweep.png
# 6. the 16 package prompts: diffusion (SPEC rule) and linear spec, shipped model vs the distilled one
#    (the two JSON lines are collected in $O/small_scale_bytes_round4_package.json)
for run in "" "--run $R/lora_draft_distill"; do $PY $D/trace_diffusion.py $run --measure; done
