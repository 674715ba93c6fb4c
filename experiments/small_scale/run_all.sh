#!/usr/bin/env bash
# The whole small-scale study, in order (each step resumes if interrupted; a finished step is a no-op).
# Usage (from the repository root): bash experiments/small_scale/run_all.sh [python]
set -euo pipefail
PY=${1:-python}
D=experiments/small_scale
test -f $D/data/train.npy || $PY $D/prepare_data.py
$PY -m jaxdlm.training.run $D/configs/ar_pretrain.toml --no-progress
for v in block_uniform block_position bidir_uniform bidir_position; do
  $PY -m jaxdlm.training.run $D/configs/convert_$v.toml --no-progress
done
$PY -m jaxdlm.training.run $D/configs/lora_draft.toml --no-progress
$PY $D/summarize.py
R=$D/runs
$PY $D/eval_draft.py $R/ar_pretrain $R/convert_block_uniform $R/convert_block_position \
  $R/convert_bidir_uniform $R/convert_bidir_position $R/lora_draft
$PY $D/eval_decode.py $R/ar_pretrain $R/convert_block_uniform $R/convert_block_position \
  $R/convert_bidir_uniform $R/convert_bidir_position $R/lora_draft --thresholds 0.1 0.3 0.5 0.7 0.9 0.99
