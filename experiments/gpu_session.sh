#!/usr/bin/env bash
# Every GPU check the open issues need, cut into parts that each fit one 10-minute device call.
# Run from the repository root on the GPU machine (its python3 has jax 0.11.2 with CUDA, flax, optax, orbax,
# transformers and torch; jaxdlm is used from the checkout, not installed):
#
#   bash experiments/gpu_session.sh PART OUTDIR      # PART = check | gen4_16 | attention
#
# check     - device facts, the Pallas kernels' tests compiled for the GPU (issue 5), the sharding
#             overhead benchmark (issue 7), the 8B-shaped generate benchmark at batch 1 (issue 4)
# gen4_16   - the generate benchmark at batch 4 and 16 (issue 4)
# attention - the attention-kernel benchmark, training and decode shapes (issue 5 notes)
#
# Each step is bounded by `timeout` so a slow one cannot take the rest with it; logs and result JSONs go
# to OUTDIR (the device tool's $OUT), to be copied into experiments/results/ and committed.
set -uo pipefail
PART=${1:?PART: check | gen4_16 | attention}
OUT=${2:?OUTDIR}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PY:-python3}
step() {  # step SECONDS NAME COMMAND...: run with a time limit, log to OUT/NAME.log, report the exit status
  local lim=$1 name=$2; shift 2
  echo "== $name (limit ${lim}s): $*"
  timeout "$lim" "$@" > "$OUT/$name.log" 2>&1
  echo "== $name exit $? after ${SECONDS}s"; tail -n 15 "$OUT/$name.log"
}
case "$PART" in
  check)
    { nvidia-smi; $PY -c "import jax, flax, optax, orbax.checkpoint, transformers, torch; print(jax.__version__, jax.devices(), flax.__version__, torch.__version__)"; } > "$OUT/env.log" 2>&1
    cat "$OUT/env.log"
    step 170 pallas_tests env JAX_PLATFORMS=cuda $PY -m pytest -q -p no:cacheprovider tests/test_pallas.py
    step 130 bench_sharding $PY experiments/bench_sharding.py --preset gpu --out "$OUT/bench_sharding_gpu.json"
    step 260 bench_generate_b1 $PY experiments/bench_generate.py --preset gpu8b --batches 1 --out "$OUT/bench_generate_gpu8b_b1.json"
    ;;
  gen4_16)
    step 280 bench_generate_b4 $PY experiments/bench_generate.py --preset gpu8b --batches 4 --out "$OUT/bench_generate_gpu8b_b4.json"
    step 280 bench_generate_b16 $PY experiments/bench_generate.py --preset gpu8b --batches 16 --out "$OUT/bench_generate_gpu8b_b16.json"
    ;;
  attention)
    step 280 bench_attention_train $PY experiments/bench_attention.py --skip decode --out "$OUT/bench_attention_train.json"
    step 280 bench_attention_decode $PY experiments/bench_attention.py --skip check train --out "$OUT/bench_attention_decode.json"
    ;;
  *) echo "unknown PART=$PART (check | gen4_16 | attention)"; exit 2 ;;
esac
