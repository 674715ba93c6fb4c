"""Attention kernel benchmark: jaxdlm's Pallas kernels against XLA and cuDNN (GPU), JSON to experiments/results/.

Training shapes (two-stream ``[x_t | x_0]``, so ``2L`` tokens): batch 1..8, L = 2048 / 4096 / 8192, 32 query
heads, 8 kv heads, head_dim 128, bf16.  Forward and forward+backward, time and TFLOP/s counting only the
unmasked (allowed) query-key pairs: ``4 * pairs * head_dim * heads * batch`` for the forward and 3.5x that
for forward+backward (the FlashAttention convention).  Side by side in the same run:

* ``pallas``      - jaxdlm.attention.pallas_gpu (the two-stream mask from TokenInfo, tile skipping), v2
  schedule (runs of consecutive visible tiles); ``pallas_list`` - the same kernels with v1's visit list;
* ``xla_dense``   - ``jax.nn.dot_product_attention(implementation="xla")`` with the dense ``[2L, 2L]`` mask;
* ``cudnn_dense`` - ``jax.nn.dot_product_attention(implementation="cudnn")`` with the dense mask;
* ``cudnn_causal``- cuDNN with plain causal masking on the same ``2L`` tokens: the speed reference (its
  TFLOP/s counts the causal pairs).

Decode shapes: cache 1k..32k slots (filled but for the new tokens), 1 query (AR step, causal) and 32 queries
(a diffusion block, denoise), batch 1 and 8: seconds per layer and GB/s (K and V of the layer read once, plus q
and out) against the measured HBM copy bandwidth.  Each timed program reads many layers of a stacked heads-major
cache in place, as the unrolled forward does, so the figure is device time, not Python's per-call dispatch
(timing one layer per call measured ~80-90 us for every shape on an H100: the dispatch floor).  ``pallas``
(automatic split count), ``pallas_splits<N>`` (a sweep of fixed split counts) and ``xla`` side by side;
``decode_winners`` lists the fastest per shape.

Before timing, a correctness check of pallas against the XLA path on the device (forward and gradients).

``--smoke`` runs tiny shapes (interpret mode on a CPU) end to end so the script is known to work anywhere;
its timings mean nothing.

    python experiments/bench_attention.py            # on a GPU
    python experiments/bench_attention.py --smoke    # anywhere
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import time
import traceback

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from jaxdlm.attention import masks, pallas_gpu, xla  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# ---------------------------------------------------------------------------------------------------
# timing and counting


def _block(x):
    return jax.tree.map(lambda a: a.block_until_ready(), x)


def time_fn(fn, arg_sets, *, warmup=2, trials=5, iters=10):
    """Median over ``trials`` of the mean seconds per call (``iters`` calls, rotating over ``arg_sets``)."""
    for i in range(warmup):
        _block(fn(*arg_sets[i % len(arg_sets)]))
    times = []
    for _ in range(trials):
        t0 = time.perf_counter()
        out = None
        for i in range(iters):
            out = fn(*arg_sets[i % len(arg_sets)])
        _block(out)
        times.append((time.perf_counter() - t0) / iters)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "trials": trials,
            "iters": iters}


def two_stream_pairs(length: int, block: int) -> int:
    """Allowed query-key pairs of the two-stream mask per (batch row, head), exactly."""
    nb = -(-length // block)
    sizes = [min(block, length - j * block) for j in range(nb)]
    noisy_self = sum(s * s for s in sizes)
    before = np.cumsum([0] + sizes[:-1])
    noisy_ctx = sum(s * int(b) for s, b in zip(sizes, before))
    clean = length * (length + 1) // 2
    return noisy_self + noisy_ctx + clean


def measure_copy_bandwidth(nbytes: int, trials: int):
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    n = nbytes // 4
    x = jnp.arange(n, dtype=jnp.float32)
    fn = jax.jit(lambda a: a * 1.0 + 1.0)
    t = time_fn(fn, [(x,)], trials=trials, iters=5)
    return {"bytes": 2 * n * 4, "gbps": 2 * n * 4 / t["median_s"] / 1e9, **t}


def _err(e: Exception) -> str:
    msg = f"{type(e).__name__}: {e}"
    return msg if len(msg) < 600 else msg[:600] + "..."


def rel_err(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# ---------------------------------------------------------------------------------------------------
# implementations


def dense_mask(info):
    return masks.allowed(info, info)[:, None]  # [B, 1, T, S]


def make_train_impls(info, scale, kcfg, on_gpu):
    """name -> (fn(q, k, v) -> out, needs_gpu)."""
    def pallas(cfg):
        return lambda q, k, v: pallas_gpu.attention(q, k, v, info, info, scale=scale, config=cfg)

    def sdpa(impl, causal):
        def f(q, k, v):
            mask = None if causal else dense_mask(info)
            return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=causal,
                                                implementation=impl)
        return f

    return {"pallas": (pallas(kcfg), False),
            "pallas_list": (pallas(dataclasses.replace(kcfg, schedule="list")), False),
            "xla_dense": (sdpa("xla", False), False),
            "cudnn_dense": (sdpa("cudnn", False), True), "cudnn_causal": (sdpa("cudnn", True), True)}


def fwd_bwd(fn):
    def f(q, k, v, ct):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(ct)
    return f


# ---------------------------------------------------------------------------------------------------
# sections


def check_correctness(args, kcfg, dtype):
    """pallas vs the XLA path on the device: forward and dq, dk, dv (two-stream) and a decode pass."""
    rng = np.random.default_rng(int(time.time()))
    b, length, blk = 1, args.check_length, args.block_size
    h, kvh, d = args.heads, args.kv_heads, args.head_dim
    info = masks.two_stream_info(b, length, blk)
    mk = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32).astype(dtype)  # noqa: E731
    q, k, v, ct = mk(b, 2 * length, h, d), mk(b, 2 * length, kvh, d), mk(b, 2 * length, kvh, d), mk(b, 2 * length, h, d)
    scale = d ** -0.5
    up = lambda x: x.astype(jnp.float32)  # noqa: E731
    pal = jax.jit(fwd_bwd(lambda q, k, v: pallas_gpu.attention(q, k, v, info, info, scale=scale, config=kcfg)))
    ref = jax.jit(fwd_bwd(lambda q, k, v: xla.attention(up(q), up(k), up(v), info, info, scale=scale)))
    (o_p, g_p), (o_r, g_r) = pal(q, k, v, ct), ref(q, k, v, up(ct))
    out = {"shape": [b, 2 * length, h, kvh, d], "dtype": str(jnp.dtype(dtype)), "fwd_rel_err": rel_err(o_p, o_r)}
    for name, gp, gr in zip(("dq", "dk", "dv"), g_p, g_r):
        out[f"{name}_rel_err"] = rel_err(gp, gr)
    lengths = jnp.asarray([args.check_length // 2], jnp.int32)
    qi, ki = masks.cache_query_info(lengths, 8, "denoise"), masks.cache_key_info(lengths, 2 * length, 8, "denoise")
    qd = mk(b, 8, h, d)
    o_p = jax.jit(lambda: pallas_gpu.attention(qd, k, v, qi, ki, scale=scale, config=kcfg))()
    o_r = xla.attention(up(qd), up(k), up(v), qi, ki, scale=scale)
    out["decode_rel_err"] = rel_err(o_p, o_r)
    return out


def bench_training(args, kcfg, dtype, on_gpu, progress):
    rows = []
    h, kvh, d, blk = args.heads, args.kv_heads, args.head_dim, args.block_size
    scale = d ** -0.5
    rng = np.random.default_rng(0)
    for length in args.lengths:
        pairs = two_stream_pairs(length, blk)
        causal_pairs = (2 * length) * (2 * length + 1) // 2
        for b in args.batches:
            info = masks.two_stream_info(b, length, blk)
            mk = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32).astype(dtype)  # noqa: E731
            t = 2 * length
            try:
                sets = [(mk(b, t, h, d), mk(b, t, kvh, d), mk(b, t, kvh, d), mk(b, t, h, d))]
            except Exception as e:  # noqa: BLE001 - out of memory is a result here
                rows.append({"L": length, "batch": b, "error": _err(e)})
                continue
            for name, (fn, needs_gpu) in make_train_impls(info, scale, kcfg, on_gpu).items():
                if args.impls is not None and name not in args.impls:
                    progress.update(1)
                    continue
                row = {"L": length, "tokens": t, "batch": b, "impl": name}
                n_pairs = causal_pairs if name == "cudnn_causal" else pairs
                flops_fwd = 4.0 * n_pairs * d * h * b
                row["useful_pairs_per_head"] = n_pairs
                if needs_gpu and not on_gpu:
                    row["skipped"] = "needs a GPU (cuDNN)"
                    rows.append(row)
                    progress.update(1)
                    continue
                if name == "xla_dense" and b * h * t * t * 4 > args.xla_max_bytes:
                    row["skipped"] = f"dense f32 scores {b * h * t * t * 4 / 2**30:.0f} GiB > --xla-max-bytes"
                    rows.append(row)
                    progress.update(1)
                    continue
                for mode, f, flops in (("fwd", jax.jit(fn), flops_fwd),
                                       ("fwd_bwd", jax.jit(fwd_bwd(fn)), 3.5 * flops_fwd)):
                    call_sets = [s[:3] for s in sets] if mode == "fwd" else sets
                    try:
                        tm = time_fn(f, call_sets, trials=args.trials, iters=args.iters)
                        row[mode] = {**tm, "tflops": flops / tm["median_s"] / 1e12}
                    except Exception as e:  # noqa: BLE001 - unsupported / OOM is a result here
                        row[mode] = {"error": _err(e)}
                rows.append(row)
                progress.update(1)
            del sets
    # ratios side by side (same run)
    by = {(r["L"], r["batch"], r.get("impl")): r for r in rows}
    for r in rows:
        if r.get("impl") != "pallas":
            continue
        for ref in ("cudnn_causal", "cudnn_dense", "xla_dense", "pallas_list"):
            o = by.get((r["L"], r["batch"], ref), {})
            for mode in ("fwd", "fwd_bwd"):
                a, c = r.get(mode, {}), o.get(mode, {})
                if "tflops" in a and "tflops" in c:
                    r.setdefault("throughput_ratio", {})[f"{mode}_vs_{ref}"] = a["tflops"] / c["tflops"]
                if "median_s" in a and "median_s" in c:
                    r.setdefault("speedup", {})[f"{mode}_vs_{ref}"] = c["median_s"] / a["median_s"]
    return rows


def _decode_program(impl: str, n_layers: int, qi, ki, scale: float, cfg):
    """One jitted program reading ``n_layers`` layers of a stacked heads-major cache ``[L, B, KVH, S, D]`` in place,
    as the unrolled forward does (static layer indices); returns the summed outputs (nothing is optimised away).
    Timing many layers inside one program measures the device, not Python's per-call dispatch (~80 us)."""
    from jaxdlm.attention import attention

    def run(q, k, v):
        total = jnp.zeros(q.shape, jnp.float32)
        for i in range(n_layers):
            if impl == "xla":
                out = attention(q, k, v, qi, ki, scale=scale, impl="xla", layer=i)
            else:
                out = pallas_gpu.attention(q, k, v, qi, ki, scale=scale, config=cfg, layer=i)
            total = total + out.astype(jnp.float32)
        return total
    return jax.jit(run)


