#!/usr/bin/env bash
# Every GPU check the open issues need, cut into parts that each fit one 10-minute device call.
# Run from the repository root on the GPU machine (its python3 has jax 0.11.2 with CUDA, flax, optax, orbax,
# transformers and torch; jaxdlm is used from the checkout, not installed):
#
#   bash experiments/gpu_session.sh PART OUTDIR      # PART = bandwidth | check | gen4_16 | attention | quant
#                                                    #        | train_default | serve | train
#
# bandwidth - decode at the memory-bandwidth limit (issue 13), under 8 minutes in all: the in-place stacked-cache
#             kernels' tests compiled for the GPU; decode attention per layer (timed over many layers in one
#             program) with a split-count sweep, Pallas against XLA; the PyTorch peer; the 8B-shaped generate
#             benchmark: HBM read floor (best of 12 reads of 4 GiB), t1 / t32 at contexts 128 / 8192 / 32768 and
#             batches 1 / 4 / 16, the quadratic forward, the scanned loop's t1, compile seconds and tokens/s per
#             mode at batch 1, the NLD-8B projection. --tiny as a third argument runs it all on tiny shapes.
# check     - device facts, the Pallas kernels' tests compiled for the GPU (issue 5), the sharding
#             overhead benchmark (issue 7), the 8B-shaped generate benchmark at batch 1 (issue 4)
# gen4_16   - the generate benchmark at batch 4 and 16 (issue 4)
# attention - the attention-kernel benchmark, training and decode shapes (issue 5 notes)
# quant     - weight-only quantization (issue 14), under 9 minutes: the 8B-shaped generate benchmark at batch 1 in
#             bf16, int8, int4 and int4 with the grouped matmul form (JAXDLM_INT4_MATMUL=grouped), one process
#             each: HBM floor of each run's own weight bytes, t1 / t32 at context 128, AR and linear_spec tokens/s;
#             then quant_compare.md, the side-by-side table. --tiny as a third argument runs it on tiny shapes.
# train_default - the GPU-trained default model (issue 16 part 2, experiments/gpu_default/README.md), about 9
#             minutes in all: corpus of the installed packages (held-out packages apart), AR pretraining, conversion
#             (joint loss), self-distillation, draft LoRA, the bar on held-out code against today's default, and
#             the checkpoint (bf16, params + LoRA + tokenizer) packed as OUTDIR/model.tar.partK-of-N (<= 5 files of
#             15 MiB) next to eval.json, steps.log, env.log. Work files go to $GD_WORK (default /tmp/jaxdlm_gd).
#             GD_CORPUS (build_corpus.py options) and GD_SET (render_configs.py --set items) rescale it.
#             --tiny as a third argument runs it all on tiny sizes (CPU dry-run, ~2 minutes on 2 cores).
# serve     - the serving engine (issue 24), under 9 minutes: experiments/bench_serve.py on the 8B-shaped random bf16
#             model, linear_spec with 64 slots: offered load at concurrency 1 / 4 / 16 / 64 and an offline run of
#             128 mixed-length prompts against static batches and sequential generate. --tiny as a third argument
#             runs it on a tiny model (--smoke sizes).
# train     - the training step (issue 22), under 8 minutes: experiments/bench_train.py on one GPU at L = 4096
#             ([x_t | x_0]: 8192 tokens per step), batch 1, bf16 compute, remat per layer: tokens/s per GPU, MFU and
#             the memory plan (from the one compiled step) of the 3B-shaped full fine-tune and of the 3B adapter
#             fine-tune (bf16 base), each with Pallas and with XLA attention inside the step, then the 8B adapter
#             fine-tune on an int8 base (memory plan, peak memory in use, whether it fits one 80 GB H100), each case
#             in its own process with its own limit (90 + 70 + 70 + 65 + 85 s after 30 s for the versions: 420 s,
#             bench_train.BUDGET_S; the step gets 30 s more). A case whose plan does not fit the GPU is recorded
#             and not run; an OOM or a timeout is recorded and the next case runs; the JSON is rewritten after
#             each case. JAX may take 95% of the GPU's memory (XLA_PYTHON_CLIENT_MEM_FRACTION). --tiny as a third
#             argument runs it on a tiny model.
#
# Each step is bounded by `timeout` so a slow one cannot take the rest with it. env.log, steps.log and the
# result files go to OUTDIR (the device tool's $OUT; at most 8 files per part), to be copied into
# experiments/results/ and committed.
set -uo pipefail
PART=${1:?PART: bandwidth | check | gen4_16 | attention | quant | train_default | serve | train}
OUT=${2:?OUTDIR}
TINY=${3:-}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PY:-python3}
step() {  # step SECONDS NAME COMMAND...: run with a time limit, append its output to OUT/steps.log (one log:
          # the device tool brings back at most 8 files), report the exit status
  local lim=$1 name=$2 log rc; shift 2
  log=$(mktemp)
  echo "== $name (limit ${lim}s): $*"
  timeout "$lim" "$@" > "$log" 2>&1
  rc=$?
  { echo "== $name (limit ${lim}s) exit $rc after ${SECONDS}s: $*"; cat "$log"; } >> "$OUT/steps.log"
  echo "== $name exit $rc after ${SECONDS}s"; tail -n 15 "$log"; rm -f "$log"
}
case "$PART" in
  bandwidth)
    { nvidia-smi; $PY -c "import jax, flax, torch; print(jax.__version__, jax.devices(), flax.__version__, torch.__version__)"; } > "$OUT/env.log" 2>&1
    cat "$OUT/env.log"
    if [ -n "$TINY" ]; then
      GEN=(--preset gpu8b --tiny --batches 1 2 --contexts 128 512 --mode-batches 1 --repeats 1)
      ATT=(--smoke --skip check train)
    else
      GEN=(--preset gpu8b --batches 1 4 16 --contexts 128 8192 32768 --mode-batches 1 --repeats 2)
      ATT=(--skip check train --caches 8192 32768 --decode-queries 1 32 --decode-batches 1 8 --split-sweep 8 16 32 --trials 3)
    fi
    step 60 pallas_tests env JAX_PLATFORMS=${JAX_PLATFORMS:-cuda} $PY -m pytest -q -p no:cacheprovider tests/test_pallas.py -k "stacked or decode or cached"
    step 100 bench_attention_decode $PY experiments/bench_attention.py "${ATT[@]}" --out "$OUT/bench_attention_decode.json"
    step 70 torch_peer sh -c "$PY experiments/bench_generate.py --torch-peer-only ${GEN[*]} | sed -n 's/^PEER_JSON //p' > '$OUT/torch_peer.json'"
    step 300 bench_generate $PY experiments/bench_generate.py "${GEN[@]}" --compare-loops --peer-json "$OUT/torch_peer.json" --out "$OUT/bench_generate_gpu8b.json"
    ;;
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
  quant)
    { nvidia-smi; $PY -c "import jax, flax; print(jax.__version__, jax.devices(), flax.__version__)"; } > "$OUT/env.log" 2>&1
    cat "$OUT/env.log"
    QGEN=(--preset gpu8b --batches 1 --contexts 128 --mode-batches 1 --modes ar linear_spec --max-new 128 --repeats 2 --no-peer)
    if [ -n "$TINY" ]; then QGEN+=(--tiny); fi
    step 130 quant_bf16 $PY experiments/bench_generate.py "${QGEN[@]}" --out "$OUT/bench_generate_quant_bf16.json"
    step 130 quant_int8 $PY experiments/bench_generate.py "${QGEN[@]}" --quantize int8 --out "$OUT/bench_generate_quant_int8.json"
    step 130 quant_int4 $PY experiments/bench_generate.py "${QGEN[@]}" --quantize int4 --out "$OUT/bench_generate_quant_int4.json"
    step 110 quant_int4_grouped env JAXDLM_INT4_MATMUL=grouped $PY experiments/bench_generate.py "${QGEN[@]}" --quantize int4 --out "$OUT/bench_generate_quant_int4_grouped.json"
    step 20 quant_compare sh -c "$PY experiments/bench_generate.py --compare $(printf "$OUT/bench_generate_quant_%s.json " bf16 int8 int4 int4_grouped) --out $OUT/quant_compare.md"
    ;;
  train_default)
    { nvidia-smi; $PY -c "import jax, flax, optax, orbax.checkpoint, tokenizers, transformers; print(jax.__version__, jax.devices(), flax.__version__)"; } > "$OUT/env.log" 2>&1
    cat "$OUT/env.log"
    G=experiments/gpu_default W=${GD_WORK:-/tmp/jaxdlm_gd}
    rm -rf "$W"; mkdir -p "$W"
    # limits (s) of corpus, ar, convert, greedy, distill, greedy, lora, eval, checkpoint; all steps: 540 s
    L=(60 170 70 30 50 25 40 40 30)
    CORPUS=(--stdlib ${GD_CORPUS:-})
    DISTILL=(--rows 6144 --prompt-len 128 --new 128 --batch 512)
    LORA=(--rows 1024 --prompt-len 128 --new 384 --batch 256)
    RENDER=(--work "$W" --out-dir "$W/cfg")
    EVAL=(--quick)
    for s in ${GD_SET:-}; do RENDER+=(--set "$s"); done
    if [ -n "$TINY" ]; then
      L=(120 120 60 60 60 60 60 150 60)
      CORPUS=(--max-bytes 2000000 --max-eval-bytes 400000 --layers 2 --hidden 64 --heads 2 --head-dim 32 --kv-heads 1
              --intermediate 128 ${GD_CORPUS:-})
      DISTILL=(--rows 16 --prompt-len 64 --new 64 --batch 16)
      LORA=(--rows 16 --prompt-len 64 --new 64 --batch 16)
      RENDER+=(--tiny)
      EVAL=(--quick --new 32)
    fi
    step ${L[0]} corpus $PY $G/build_corpus.py --out "$W/data" "${CORPUS[@]}"
    step 10 configs $PY $G/render_configs.py "${RENDER[@]}"
    step ${L[1]} ar_pretrain $PY -m jaxdlm.training.run "$W/cfg/ar_pretrain.toml" --no-progress
    step ${L[2]} convert $PY -m jaxdlm.training.run "$W/cfg/convert.toml" --no-progress
    step ${L[3]} greedy_distill $PY experiments/small_scale/gen_greedy.py "$W/runs/convert" "$W/greedy_distill.npy" \
      --train "$W/data/train.npy" --seed 5 "${DISTILL[@]}"
    step ${L[4]} distill $PY -m jaxdlm.training.run "$W/cfg/distill.toml" --no-progress
    step ${L[5]} greedy_lora $PY experiments/small_scale/gen_greedy.py "$W/runs/distill" "$W/greedy_lora.npy" \
      --train "$W/data/train.npy" --seed 0 "${LORA[@]}"
    step ${L[6]} lora_draft $PY -m jaxdlm.training.run "$W/cfg/lora_draft.toml" --no-progress
    step ${L[8]} checkpoint $PY $G/pack.py checkpoint "$W/runs/lora_draft" "$W/ckpt" --data "$W/data" --dtype bfloat16
    step 15 pack $PY $G/pack.py pack "$W/ckpt" "$OUT/model"
    step ${L[7]} eval $PY experiments/small_scale/eval_heldout.py "$W/ckpt" default --prompts-json "$W/data/heldout_prompts.json" \
      "${EVAL[@]}" --out "$OUT/eval.json"
    ;;
  serve)
    { nvidia-smi; $PY -c "import jax, flax, fastapi, uvicorn; print(jax.__version__, jax.devices(), flax.__version__)"; } > "$OUT/env.log" 2>&1
    cat "$OUT/env.log"
    SERVE=(--preset gpu8b --mode linear_spec --slots 64 --offline 128 --requests-per-client 2)
    if [ -n "$TINY" ]; then SERVE=(--preset gpu8b --tiny --mode linear_spec --smoke); fi
    step 520 bench_serve $PY experiments/bench_serve.py "${SERVE[@]}" --out "$OUT/bench_serve_gpu8b.json"
    ;;
  train)
    # at most 25 + 440 s: the step's limit is bench_train.BUDGET_S (the case limits and the versions' 420 s) + 30 s
    timeout 25 sh -c "nvidia-smi; $PY -c 'import jax, flax, optax; print(jax.__version__, jax.devices(), flax.__version__)'" > "$OUT/env.log" 2>&1
    cat "$OUT/env.log"
    TRAIN=(--preset 3b --seq-len 4096 --batch 1 --steps 5)
    if [ -n "$TINY" ]; then TRAIN=(--tiny --case-timeout 75); fi
    step 440 bench_train env XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95} \
      $PY experiments/bench_train.py "${TRAIN[@]}" --out "$OUT/bench_train_3b.json"
    ;;
  *) echo "unknown PART=$PART (bandwidth | check | gen4_16 | attention | quant | train_default | serve | train)"; exit 2 ;;
esac
