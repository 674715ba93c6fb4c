"""Generation benchmark: per mode tokens/s, nfe, TPF and compile seconds; per-forward latency t1 (1 token) and
t32 (a 32-token block) over a KV cache at several contexts and batches; on a GPU, t1 against the HBM floor, an
AR peer (transformers PyTorch Ministral-3 greedy generate on the same device) and a projection of NLD-8B's
tokens/s from its published tokens per forward.

    python experiments/bench_generate.py                    # small random model, any device (CPU: ratios only)
    python experiments/bench_generate.py --preset gpu8b     # 8B-shaped random bf16 model, the whole table
    python experiments/bench_generate.py --preset gpu8b --tiny   # the same code path on a tiny model (dry run)
    python experiments/bench_generate.py --preset gpu8b --quantize int4   # weight-only int4 (jaxdlm.quant)
    python experiments/bench_generate.py --compare A.json B.json ...     # a side-by-side table of earlier runs

The HBM floor of a forward is (weight bytes except the embedding table, of which a forward gathers a few rows,
+ the K/V bytes it reads) / the best of 12 timed reads of a 4 GiB buffer.  With ``--quantize`` the weight bytes
are the quantized ones (int4 at half a byte, :func:`jaxdlm.quant.weight_bytes`, plus the scales), and the random
model is drawn directly in its quantized form on the device (:func:`init_model`; the values do not change the
timings).  ``JAXDLM_INT4_MATMUL`` picks the int4 matmul form (:func:`jaxdlm.quant.int4_form`).  The results JSON is rewritten after
every phase, so a run cut short by a time limit keeps what it measured.

Weights are random, so the self-speculative TPF here says nothing about a trained model (drafts are
almost never accepted); tokens/s, nfe per step and the latencies are what this measures.  Results go
to ``experiments/results/bench_generate_<preset>_<backend>.json`` (device, versions, date, figures).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))

MODES = ("ar", "diffusion", "linear_spec", "quadratic_spec")


def model_config(preset: str, tiny: bool):
    from jaxdlm.config import ModelConfig
    from jaxdlm.testing import NLD_ROPE

    common = dict(model_type="nemotron_labs_diffusion", mask_token_id=100, eos_token_ids=(11,), bos_token_id=1,
                  block_size=32, rope=NLD_ROPE, max_position_embeddings=262144)
    if preset == "gpu8b" and not tiny:  # NLD-8B shape (docs/model.md)
        return ModelConfig(vocab_size=131072, hidden_size=4096, intermediate_size=14336, num_layers=34,
                           num_heads=32, num_kv_heads=8, head_dim=128, **common)
    if preset == "gpu8b":  # tiny dry run of the GPU code path
        return ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                           num_kv_heads=2, head_dim=16, **common)
    return ModelConfig(vocab_size=4096, hidden_size=256, intermediate_size=768, num_layers=4, num_heads=8,
                       num_kv_heads=2, head_dim=32, **common)


def init_model(cfg, dtype, quantize=None, seed: int = 0):
    """A random model, drawn on the default device: float (``Model.init``), or with ``quantize`` each quantized
    weight drawn as random storage values in +-qmax with scales of about 0.02 / qmax (float leaves as
    ``Model.init``'s).  Quantizing an 8B float model on the host instead (``Model.init(quantize=)``) would take
    minutes of a device session; the values do not change the timings."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxdlm import Model
    from jaxdlm.quant import SCALE_SUFFIX, as_quantization

    quant = as_quantization(quantize)
    if quant is None:
        return Model.init(cfg, seed=seed, dtype=dtype)
    target = Model.abstract(cfg, dtype=dtype, quantize=quant)
    flat = nnx.to_flat_state(target.params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(flat))

    @functools.partial(jax.jit, static_argnums=(1, 2, 3))
    def draw(key, shape, dtype, kind):
        if kind == "weight":
            return jnp.clip(jnp.round(jax.random.normal(key, shape) * quant.qmax / 3), -quant.qmax,
                            quant.qmax).astype(dtype)
        if kind == "scale":
            return jnp.full(shape, 0.02 * 3 / quant.qmax, dtype)
        if kind == "norm":
            return jnp.ones(shape, dtype)
        return (jax.random.normal(key, shape) * 0.02).astype(dtype)

    pure = {}
    for key, (path, var) in zip(keys, flat):
        name = str(path[-1]) if str(path[-1]) != "weight" else "norm"
        kind = ("scale" if name.endswith(SCALE_SUFFIX) else "weight" if var.dtype == quant.storage_dtype else
                "norm" if name == "norm" else "normal")
        node = pure
        for k in path[:-1]:
            node = node.setdefault(str(k), {})
        node[str(path[-1])] = draw(key, tuple(var.shape), jnp.dtype(var.dtype), kind)
    nnx.replace_by_pure_dict(target.params, pure)
    return target


def versions() -> dict:
    import flax
    import jax

    return {"python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
            "backend": jax.default_backend(), "devices": [d.device_kind for d in jax.devices()]}


def timed(fn, repeats: int):
    """Median wall time of ``fn()`` (which must block until done) after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def forward_latency(model, batch: int, width: int, context: int, repeats: int, layers: str = "unrolled") -> float:
    """Seconds per causal forward of ``width`` new tokens per row over a cache holding ``context`` tokens."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxdlm import KVCache, forward

    cfg = model.config

    @jax.jit
    def step(params, tokens, cache):
        out, new = forward(nnx.merge(model.graphdef, params), tokens, kind="causal", cache=cache, layers=layers)
        return out[:, -1].argmax(-1), new.length

    slots = -(-(context + width + 64) // 64) * 64
    cache = KVCache.init(cfg, batch, slots, model.dtype).with_length(jnp.full((batch,), context, jnp.int32))
    tokens = jnp.ones((batch, width), jnp.int32)
    return timed(lambda: jax.block_until_ready(step(model.params, tokens, cache)), repeats)


def kv_bytes(cfg, batch: int, context: int, itemsize: int) -> int:
    """Bytes of K and V a forward reads over ``context`` cached tokens (all layers, all rows)."""
    return 2 * cfg.num_layers * batch * context * cfg.num_kv_heads * cfg.head_dim * itemsize


def copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Measured device copy bandwidth in bytes/s (read + write of an ``nbytes`` buffer)."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((nbytes // 2,), jnp.bfloat16)
    f = jax.jit(lambda a: a + jnp.bfloat16(1))
    t = timed(lambda: f(x).block_until_ready(), repeats)
    return 2 * nbytes / t


def read_bandwidth(nbytes: int = 4 << 30, trials: int = 12) -> dict:
    """HBM read bandwidth: the best of ``trials`` timed reductions of an ``nbytes`` bf16 buffer (a read-only
    stream, as a batch-1 forward's weight reads), each call timed alone.  Best, not median: the floor is what the
    memory can do."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((nbytes // 2,), jnp.bfloat16)
    f = jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32))
    f(x).block_until_ready()
    times = []
    for _ in range(trials):
        t0 = time.perf_counter()
        f(x).block_until_ready()
        times.append(time.perf_counter() - t0)
    return dict(bytes=nbytes, trials=trials, best_s=min(times), median_s=float(np.median(times)),
                bytes_per_s=nbytes / min(times), median_bytes_per_s=nbytes / float(np.median(times)))


def quadratic_forward_latency(model, batch: int, block: int, context: int, repeats: int) -> float:
    """Seconds per quadratic self-speculation forward (``B + B*B`` tokens over a cache of ``context`` tokens)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxdlm import KVCache, forward

    n = block + block * block
    slots = -(-(context + n + 64) // 64) * 64

    @jax.jit
    def step(params, tokens, cache):
        hidden, new = forward(nnx.merge(model.graphdef, params), tokens, kind="quadratic", cache=cache,
                              return_hidden=True)
        return hidden[:, :block].sum(), new.length

    cache = KVCache.init(model.config, batch, slots, model.dtype).with_length(jnp.full((batch,), context, jnp.int32))
    tokens = jnp.ones((batch, n), jnp.int32)
    return timed(lambda: jax.block_until_ready(step(model.params, tokens, cache)), repeats)


# published tokens per forward of NLD-8B instruct (10-task average) and the pass each mode's forwards run
PUBLISHED_TPF = {"ar": (1.0, "t1"), "diffusion": (2.57, "t32"), "linear_spec": (5.99, "t32"),
                 "quadratic_spec": (6.38, "t_quadratic")}


def projection(latency: dict) -> dict:
    """Projected NLD-8B tokens/s at batch 1: the published TPF / the measured time of the forward it runs
    (linear self-speculation's TPF counts its draft and verify passes, both 32-token forwards)."""
    out = {}
    for mode, (tpf, key) in PUBLISHED_TPF.items():
        if latency.get(key):
            out[mode] = dict(published_tpf=tpf, forward=key, forward_s=latency[key], tokens_per_s=tpf / latency[key])
    return out


def bench_modes(model, batch: int, prompt_len: int, max_new: int, block: int, repeats: int,
                quadratic_block: int | None = None, max_quadratic_tokens: int = 1 << 30, modes=MODES) -> dict:
    """Per mode: tokens/s, nfe, TPF, seconds per forward, and the first call's compile seconds (first call minus
    a timed run)."""
    import jaxdlm

    rng = np.random.default_rng(0)
    cfg = model.config
    prompts = [rng.integers(200, cfg.vocab_size, size=prompt_len) for _ in range(batch)]
    out = {}
    for mode in modes:
        b = quadratic_block if mode == "quadratic_spec" and quadratic_block else block
        if mode == "quadratic_spec" and batch * b * (b + 1) > max_quadratic_tokens:
            out[mode] = dict(skipped=f"batch {batch} x B(B+1) = {batch * b * (b + 1)} tokens per forward > "
                                     f"--max-quadratic-tokens {max_quadratic_tokens}")
            print(f"  batch {batch} {mode:>15}: skipped ({out[mode]['skipped']})", flush=True)
            continue
        kw = dict(mode=mode, max_new_tokens=max_new, block_length=b, threshold=0.9, eos_token_id=())
        t0 = time.perf_counter()
        res = jaxdlm.generate(model, prompts, **kw)  # compile + run
        first = time.perf_counter() - t0
        seconds = timed(lambda: jaxdlm.generate(model, prompts, **kw), repeats)
        tokens = int(res.lengths.sum())
        out[mode] = dict(block_length=b, tokens=tokens, nfe_per_row=float(res.nfe.mean()), total_nfe=res.total_nfe,
                         tpf=float(res.lengths.sum() / res.nfe.sum()), seconds=seconds,
                         tokens_per_s=tokens / seconds, seconds_per_forward=seconds / res.total_nfe,
                         compile_s=first - seconds)
        print(f"  batch {batch} {mode:>15}: {tokens / seconds:9.1f} tok/s  nfe/row {res.nfe.mean():.1f}  "
              f"TPF {out[mode]['tpf']:.2f}  {1e3 * seconds / res.total_nfe:.2f} ms/forward  "
              f"compile {first - seconds:.1f} s", flush=True)
    return out


def torch_peer(args) -> dict:
    """transformers PyTorch Ministral-3 (same shape, random bf16 weights) greedy generate, tokens/s."""
    import torch
    import transformers

    cfg = model_config(args.preset, args.tiny)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf_cfg = transformers.Ministral3Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=262144, tie_word_embeddings=False,
        rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 16.0, "original_max_position_embeddings": 16384,
                         "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                         "llama_4_scaling_beta": 0.1},
        eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # build in bf16 directly (no float32 copy of 8B weights)
    with torch.device(device):
        model = transformers.Ministral3ForCausalLM(hf_cfg).eval()
    torch.set_default_dtype(torch.float32)
    out = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
           "transformers": transformers.__version__}
    for batch in args.batches:
        ids = torch.randint(200, cfg.vocab_size, (batch, args.prompt_len), device=device)

        def run():
            with torch.no_grad():
                model.generate(ids, max_new_tokens=args.max_new, min_new_tokens=args.max_new, do_sample=False,
                               attention_mask=torch.ones_like(ids))
            if device == "cuda":
                torch.cuda.synchronize()

        seconds = timed(run, args.repeats)
        out[f"batch{batch}"] = dict(seconds=seconds, tokens_per_s=batch * args.max_new / seconds)
        print(f"  torch peer batch {batch}: {batch * args.max_new / seconds:.1f} tok/s", flush=True)
    return out


def write_json(result: dict, path: str):
    """Writes the results so far (the script rewrites the file after every phase: a run cut short keeps them)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2, default=str)
    os.replace(tmp, path)


def run_peer(args) -> dict:
    """The PyTorch peer in its own process (run first, so that its GPU memory is gone before JAX starts)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--torch-peer-only", "--preset", args.preset,
           "--prompt-len", str(args.prompt_len), "--max-new", str(args.max_new), "--repeats", str(args.repeats),
           "--batches", *map(str, args.mode_batches)] + (["--tiny"] if args.tiny else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("PEER_JSON ")]
    return json.loads(lines[-1][10:]) if lines else {"error": proc.stderr[-2000:]}


def bench_latency(model, args, result, out_path):
    """t1 / t32 per batch and context (skipping shapes whose KV cache exceeds ``--max-kv-gb``), the quadratic
    forward, and the layer-loop comparison; fills ``result["latency"]`` (shortest context, the original key)
    and ``result["latency_by_context"]``."""
    import jax
    import jax.numpy as jnp

    cfg = model.config
    itemsize = jnp.dtype(model.dtype).itemsize
    shortest = min(args.contexts)
    result["latency"], result["latency_by_context"] = {}, {}
    for batch in args.batches:
        rows = result["latency_by_context"][f"batch{batch}"] = {}
        for ctx in args.contexts:
            kvb = kv_bytes(cfg, batch, ctx, itemsize)
            if kvb > args.max_kv_gb * 1e9:
                rows[f"context{ctx}"] = dict(skipped=f"KV cache {kvb / 1e9:.1f} GB > --max-kv-gb {args.max_kv_gb}")
                continue
            t1 = forward_latency(model, batch, 1, ctx, args.repeats * 3)
            t32 = forward_latency(model, batch, 32, ctx, args.repeats * 3)
            rows[f"context{ctx}"] = dict(t1_s=t1, t32_s=t32, t32_over_t1=t32 / t1, kv_bytes=kvb)
            if ctx == shortest:
                result["latency"][f"batch{batch}"] = dict(t1_s=t1, t32_s=t32, t32_over_t1=t32 / t1)
            print(f"  batch {batch} context {ctx}: t1 {1e3 * t1:.3f} ms  t32 {1e3 * t32:.3f} ms  t32/t1 "
                  f"{t32 / t1:.3f}", flush=True)
            write_json(result, out_path)
    b1 = result["latency"].get(f"batch{min(args.batches)}", {})
    result["latency_extra"] = dict(context=shortest, batch=min(args.batches), t1=b1.get("t1_s"), t32=b1.get("t32_s"))
    if args.quadratic_block:
        tq = quadratic_forward_latency(model, min(args.batches), args.quadratic_block, shortest, args.repeats * 3)
        result["latency_extra"]["t_quadratic"] = tq
        print(f"  quadratic forward ({args.quadratic_block * (args.quadratic_block + 1)} tokens): {1e3 * tq:.3f} ms",
              flush=True)
    if args.compare_loops:
        ts = forward_latency(model, min(args.batches), 1, shortest, args.repeats * 3, layers="scan")
        result["latency_extra"]["t1_scan"] = ts
        print(f"  t1 with the scanned layer loop: {1e3 * ts:.3f} ms (unrolled {1e3 * b1.get('t1_s', 0):.3f} ms)",
              flush=True)
    write_json(result, out_path)
    if jax.default_backend() == "gpu":
        hbm = result["hbm"]
        streamed = result["model"]["weight_bytes"] - result["model"]["embed_bytes"]  # a forward gathers B embed rows
        bw = hbm["read"]["bytes_per_s"]
        hbm["floor_definition"] = ("(weight bytes except the embedding table + K/V bytes at the context) / best "
                                   "measured read bandwidth")
        hbm["floor_s"] = streamed / bw
        hbm["t1_over_floor"] = {k: v["t1_s"] / ((streamed + kv_bytes(cfg, int(k[5:]), shortest, itemsize)) / bw)
                                for k, v in result["latency"].items()}
        hbm["t1_over_floor_by_context"] = {
            bk: {ck: cv["t1_s"] / ((streamed + cv["kv_bytes"]) / bw) for ck, cv in rows.items() if "t1_s" in cv}
            for bk, rows in result["latency_by_context"].items()}
        result["projection_nld8b"] = dict(
            note="projection, not a measurement: NVIDIA's published tokens per forward for NLD-8B instruct divided "
                 "by the measured time of the forward each mode runs (random weights of the same shapes, batch 1)",
            modes=projection(result["latency_extra"]))
        write_json(result, out_path)


def compare_table(paths) -> str:
    """Markdown: one row per results JSON (weights and their bytes, the HBM floor of those bytes, t1 / t32 at
    batch 1 and the shortest context, t1 over its floor, AR and linear_spec tokens/s at batch 1; "-": not
    measured, e.g. the floor off a GPU)."""
    rows = ["| weights | weight MB | floor ms | t1 ms | t32 ms | t1 / floor | AR tok/s | linear_spec tok/s | device |",
            "|---|---|---|---|---|---|---|---|---|"]
    for path in paths:
        with open(path) as f:
            r = json.load(f)
        m, q = r.get("model", {}), (r.get("model") or {}).get("quantization")
        name = m.get("dtype", "?") if not q else q["scheme"] + (f" ({m['int4_matmul']})" if m.get("int4_matmul") else "")
        lat = r.get("latency", {}).get("batch1", {})
        floor = r.get("hbm", {}).get("t1_over_floor", {}).get("batch1")
        modes = r.get("modes", {}).get("batch1", {})

        def fmt(x, scale=1.0, spec=".3f"):
            return "-" if x is None else format(x * scale, spec)

        rows.append(f"| {name} | {fmt(m.get('weight_bytes'), 1e-6, '.1f')} | {fmt(r.get('hbm', {}).get('floor_s'), 1e3)} | "
                    f"{fmt(lat.get('t1_s'), 1e3)} | "
                    f"{fmt(lat.get('t32_s'), 1e3)} | {fmt(floor, spec='.2f')} | "
                    f"{fmt(modes.get('ar', {}).get('tokens_per_s'), spec='.1f')} | "
                    f"{fmt(modes.get('linear_spec', {}).get('tokens_per_s'), spec='.1f')} | "
                    f"{', '.join(r.get('versions', {}).get('devices', [])[:1])} |")
    return "\n".join(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=("small", "gpu8b"), default="small")
    p.add_argument("--tiny", action="store_true", help="gpu8b code path on a tiny model (dry run)")
    p.add_argument("--batches", type=int, nargs="+", default=None, help="batches of the latency table")
    p.add_argument("--contexts", type=int, nargs="+", default=None, help="cache contexts of the latency table")
    p.add_argument("--mode-batches", type=int, nargs="+", default=None,
                   help="batches of the per-mode generate runs and the peer (default: --batches)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--max-new", type=int, default=None)
    p.add_argument("--block", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quadratic-block", type=int, default=None,
                   help="block length for quadratic_spec (default --block; B(B+1) tokens per forward)")
    p.add_argument("--max-quadratic-tokens", type=int, default=8192,
                   help="skip quadratic_spec when batch * B(B+1) exceeds this (compute-bound, minutes per call)")
    p.add_argument("--max-kv-gb", type=float, default=24.0, help="skip latency shapes with a larger KV cache")
    p.add_argument("--compare-loops", action="store_true", help="also time t1 with the scanned layer loop")
    p.add_argument("--skip", nargs="*", default=[], choices=("latency", "modes", "peer"))
    p.add_argument("--no-peer", action="store_true", help="skip the PyTorch peer (same as --skip peer)")
    p.add_argument("--torch-peer-only", action="store_true",
                   help="only run the PyTorch peer and print its JSON (a line starting PEER_JSON)")
    p.add_argument("--peer-json", default=None,
                   help="take the peer's figures from this JSON (written by an earlier --torch-peer-only run)")
    p.add_argument("--quantize", default=None, choices=("int8", "int4", "fp8"),
                   help="weight-only quantized linear weights (bfloat16 compute; implies --no-peer)")
    p.add_argument("--compare", nargs="+", default=None, metavar="JSON",
                   help="print (and with --out write) a side-by-side markdown table of earlier results, then exit")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.compare:
        table = compare_table(args.compare)
        print(table)
        if args.out:
            with open(args.out, "w", encoding="utf-8") as f:
                f.write(table + "\n")
        return 0
    if args.batches is None:
        args.batches = [1, 4, 16] if args.preset == "gpu8b" else [1, 4]
    if args.contexts is None:
        args.contexts = [128, 8192, 32768] if args.preset == "gpu8b" and not args.tiny else [128, 512]
    args.mode_batches = args.mode_batches or args.batches
    args.quadratic_block = args.quadratic_block or args.block
    if args.max_new is None:
        args.max_new = 256 if args.preset == "gpu8b" and not args.tiny else 64
    if args.torch_peer_only:  # child process: prints one JSON line
        print("PEER_JSON " + json.dumps(torch_peer(args)))
        return 0
    skip = set(args.skip) | ({"peer"} if args.no_peer or args.preset != "gpu8b" or args.quantize else set())
    if args.peer_json:
        with open(args.peer_json) as f:
            peer = json.load(f)
    else:
        peer = None if "peer" in skip else run_peer(args)

    import jax
    import jax.numpy as jnp

    from jaxdlm.model import resolve_layers

    from jaxdlm.quant import as_quantization, int4_form, weight_bytes

    cfg = model_config(args.preset, args.tiny)
    dtype = jnp.bfloat16 if args.preset == "gpu8b" or args.quantize else jnp.float32
    quant = as_quantization(args.quantize)
    if quant is not None and quant.group_size and cfg.hidden_size % quant.group_size:  # the tiny dry run's shapes
        quant = dataclasses.replace(quant, group_size=16)
    print(f"model: {cfg.num_params() / 1e9:.3f} B params, {jnp.dtype(dtype).name}"
          f"{', ' + quant.describe() + ' weights' if quant else ''}, backend {jax.default_backend()}", flush=True)
    tag = f"{'_tiny' if args.tiny else ''}{'_' + args.quantize if args.quantize else ''}"
    out_path = args.out or os.path.join(HERE, "results", f"bench_generate_{args.preset}{tag}_{jax.default_backend()}.json")
    result = dict(benchmark="bench_generate", preset=args.preset, tiny=args.tiny,
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  versions=versions(), note=("random weights: self-speculative drafts are almost never accepted, so "
                                             "TPF here is not a trained model's; CPU figures are for ratios only"))
    if jax.default_backend() == "gpu":  # the floor first, on an empty device
        big = (4 << 30) if not args.tiny else (1 << 26)
        result["hbm"] = dict(read=read_bandwidth(big), copy_bandwidth_bytes_per_s=copy_bandwidth(big))
        print(f"  HBM read {result['hbm']['read']['bytes_per_s'] / 1e12:.2f} TB/s (best of "
              f"{result['hbm']['read']['trials']}), copy {result['hbm']['copy_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s",
              flush=True)
    t0 = time.perf_counter()
    model = init_model(cfg, dtype, quant)
    jax.block_until_ready(model.params)
    result["model"] = dict(dataclasses.asdict(cfg), num_params=cfg.num_params(), dtype=jnp.dtype(dtype).name,
                           quantization=None if quant is None else quant.to_dict(),
                           int4_matmul=int4_form() if quant is not None and quant.scheme == "int4" else None,
                           weight_bytes=weight_bytes(model.params), embed_bytes=model.params["embed"][...].nbytes,
                           init_s=time.perf_counter() - t0)
    result["settings"] = dict(prompt_len=args.prompt_len, max_new=args.max_new, block=args.block,
                              quadratic_block=args.quadratic_block, threshold=0.9, greedy=True, repeats=args.repeats,
                              weights="random", batches=args.batches, contexts=args.contexts,
                              mode_batches=args.mode_batches, layers=resolve_layers("auto"))
    write_json(result, out_path)
    if "latency" not in skip:
        bench_latency(model, args, result, out_path)
    if "modes" not in skip:
        result["modes"] = {}
        for batch in args.mode_batches:
            result["modes"][f"batch{batch}"] = bench_modes(model, batch, args.prompt_len, args.max_new, args.block,
                                                           args.repeats, args.quadratic_block,
                                                           args.max_quadratic_tokens, args.modes)
            write_json(result, out_path)
    if peer is not None:
        result["torch_peer"] = peer
        result["ar_over_peer"] = {k: result["modes"][k]["ar"]["tokens_per_s"] / v["tokens_per_s"]
                                  for k, v in peer.items() if k.startswith("batch") and k in result.get("modes", {})
                                  and "ar" in result["modes"][k]}
    write_json(result, out_path)
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