def bench_decode(args, kcfg, dtype, copy_gbps, progress):
    """Per (cache, queries, batch): seconds per layer of decode attention over a stacked cache, read in place, timed
    over ``L`` layers in one program (``L`` so that the program reads >= ``--decode-program-bytes``); GB/s counts
    the K and V of every slot of the layer (what a forward reads) plus q and out."""
    rows = []
    h, kvh, d = args.heads, args.kv_heads, args.head_dim
    scale = d ** -0.5
    rng = np.random.default_rng(1)
    itemsize = jnp.dtype(dtype).itemsize
    for s in args.caches:
        for nq in args.decode_queries:
            kind = "causal" if nq == 1 else "denoise"
            for b in args.decode_batches:
                length = jnp.full((b,), s - nq, jnp.int32)
                qi, ki = masks.cache_query_info(length, nq, kind), masks.cache_key_info(length, s, nq, kind)
                layer_bytes = 2 * b * s * kvh * d * itemsize
                n_layers = int(min(args.decode_max_layers, max(2, math.ceil(args.decode_program_bytes / layer_bytes))))
                mk = lambda *sh: jnp.asarray(rng.standard_normal(sh), jnp.float32).astype(dtype)  # noqa: E731
                q, k, v = mk(b, nq, h, d), mk(n_layers, b, kvh, s, d), mk(n_layers, b, kvh, s, d)
                nbytes = layer_bytes + 2 * b * nq * h * d * itemsize
                impls = [("pallas", kcfg), ("xla", None)]
                if b == min(args.decode_batches):
                    impls += [(f"pallas_splits{n}", dataclasses.replace(kcfg, num_splits=n)) for n in args.split_sweep]
                for name, cfg in impls:
                    row = {"cache": s, "queries": nq, "kind": kind, "batch": b, "impl": name, "bytes": nbytes,
                           "layers_in_program": n_layers}
                    try:
                        fn = _decode_program("xla" if name == "xla" else "pallas", n_layers, qi, ki, scale, cfg)
                        tm = time_fn(fn, [(q, k, v)], trials=args.trials, iters=args.iters)
                        per_layer = tm["median_s"] / n_layers
                        gbps = nbytes / per_layer / 1e9
                        row.update(tm, per_layer_s=per_layer, gbps=gbps,
                                   frac_of_copy_bw=gbps / copy_gbps if copy_gbps else None)
                    except Exception as e:  # noqa: BLE001
                        row["error"] = _err(e)
                    rows.append(row)
                    progress.update(1)
                del q, k, v
    return rows


