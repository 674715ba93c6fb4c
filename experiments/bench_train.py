"""Training-step benchmark (issue 22): tokens/s per device, MFU and the memory plan of the real train step.

    python experiments/bench_train.py                    # one GPU: 3B / 8B-shaped NLD, L = 4096, bf16, remat per layer
    python experiments/bench_train.py --tiny             # the same code path on a tiny model (CPU dry-run)
    python experiments/bench_train.py --cases full_xla   # some cases only

Every case is one ``jaxdlm train`` experiment built from a config dict (:func:`case_config`: the joint objective
over ``[x_t | x_0]``, AdamW, float32 master weights and a bf16 forward / backward, ``[model] remat``) and runs in
its own process, so that one running out of memory (or past its time limit) is recorded and the others still
run.  A case:

* makes the ``--check`` memory plan (:func:`jaxdlm.training.plan.memory_plan`, per device);
* builds the run's state and train step the way ``jaxdlm train`` does (``run._full_experiment``; an adapter
  case: :func:`adapter_experiment`), compiles it (the first step, timed as ``compile_s``) and times ``--steps``
  steps on random token rows;
* reports tokens/s per device, MFU against the device's dense bf16 peak (:mod:`jaxdlm.training.speed`; null on a
  CPU unless ``--peak-tflops``), the model FLOPs per token and the device's peak memory in use where it reports one.

Cases (:data:`CASES`, each with its own time limit): the 3B full fine-tune with Pallas (flash) attention inside
the step and the same with XLA attention (``JAXDLM_ATTENTION``), side by side; the 3B adapter fine-tune (rank 16 on
all seven projections, bf16 base) and the 8B adapter fine-tune with an int8 base (its memory plan and peak memory
in use against one 80 GB H100: ``fits_80gb``), both with Pallas attention.  An adapter case builds the run's
adapter step (``run._adapter_steps``) on a random base drawn directly in its ``base_dtype`` layout
(:func:`adapter_experiment`) and counts an adapter step's model FLOPs (``speed.adapter_flops_per_token``).
Results (device, versions, date, figures) go to ``experiments/results/bench_train_<preset or tiny>_<backend>.json``
and a Markdown table to stdout.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

#: The adapter of the adapter cases: NVIDIA's SFT LoRA recipe (docs/training.md section 3), rank 16 on all seven
#: projections.
ADAPTER = {"enabled": True, "rank": 16, "alpha": 32.0,
           "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}

#: name -> what the case changes: the attention backend inside the step, ``[model] remat``, the model (``preset``,
#: default ``--preset``), the ``[adapter]`` section (an adapter fine-tune of a frozen base in its ``base_dtype``)
#: and ``timeout_s``, the case's own time limit (its process).  In this order: the 3B full cases first.  The limits
#: add up to 430 s, so that ``gpu_session.sh train`` stays under 8 minutes.
CASES = {
    "full_pallas": {"attention": "pallas", "remat": "full", "timeout_s": 130},
    "full_xla": {"attention": "xla", "remat": "full", "timeout_s": 90},
    "adapter3b_pallas": {"attention": "pallas", "remat": "full", "timeout_s": 100,
                         "adapter": dict(ADAPTER, base_dtype="bfloat16")},
    "adapter8b_int8": {"attention": "pallas", "remat": "full", "timeout_s": 110, "preset": "8b",
                       "adapter": dict(ADAPTER, base_dtype="int8")},
}
#: What an 80 GB H100 gives JAX at ``XLA_PYTHON_CLIENT_MEM_FRACTION=0.95`` (``gpu_session.sh``), in bytes: the
#: adapter cases' memory plans are also read against it (``fits_80gb``) when the benchmark runs on a larger GPU.
H100_80GB_LIMIT = int(0.95 * 80 * 2**30)


def model_config(preset: str, tiny: bool):
    """The NLD shapes of docs/model.md (3B or 8B), or a tiny model with the same layout for a dry run."""
    from jaxdlm.config import ModelConfig
    from jaxdlm.testing import NLD_ROPE

    common = dict(model_type="nemotron_labs_diffusion", mask_token_id=100, eos_token_ids=(11,), bos_token_id=1,
                  rope=NLD_ROPE, max_position_embeddings=262144)
    if tiny:
        return ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                           num_kv_heads=2, head_dim=16, block_size=8, **common)
    if preset == "8b":
        return ModelConfig(vocab_size=131072, hidden_size=4096, intermediate_size=14336, num_layers=34,
                           num_heads=32, num_kv_heads=8, head_dim=128, block_size=32, **common)
    return ModelConfig(vocab_size=131072, hidden_size=3072, intermediate_size=9216, num_layers=26, num_heads=32,
                       num_kv_heads=8, head_dim=128, block_size=32, **common)


def case_config(case: dict, args, folder: str):
    """The validated :class:`~jaxdlm.training.config.TrainConfig` of ``case``: its model and ``--batch`` random
    token rows of ``--seq-len`` written to ``folder``."""
    from jaxdlm.training.config import parse_config

    mcfg = model_config(case.get("preset", args.preset), args.tiny)
    with open(os.path.join(folder, "model.json"), "w") as f:
        json.dump(mcfg.to_dict(), f)
    rows = np.random.default_rng(0).integers(4, mcfg.vocab_size, size=(args.batch * 2, args.seq_len), dtype=np.int32)
    np.save(os.path.join(folder, "train.npy"), rows)
    conf = {"model": {"config": "model.json", "remat": case["remat"]},
            "data": {"train": "train.npy", "seq_len": args.seq_len},
            "objective": {"objective": "joint", "normalization": "sft"},
            "optim": {"lr": 1e-5, "total_steps": 1000, "batch_size": args.batch, "accum": 1,
                      "compute_dtype": "bfloat16"},
            "run": {"out_dir": "run"}}
    if "adapter" in case:
        conf["adapter"] = case["adapter"]
    return parse_config(conf, base_dir=folder)


def random_params(abstract, shardings, seed: int = 0):
    """Random parameters of the layout ``abstract`` (an ``nnx.State`` of ``ShapeDtypeStruct``s, float or quantized)
    drawn on the devices in ``shardings``, one leaf per program (so no more than one leaf's scratch is ever live):
    integer (quantized) weights uniform over their range, ``*_scale`` leaves ``1 / 2048``, norm weights one,
    other floats N(0, 0.02^2)."""
    import jax
    import jax.numpy as jnp

    def draw(key, shape, dtype, name):
        if jnp.issubdtype(dtype, jnp.integer):
            bits = jax.random.bits(key, shape, jnp.uint8)
            return (jax.lax.bitcast_convert_type(bits, jnp.int8) if jnp.dtype(dtype) == jnp.int8
                    else ((bits & 15).astype(jnp.int8) - 8).astype(dtype))
        if name.endswith("_scale"):
            return jnp.full(shape, 1 / 2048, dtype)
        if name == "weight":
            return jnp.ones(shape, dtype)
        return (jax.random.normal(key, shape, jnp.float32) * 0.02).astype(dtype)

    paths = jax.tree_util.tree_flatten_with_path(abstract)[0]
    keys = {jax.tree_util.keystr(p): i for i, (p, _) in enumerate(paths)}

    def leaf(path, x, where):
        name, i = str(getattr(path[-1], "key", path[-1])), keys[jax.tree_util.keystr(path)]
        fn = jax.jit(lambda key: draw(key, x.shape, x.dtype, name), out_shardings=where)
        return fn(jax.random.fold_in(jax.random.PRNGKey(seed), i))

    return jax.tree_util.tree_map_with_path(leaf, abstract, shardings)


def adapter_experiment(cfg, mcfg, mesh):
    """The adapter fine-tune's state and step as ``jaxdlm train`` builds them (``run._adapter_steps``, the adapter
    step of the memory plan too), on a random base made directly in its ``adapter.base_dtype`` layout and shardings
    (``training.adapter.abstract_base``; :func:`random_params`): ``jaxdlm train`` would draw a float32 base and
    quantize it on the host, minutes and a float32 copy's memory for the 8B shapes, which the step's speed and
    memory do not depend on."""
    from jaxdlm import sharding as sh
    from jaxdlm.training import adapter as tune
    from jaxdlm.training import run, speed

    acfg = cfg.adapter.adapter_config()
    base = tune.abstract_base(mcfg, acfg, cfg.adapter.base_dtype)
    base_params = random_params(base.params, sh.param_shardings(base, mesh), cfg.model.seed)
    steps = run._adapter_steps(base.graphdef, mcfg, acfg, cfg.optim, cfg.objective, mesh, cfg.model.remat,
                               cfg.run.seed)
    return run._Experiment(run._placed(steps.shapes, steps.shardings), steps.init,
                           lambda state, batch: steps.train_step(state, base_params, batch), None, {"kind": "adapter"},
                           speed.adapter_flops_per_token(mcfg, cfg.objective, cfg.data.seq_len, acfg))


def run_case(name: str, args) -> dict:
    """One case in this process (``JAXDLM_ATTENTION`` already set by the parent): the figures."""
    import jax

    from jaxdlm.training import config as config_lib
    from jaxdlm.training import plan, run, speed

    case = CASES[name]
    with tempfile.TemporaryDirectory() as folder:
        cfg = case_config(case, args, folder)
        mcfg = config_lib.model_config(cfg)
        t0 = time.perf_counter()
        mem = plan.memory_plan(cfg)
        plan_s = time.perf_counter() - t0
        mesh = run.run_mesh(cfg, mcfg)
        if cfg.adapter.enabled:
            exp = adapter_experiment(cfg, mcfg, mesh)
        else:
            exp = run._full_experiment(cfg, mcfg, None, None, mesh)
        data = run.load_dataset(cfg, cfg.data.train, mcfg, 0)
        state = exp.init()
        with jax.set_mesh(mesh):
            t0 = time.perf_counter()
            state, metrics = exp.run_step(state, run._train_batch(data, cfg, mesh, 0))
            loss0 = float(metrics["loss"])
            compile_s = time.perf_counter() - t0
            times = []
            for s in range(1, args.steps + 1):
                batch = run._train_batch(data, cfg, mesh, s)
                jax.block_until_ready(batch)
                t0 = time.perf_counter()
                state, metrics = exp.run_step(state, batch)
                jax.block_until_ready(metrics)
                times.append(time.perf_counter() - t0)
        step_s = float(np.median(times))
    tokens = cfg.batch_size * cfg.data.seq_len
    devices = mesh.size
    tps = tokens / step_s / devices
    peak = speed.peak_tflops(jax.devices()[0].device_kind, args.peak_tflops)
    flops = exp.flops_per_token
    stats = jax.local_devices()[0].memory_stats() or {}
    fits_80gb = mem["memory"]["total"] <= H100_80GB_LIMIT if cfg.adapter.enabled and not args.tiny else None
    return dict(case=name, **case, preset_used="tiny" if args.tiny else case.get("preset", args.preset),
                fits_80gb=fits_80gb, devices=devices, batch=cfg.batch_size, seq_len=cfg.data.seq_len,
                compute_dtype=cfg.compute_dtype, tokens_per_step=tokens, step_s=step_s,
                step_s_all=[round(t, 6) for t in times], compile_s=compile_s, tokens_per_s_per_device=tps,
                flops_per_token=flops, peak_tflops=peak, mfu=None if peak is None else tps * flops / (peak * 1e12),
                memory_plan=mem, plan_s=plan_s, peak_bytes_in_use=stats.get("peak_bytes_in_use"),
                first_loss=loss0, last_loss=float(metrics["loss"]))


def run_all(args) -> list[dict]:
    """Every selected case in its own process with its own time limit; a failure is recorded, not raised."""
    results = []
    for name in args.cases:
        env = dict(os.environ, JAXDLM_ATTENTION=CASES[name]["attention"])
        cmd = [sys.executable, os.path.abspath(__file__), "--case", name, *_passed_on(args)]
        timeout = args.case_timeout or CASES[name]["timeout_s"]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
            lines = [l for l in proc.stdout.splitlines() if l.startswith("CASE_JSON ")]
            if proc.returncode == 0 and lines:
                results.append(json.loads(lines[-1][len("CASE_JSON "):]))
            else:
                results.append(dict(case=name, **CASES[name], error=f"exit {proc.returncode}",
                                    stderr_tail=proc.stderr[-3000:]))
        except subprocess.TimeoutExpired as e:
            results.append(dict(case=name, **CASES[name], error=f"timed out after {timeout} s",
                                stderr_tail=(e.stderr or b"")[-3000:].decode("utf-8", "replace")
                                if isinstance(e.stderr, bytes) else (e.stderr or "")[-3000:]))
        results[-1]["wall_s"] = time.perf_counter() - t0
        print(json.dumps({k: v for k, v in results[-1].items() if k not in ("step_s_all", "stderr_tail")}),
              flush=True)
        if "error" in results[-1]:
            print(results[-1]["stderr_tail"][-1500:], file=sys.stderr, flush=True)
    return results


def _passed_on(args) -> list[str]:
    out = ["--preset", args.preset, "--seq-len", str(args.seq_len), "--batch", str(args.batch),
           "--steps", str(args.steps)]
    if args.tiny:
        out.append("--tiny")
    if args.peak_tflops is not None:
        out += ["--peak-tflops", str(args.peak_tflops)]
    return out


def _versions() -> dict:
    """``bench_generate.versions()`` (device, jax, flax, python) read in a child process, after the cases."""
    code = "import json, bench_generate; print(json.dumps(bench_generate.versions()))"
    try:
        proc = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, timeout=120)
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, IndexError, json.JSONDecodeError) as e:
        return {"error": f"versions not read: {e!r}"}


def table(results: list[dict]) -> str:
    lines = ["| case | model | attention | remat | tokens/s/device | MFU | step s | compile s | plan total GiB | "
             "peak in use GiB | fits 80 GB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        model = r.get("preset_used", r.get("preset", "")) + (f" {r['adapter']['base_dtype']} base + adapter"
                                                              if "adapter" in r else " full")
        if "error" in r:
            lines.append(f"| {r['case']} | {model} | {r['attention']} | {r['remat']} | {r['error']} | | | | | | |")
            continue
        gib = lambda b: "" if b is None else f"{b / 2**30:.2f}"  # noqa: E731
        mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
        fits = {True: "yes", False: "NO", None: ""}[r.get("fits_80gb")]
        lines.append(f"| {r['case']} | {model} | {r['attention']} | {r['remat']} | {r['tokens_per_s_per_device']:.4g} "
                     f"| {mfu} | {r['step_s']:.4g} | {r['compile_s']:.1f} | "
                     f"{gib(r['memory_plan']['memory']['total'])} | {gib(r['peak_bytes_in_use'])} | {fits} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=("3b", "8b"), default="3b", help="NLD shapes (docs/model.md)")
    p.add_argument("--tiny", action="store_true", help="a tiny model, L = 64, 2 steps: the code path on a CPU")
    p.add_argument("--seq-len", type=int, default=4096, help="L: tokens per sequence (the step runs 2L)")
    p.add_argument("--batch", type=int, default=1, help="sequences per step")
    p.add_argument("--steps", type=int, default=5, help="timed steps after the compiling one")
    p.add_argument("--cases", nargs="+", choices=tuple(CASES), default=list(CASES))
    p.add_argument("--case-timeout", type=int, default=None,
                   help="seconds per case (its own process) for every case (default: each case's timeout_s)")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 TFLOP/s of one device (MFU)")
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: run one case in this process
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.tiny and args.seq_len == 4096:
        args.seq_len, args.steps = 64, min(args.steps, 2)
    if args.case is not None:
        print("CASE_JSON " + json.dumps(run_case(args.case, args)), flush=True)
        return
    results = run_all(args)  # (this process never starts a backend: the GPU's memory stays the cases')
    env = _versions()
    by = {r["case"]: r for r in results}
    speedup = None
    if all(c in by and "error" not in by[c] for c in ("full_pallas", "full_xla")):
        speedup = by["full_pallas"]["tokens_per_s_per_device"] / by["full_xla"]["tokens_per_s_per_device"]
    result = dict(benchmark="bench_train", preset=args.preset, tiny=args.tiny, seq_len=args.seq_len,
                  batch=args.batch, steps=args.steps,
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  versions=env, cases=results, pallas_over_xla_tokens_per_s=speedup,
                  note="joint objective over [x_t | x_0] (2L tokens per sequence), AdamW with float32 master "
                       "weights, bf16 forward/backward; MFU counts model FLOPs (docs/training.md), not remat"
                       + ("; TINY DRY RUN: a tiny model (off a GPU, Pallas runs in interpret mode): the figures only "
                          "show that the code path runs, they measure nothing" if args.tiny else ""))
    out = args.out or os.path.join(HERE, "results", f"bench_train_{'tiny' if args.tiny else args.preset}_"
                                                    f"{env.get('backend', 'unknown')}.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(table(results))
    if speedup is not None:
        print(f"Pallas / XLA attention tokens/s: {speedup:.2f}x")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
