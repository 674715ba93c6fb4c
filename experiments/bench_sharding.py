"""Overhead of the sharded code path on ONE device: the same model and inputs, unsharded vs placed on a
1-device (data, fsdp, tensor) mesh with ``jaxdlm.shard_model`` (so every sharding constraint is in the
program).  Measures a causal prefill forward, an AR decode step over the KV cache, whole-``generate`` calls
in AR and linear_spec modes, and a joint-objective gradient, side by side in one run (interleaved repeats,
median).  Target on a GPU: sharded / unsharded <= 1.03.

    python experiments/bench_sharding.py               # small model, any device (CPU: ratios only)
    python experiments/bench_sharding.py --preset gpu  # 1B-ish bf16 model for an H100/H200

Writes ``experiments/results/bench_sharding_<preset>_<backend>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def config(preset: str):
    from jaxdlm.config import ModelConfig

    if preset == "gpu":
        return ModelConfig(model_type="ministral3", vocab_size=32768, hidden_size=2048, intermediate_size=6144,
                           num_layers=16, num_heads=16, num_kv_heads=8, head_dim=128, mask_token_id=100,
                           block_size=32)
    return ModelConfig(model_type="ministral3", vocab_size=2048, hidden_size=128, intermediate_size=384,
                       num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, mask_token_id=100, block_size=8)


def timed(fn, repeats: int) -> list[float]:
    import jax

    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        out.append(time.perf_counter() - t0)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=("small", "gpu"), default="small")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    import flax
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import jaxdlm
    from jaxdlm import KVCache, Model, forward
    from jaxdlm import sharding as sh
    from jaxdlm.training.losses import LossConfig
    from jaxdlm.training.step import make_loss_fn

    cfg = config(args.preset)
    dtype = jnp.bfloat16 if args.preset == "gpu" else jnp.float32
    plain = Model.init(cfg, seed=0, dtype=dtype)
    mesh = sh.make_mesh("", devices=jax.devices()[:1])
    sharded = sh.shard_model(plain, mesh)
    rng = np.random.default_rng(0)
    batch, prompt = (4, 512) if args.preset == "gpu" else (2, 64)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, size=(batch, prompt)), jnp.int32)

    @jax.jit
    def prefill(params, toks):
        return forward(nnx.merge(plain.graphdef, params), toks, kind="causal",
                       cache=KVCache.init(cfg, toks.shape[0], prompt + 64, dtype))

    @jax.jit
    def decode(params, cache, tok):
        return forward(nnx.merge(plain.graphdef, params), tok, kind="causal", cache=cache)

    grad = jax.jit(jax.grad(lambda p, b, k: make_loss_fn(plain.graphdef, LossConfig(ce_chunk=None))(p, b, k)[0]))
    key = jax.random.PRNGKey(0)
    gen_kw = dict(max_new_tokens=64, block_length=cfg.block_size, eos_token_id=())

    def cases(model):
        ctx = model.mesh_context
        with ctx():
            _, cache = prefill(model.params, tokens)
        one = tokens[:, :1]
        return {
            "prefill": lambda: _in(ctx, lambda: prefill(model.params, tokens)),
            "decode_step": lambda: _in(ctx, lambda: decode(model.params, cache, one)),
            "generate_ar": lambda: jaxdlm.generate(model, np.asarray(tokens), mode="ar", **gen_kw).tokens,
            "generate_linear_spec": lambda: jaxdlm.generate(model, np.asarray(tokens), mode="linear_spec",
                                                            **gen_kw).tokens,
            "grad_joint_loss": lambda: _in(ctx, lambda: grad(model.params, {"tokens": tokens}, key)),
        }

    runs = {"unsharded": cases(plain), "sharded_1dev": cases(sharded)}
    results = {}
    for name in runs["unsharded"]:
        for variant in runs:  # compile + warm up
            jax.block_until_ready(runs[variant][name]())
        samples = {v: [] for v in runs}
        for _ in range(args.repeats):  # interleaved
            for v in runs:
                samples[v] += timed(runs[v][name], 1)
        med = {v: statistics.median(s) for v, s in samples.items()}
        results[name] = {"median_s": med, "ratio_sharded_over_unsharded": med["sharded_1dev"] / med["unsharded"]}
        print(f"{name:>22}: unsharded {med['unsharded'] * 1e3:8.2f} ms  sharded(1 dev) "
              f"{med['sharded_1dev'] * 1e3:8.2f} ms  ratio {results[name]['ratio_sharded_over_unsharded']:.3f}")

    record = {
        "benchmark": "sharded path on one device vs unsharded",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": {"backend": jax.default_backend(), "kind": jax.devices()[0].device_kind,
                   "platform": platform.platform()},
        "versions": {"python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__},
        "preset": args.preset, "config": cfg.to_dict(), "dtype": str(jnp.dtype(dtype)), "batch": batch,
        "prompt": prompt, "repeats": args.repeats, "target_ratio": 1.03, "results": results,
        "note": "CPU figures are ratios only" if jax.default_backend() == "cpu" else "",
    }
    out = args.out or os.path.join(HERE, "results", f"bench_sharding_{args.preset}_{jax.default_backend()}.json")
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, out)
    print(f"wrote {out}")
    return 0


def _in(ctx, fn):
    with ctx():
        return fn()


if __name__ == "__main__":
    sys.exit(main())