def decode_winners(rows) -> list:
    """The fastest implementation per decode shape (what the automatic backend choice should follow)."""
    best = {}
    for r in rows:
        if "per_layer_s" not in r:
            continue
        key = (r["cache"], r["queries"], r["batch"])
        if key not in best or r["per_layer_s"] < best[key]["per_layer_s"]:
            best[key] = r
    return [dict(cache=c, queries=t, batch=b, impl=r["impl"], per_layer_s=r["per_layer_s"],
                 frac_of_copy_bw=r["frac_of_copy_bw"]) for (c, t, b), r in sorted(best.items())]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes, interpret mode off GPU (checks the script)")
    p.add_argument("--out", default=None, help="JSON path (default experiments/results/bench_attention_<dev>.json)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    p.add_argument("--caches", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    p.add_argument("--decode-queries", type=int, nargs="+", default=[1, 32])
    p.add_argument("--decode-batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--decode-program-bytes", type=float, default=2**30,
                   help="K/V bytes one timed decode program reads (layers stacked to reach it)")
    p.add_argument("--decode-max-layers", type=int, default=64)
    p.add_argument("--split-sweep", type=int, nargs="*", default=[4, 8, 16, 32, 64],
                   help="fixed flash-decoding split counts timed beside the automatic one (smallest batch only)")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--check-length", type=int, default=512)
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--xla-max-bytes", type=float, default=16 * 2**30)
    p.add_argument("--rotate-bytes", type=float, default=256 * 2**20)
    p.add_argument("--skip", nargs="*", default=[], choices=["check", "train", "decode"])
    p.add_argument("--impls", nargs="*", default=None,
                   help="subset of training impls (pallas pallas_list xla_dense cudnn_dense cudnn_causal)")
    args = p.parse_args(argv)
    on_gpu = jax.default_backend() == "gpu"
    kcfg = pallas_gpu.KernelConfig()
    dtype = jnp.bfloat16
    if args.smoke:
        args.batches, args.lengths, args.caches = [1, 2], [24], [48, 80]
        args.decode_queries, args.decode_batches = [1, 8], [1, 2]
        args.heads, args.kv_heads, args.head_dim, args.block_size = 4, 2, 16, 8
        args.check_length, args.trials, args.iters = 24, 2, 2
        args.rotate_bytes, args.decode_program_bytes, args.split_sweep = 0, 0, [1, 3]
        kcfg = pallas_gpu.KernelConfig(block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=16, block_k_decode=16,
                                       num_splits=None if on_gpu else 2)
    if not on_gpu and not args.smoke:
        print("warning: no GPU; Pallas runs in interpret mode and timings are meaningless (use --smoke)")
    dev = jax.devices()[0]
    result = {
        "benchmark": "bench_attention", "smoke": args.smoke,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": getattr(dev, "device_kind", str(dev)), "backend": jax.default_backend(),
        "versions": {"jax": jax.__version__, "jaxlib": getattr(jax.lib, "__version__", None) or
                     __import__("jaxlib").__version__, "python": platform.python_version(), "numpy": np.__version__},
        "args": vars(args), "kernel_config": {k: v for k, v in vars(kcfg).items()}, "dtype": "bfloat16",
    }
    n_train = len(args.lengths) * len(args.batches) * 5
    n_dec = len(args.caches) * len(args.decode_queries) * (len(args.decode_batches) * 2 + len(args.split_sweep))
    with tqdm(total=(0 if "train" in args.skip else n_train) + (0 if "decode" in args.skip else n_dec),
              desc="bench_attention") as progress:
        if "check" not in args.skip:
            try:
                result["check"] = check_correctness(args, kcfg, dtype)
            except Exception as e:  # noqa: BLE001
                result["check"] = {"error": _err(e), "traceback": traceback.format_exc()}
            print("check:", json.dumps(result["check"])[:400])
        copy = measure_copy_bandwidth(64 * 2**20 if args.smoke else 2 * 2**30, args.trials)
        result["hbm_copy"] = copy
        if "train" not in args.skip:
            result["training"] = bench_training(args, kcfg, dtype, on_gpu, progress)
        if "decode" not in args.skip:
            result["decode"] = bench_decode(args, kcfg, dtype, copy["gbps"], progress)
            result["decode_winners"] = decode_winners(result["decode"])
    out = args.out or os.path.join(
        RESULTS, "bench_attention_smoke.json" if args.smoke else
        f"bench_attention_{result['device'].replace(' ', '_')}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1, default=str)
    os.replace(tmp, out)  # nothing half-written on failure
    # short table last
    print(f"\ndevice {result['device']}  copy {copy['gbps']:.0f} GB/s  -> {out}")
    def cell(r, m):
        if "tflops" in r.get(m, {}):
            return f"{m} {r[m]['median_s'] * 1e3:8.2f} ms {r[m]['tflops']:6.1f} TF/s"
        return f"{m} " + (r.get("skipped") or r.get(m, {}).get("error", "-"))[:40]

    for r in result.get("training", []):
        if "impl" in r:
            print(f"train L={r['L']:5d} B={r['batch']} {r['impl']:12s} {cell(r, 'fwd')} | {cell(r, 'fwd_bwd')}")
    for r in result.get("decode", []):
        cell = (f"{r['per_layer_s'] * 1e6:9.1f} us/layer {r['gbps']:7.1f} GB/s" if "gbps" in r
                else r.get("error", "")[:60])
        print(f"decode S={r['cache']:6d} T={r['queries']:2d} B={r['batch']} {r['impl']:16s} {cell}")
    return result


if __name__ == "__main__":
    main()
