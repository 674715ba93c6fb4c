#!/usr/bin/env bash
# Round 3 of the byte-level study (needs run_all_bytes.sh's runs first): a five times longer conversion
# with position-dependent masking, its self-distilled draft LoRA, and the evaluations quoted in
# experiments/results/small_scale_bytes.md ("Round 3").  About 105 min on a 2-core CPU (conversion 79 min).
# Usage (from the repository root): bash experiments/small_scale/run_round3_bytes.sh [python]
set -euo pipefail
PY=${1:-python}
D=experiments/small_scale
R=$D/runs_bytes
O=experiments/results
# 1. conversion, continued from convert_block_uniform: 560 steps x 32 x 256 = 4.6 M bytes, position masking
$PY -m jaxdlm.training.run $D/configs_bytes/convert_long.toml --no-progress
# 2. teacher-forced draft quality of both bases
$PY $D/eval_draft.py $R/convert_block_uniform $R/convert_long --sequences 64 --seq-len 256 \
  --eval $D/data_bytes/eval.npy --out $O/small_scale_bytes_round3_draft.json
# 3. decoding modes on round 2's 16 held-out windows, threshold sweep
$PY $D/eval_decode.py $R/convert_long --eval $D/data_bytes/eval.npy --prompts 16 --prompt-len 128 --new 128 \
  --thresholds 0.5 0.7 0.8 0.9 0.95 --out $O/small_scale_bytes_round3_decode.json \
  --plot $O/small_scale_bytes_round3_threshold_sweep.png
# 4. self-distilled draft LoRA on the new base (same recipe as round 2) and its decoding
test -f $R/greedy_train_long.npy || $PY $D/gen_greedy.py $R/convert_long $R/greedy_train_long.npy \
  --rows 512 --prompt-len 128 --new 384 --seed 0
$PY -m jaxdlm.training.run $D/configs_bytes/lora_draft_long.toml --no-progress
$PY $D/eval_decode.py $R/lora_draft_long --eval $D/data_bytes/eval.npy --prompts 16 --prompt-len 128 --new 128 \
  --thresholds 0.9 --out $O/small_scale_bytes_round3_lora_decode.json --plot ""
# 5. how diffusion collapses: a step-by-step trace, and diffusion with the two fallback rules on the
#    package's 16 held-out prompts (the embedded default = round 2, then round 3)
$PY $D/trace_diffusion.py --prompt-index 6 --blocks 2
for run in "" "--run $R/convert_long"; do
  for rule in spec leftmost; do $PY $D/trace_diffusion.py $run --measure --rule $rule; done
done
