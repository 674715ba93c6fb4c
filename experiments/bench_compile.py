"""Compile time of the generation programs: the unrolled layer loop (inference default) against the scanned one.

An unrolled forward is ~L copies of a layer in the program, so it compiles more slowly than a ``lax.scan`` over
the stacked layers; this measures by how much, per decoding mode: the first ``jaxdlm.generate`` call (compile +
run) and the second (run only) of each program, for a deep, narrow model (default: 34 layers like NLD-8B, hidden
64), scan and unrolled side by side in one process.  On a GPU the same script measures the real-shape cost with
``--preset gpu8b`` (NLD-8B shapes, random bf16 weights).

    python experiments/bench_compile.py                      # CPU proxy: 34 layers, hidden 64
    python experiments/bench_compile.py --tiny               # 4 layers (dry run)
    python experiments/bench_compile.py --preset gpu8b --modes ar linear_spec

Results: ``experiments/results/bench_compile_<preset>_<backend>.json`` (device, versions, date, figures).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
MODES = ("ar", "diffusion", "linear_spec", "quadratic_spec")


def model_config(preset: str, layers: int):
    from jaxdlm.config import ModelConfig

    if preset == "gpu8b":  # NLD-8B shapes
        return ModelConfig(model_type="nemotron_labs_diffusion", vocab_size=131072, hidden_size=4096,
                           intermediate_size=14336, num_layers=34, num_heads=32, num_kv_heads=8, head_dim=128,
                           mask_token_id=100, eos_token_ids=(11,), block_size=32, max_position_embeddings=262144)
    return ModelConfig(model_type="nemotron_labs_diffusion", vocab_size=256, hidden_size=64, intermediate_size=128,
                       num_layers=layers, num_heads=4, num_kv_heads=2, head_dim=16, mask_token_id=3,
                       eos_token_ids=(2,), block_size=8)


def measure(model, mode: str, layers: str, prompts, max_new: int, block: int) -> dict:
    """First call (compile + run) and second call (run) of one generation program, in seconds."""
    import jaxdlm

    kw = dict(mode=mode, max_new_tokens=max_new, block_length=block, eos_token_id=(), layers=layers)
    t0 = time.perf_counter()
    jaxdlm.generate(model, prompts, **kw)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = jaxdlm.generate(model, prompts, **kw)
    second = time.perf_counter() - t0
    return dict(first_s=first, second_s=second, compile_s=first - second, total_nfe=res.total_nfe)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=("cpu", "gpu8b"), default="cpu")
    p.add_argument("--layers", type=int, default=34, help="layers of the cpu preset")
    p.add_argument("--tiny", action="store_true", help="4 layers: a quick dry run of the script")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--loops", nargs="+", choices=("unrolled", "scan"), default=["unrolled", "scan"])
    p.add_argument("--max-new", type=int, default=32)
    p.add_argument("--block", type=int, default=8, help="block length (quadratic: B(B+1) tokens per forward)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import flax
    import jax
    import jax.numpy as jnp

    from jaxdlm import Model

    cfg = model_config(args.preset, 4 if args.tiny else args.layers)
    dtype = jnp.bfloat16 if args.preset == "gpu8b" else jnp.float32
    model = Model.init(cfg, seed=0, dtype=dtype)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(4, cfg.vocab_size, size=n) for n in (40, 57)]
    result = dict(benchmark="bench_compile", preset=args.preset, tiny=args.tiny,
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  versions={"jax": jax.__version__, "flax": flax.__version__, "backend": jax.default_backend(),
                            "devices": [d.device_kind for d in jax.devices()], "cpu_count": os.cpu_count()},
                  model=dict(dataclasses.asdict(cfg), dtype=jnp.dtype(dtype).name),
                  settings=dict(batch=len(prompts), max_new=args.max_new, block=args.block), modes={})
    print(f"{cfg.num_layers} layers, hidden {cfg.hidden_size}, {jax.default_backend()}", flush=True)
    for mode in args.modes:
        result["modes"][mode] = {}
        for layers in args.loops:
            r = measure(model, mode, layers, prompts, args.max_new, args.block)
            result["modes"][mode][layers] = r
            print(f"  {mode:>15} {layers:>9}: first call {r['first_s']:7.2f} s, second {r['second_s']:6.2f} s "
                  f"(compile ~{r['compile_s']:.2f} s)", flush=True)
        if {"unrolled", "scan"} <= set(result["modes"][mode]):
            u, s = result["modes"][mode]["unrolled"], result["modes"][mode]["scan"]
            result["modes"][mode]["compile_ratio"] = u["compile_s"] / max(s["compile_s"], 1e-9)
            result["modes"][mode]["run_ratio"] = u["second_s"] / max(s["second_s"], 1e-9)
    out = args.out or os.path.join(HERE, "results", f"bench_compile_{args.preset}{'_tiny' if args.tiny else ''}_"
                                                    f"{jax.default_backend()}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
