"""Training-step benchmark (issue 22): tokens/s per device, MFU and the memory plan of the real train step.

    python experiments/bench_train.py                    # one GPU: 3B / 8B-shaped NLD, L = 4096, bf16, remat per layer
    python experiments/bench_train.py --tiny             # the same code path on a tiny model (CPU dry-run)
    python experiments/bench_train.py --cases full_xla   # some cases only

Every case is one ``jaxdlm train`` experiment built from a config dict (:func:`case_config`: the joint objective
over ``[x_t | x_0]``, AdamW, float32 master weights and a bf16 forward / backward, ``[model] remat``) and runs in
its own process, so that one running out of memory (or past its time limit) is recorded and the others still
run.  A case:

* builds the run's state and train step the way ``jaxdlm train`` does (:func:`full_step`: ``run._full_experiment``;
  :func:`adapter_step`: ``run._adapter_steps``) and compiles the step once, from abstract arguments
  (``compile_s``);
* reads the ``--check`` memory plan (per device, the byte split of :mod:`jaxdlm.training.plan`) from that compiled
  program; where it does not fit the device (``fits`` false) the case records the plan and ``skipped`` and stops
  there, before any weight is drawn;
* otherwise places the state (and an adapter case's base), runs the compiled step once (``first_step_s``) and
  times ``--steps`` more on random token rows;
* reports tokens/s per device, MFU against the device's dense bf16 peak (:mod:`jaxdlm.training.speed`; null on a
  CPU unless ``--peak-tflops``), the model FLOPs per token and the device's peak memory in use where it reports one.

Cases (:data:`CASES`, each with its own time limit): the 3B full fine-tune with Pallas (flash) attention inside
the step and the same with XLA attention (``JAXDLM_ATTENTION``); the 3B adapter fine-tune (rank 16 on all seven
projections, bf16 base), also with Pallas and with XLA attention; the 8B adapter fine-tune with an int8 base, Pallas
attention.  Every plan is also read against one 80 GB H100 (``fits_80gb``, :func:`limit_80gb`).  The XLA-attention
3B full fine-tune is not expected to fit an 80 GB GPU (18 bytes per parameter, then the ``[heads, 2L, 2L]`` float32
scores), so ``pallas_over_xla_tokens_per_s`` is the adapter pair's ratio and
``pallas_over_xla_tokens_per_s_full`` the full pair's, each ``null`` unless both cases ran.  An adapter case draws
its random base directly in its ``base_dtype`` layout (:func:`random_params`) and counts an adapter step's model
FLOPs (``speed.adapter_flops_per_token``).
The versions are read first, and the result file is rewritten (atomically) after each case, so that a run killed
part-way keeps the cases done.
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
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

#: The adapter of the adapter cases: NVIDIA's SFT LoRA recipe (docs/training.md section 3), rank 16 on all seven
#: projections.
ADAPTER = {"enabled": True, "rank": 16, "alpha": 32.0,
           "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}

#: name -> what the case changes: the attention backend inside the step, ``[model] remat``, the model (``preset``,
#: default ``--preset``), the ``[adapter]`` section (an adapter fine-tune of a frozen base in its ``base_dtype``)
#: and ``timeout_s``, the case's own time limit (its process).  In this order: the 3B full pair, the 3B adapter
#: pair (Pallas against XLA attention: the pair that fits an 80 GB GPU, where XLA attention's ``[32, 2L, 2L]``
#: float32 scores come on top of a 3B full fine-tune's 18 bytes per parameter), then the 8B adapter.  The limits
#: and :data:`VERSIONS_TIMEOUT_S` add up to :data:`BUDGET_S`.
CASES = {
    "full_pallas": {"attention": "pallas", "remat": "full", "timeout_s": 90},
    "full_xla": {"attention": "xla", "remat": "full", "timeout_s": 70},
    "adapter3b_pallas": {"attention": "pallas", "remat": "full", "timeout_s": 70,
                         "adapter": dict(ADAPTER, base_dtype="bfloat16")},
    "adapter3b_xla": {"attention": "xla", "remat": "full", "timeout_s": 65,
                      "adapter": dict(ADAPTER, base_dtype="bfloat16")},
    "adapter8b_int8": {"attention": "pallas", "remat": "full", "timeout_s": 85, "preset": "8b",
                       "adapter": dict(ADAPTER, base_dtype="int8")},
}
#: Seconds the versions (device, jax, flax, python) may take, read in a child process before the cases.
VERSIONS_TIMEOUT_S = 30
#: Seconds of every case's limit plus :data:`VERSIONS_TIMEOUT_S`: ``gpu_session.sh train`` gives the benchmark 30 s
#: more than this (the parent's own start and writes), and its whole part stays under 8 minutes.
BUDGET_S = VERSIONS_TIMEOUT_S + sum(c["timeout_s"] for c in CASES.values())
#: The (Pallas, XLA) case pairs whose tokens/s ratio the result reports: ``pallas_over_xla_tokens_per_s`` (the 3B
#: adapter pair) and ``pallas_over_xla_tokens_per_s_full`` (the 3B full pair, where both ran).
PAIRS = {"pallas_over_xla_tokens_per_s": ("adapter3b_pallas", "adapter3b_xla"),
         "pallas_over_xla_tokens_per_s_full": ("full_pallas", "full_xla")}
#: What an 80 GB H100 gives JAX at ``XLA_PYTHON_CLIENT_MEM_FRACTION=0.95`` (``gpu_session.sh``), in bytes: the card
#: shows JAX about 79.1 GiB (``bytes_limit`` at a fraction of 1; its 80 GB less what the driver and CUDA context
#: keep), not 80 GiB.  The plans are read against it (``fits_80gb``) when the benchmark runs on another GPU; on an
#: 80 GB card the device's own ``bytes_limit`` is used (:func:`limit_80gb`).
H100_80GB_LIMIT = int(0.95 * 79.1 * 2**30)


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


class CaseStep(NamedTuple):
    """A case's jitted train step with the abstract layout of its arguments (nothing on the devices yet)."""

    step: Callable  # jitted: (state, *extra, batch [A, B, L]) -> (state, metrics)
    state: Any  # the train state's ShapeDtypeStructs, shardings set
    extra: tuple  # the other arguments' ShapeDtypeStructs: (base params,) for an adapter step, () for a full one
    params_bytes: int  # per device: the trained params (an adapter step: plus the frozen base)
    optimizer_bytes: int  # per device: the optimizer state
    init: Callable  # () -> (state, extra) on the devices, in those shardings
    flops_per_token: float | None  # model FLOPs per token (None where speed.py gives no count)


def full_step(cfg, mcfg, mesh) -> CaseStep:
    """The full fine-tune's step and state as ``jaxdlm train`` builds them (``run._full_experiment``)."""
    from jaxdlm.training import plan, run

    exp = run._full_experiment(cfg, mcfg, None, None, mesh)
    return CaseStep(exp.run_step, exp.abstract, (), plan._shard_bytes(exp.abstract.params),
                    plan._shard_bytes(exp.abstract.opt_state), lambda: (exp.init(), ()), exp.flops_per_token)


def adapter_step(cfg, mcfg, mesh) -> CaseStep:
    """The adapter fine-tune's step and state as ``jaxdlm train`` builds them (``run._adapter_steps``, the adapter
    step of the memory plan too), on a random base made directly in its ``adapter.base_dtype`` layout and shardings
    (``training.adapter.abstract_base``; :func:`random_params`): ``jaxdlm train`` would draw a float32 base and
    quantize it on the host, minutes and a float32 copy's memory for the 8B shapes, which the step's speed and
    memory do not depend on."""
    from jaxdlm import sharding as sh
    from jaxdlm.training import adapter as tune
    from jaxdlm.training import plan, run, speed

    acfg = cfg.adapter.adapter_config()
    base = tune.abstract_base(mcfg, acfg, cfg.adapter.base_dtype)
    base_shardings = sh.param_shardings(base, mesh)
    base_params = run._placed(base.params, base_shardings)
    steps = run._adapter_steps(base.graphdef, mcfg, acfg, cfg.optim, cfg.objective, mesh, cfg.model.remat,
                               cfg.run.seed)
    state = run._placed(steps.shapes, steps.shardings)

    def init():
        return steps.init(), (random_params(base.params, base_shardings, cfg.model.seed),)

    return CaseStep(steps.train_step, state, (base_params,),
                    plan._shard_bytes(base_params) + plan._shard_bytes(state.params),
                    plan._shard_bytes(state.opt_state), init,
                    speed.adapter_flops_per_token(mcfg, cfg.objective, cfg.data.seq_len, acfg))


def limit_80gb(device_kind: str, bytes_limit: int | None) -> int:
    """Bytes per device that an 80 GB H100 gives JAX: this device's ``bytes_limit`` on an 80 GB card, else
    :data:`H100_80GB_LIMIT`."""
    return bytes_limit if bytes_limit is not None and "80GB" in device_kind.replace(" ", "") else H100_80GB_LIMIT


def run_case(name: str, args) -> dict:
    """One case in this process (``JAXDLM_ATTENTION`` already set by the parent): the figures.  The step compiles
    once, from abstract arguments; its memory plan comes from that compiled program, and a plan that does not fit
    the device is recorded (``skipped``) without drawing the weights or running the step."""
    import jax

    from jaxdlm.training import config as config_lib
    from jaxdlm.training import plan, run, speed

    case = CASES[name]
    with tempfile.TemporaryDirectory() as folder:
        cfg = case_config(case, args, folder)
        mcfg = config_lib.model_config(cfg)
        mesh = run.run_mesh(cfg, mcfg)
        cs = (adapter_step if cfg.adapter.enabled else full_step)(cfg, mcfg, mesh)
        batch_abstract = plan._abstract_batch(mesh, (cfg.accum, cfg.batch_size, cfg.data.seq_len))
        with jax.set_mesh(mesh):
            t0 = time.perf_counter()
            compiled = cs.step.lower(cs.state, *cs.extra, batch_abstract).compile()
            compile_s = time.perf_counter() - t0
        mem = plan.plan_of({"params": cs.params_bytes, "optimizer": cs.optimizer_bytes,
                            **plan.compiled_bytes(compiled)}, mesh.size)
        kind = jax.devices()[0].device_kind
        fits_80gb = None if args.tiny else mem["memory"]["total"] <= limit_80gb(kind, mem["device_memory"])
        head = dict(case=name, **case, preset_used="tiny" if args.tiny else case.get("preset", args.preset),
                    device_kind=kind, fits_80gb=fits_80gb, devices=mesh.size, batch=cfg.batch_size,
                    seq_len=cfg.data.seq_len, compute_dtype=cfg.compute_dtype, memory_plan=mem, compile_s=compile_s)
        if mem["fits"] is False:
            return dict(head, skipped=f"the memory plan does not fit: {plan.describe(mem)}")
        data = run.load_dataset(cfg, cfg.data.train, mcfg, 0)
        state, extra = cs.init()
        with jax.set_mesh(mesh):
            times, losses = [], []
            for s in range(args.steps + 1):  # step 0: the first call (warm-up), not timed with the others
                batch = run._train_batch(data, cfg, mesh, s)
                jax.block_until_ready(batch)
                t0 = time.perf_counter()
                state, metrics = compiled(state, *extra, batch)
                jax.block_until_ready(metrics)
                times.append(time.perf_counter() - t0)
                losses.append(float(metrics["loss"]))
        step_s = float(np.median(times[1:]))
    tokens = cfg.batch_size * cfg.data.seq_len
    tps = tokens / step_s / mesh.size
    peak = speed.peak_tflops(kind, args.peak_tflops)
    stats = jax.local_devices()[0].memory_stats() or {}
    return dict(head, tokens_per_step=tokens, step_s=step_s, step_s_all=[round(t, 6) for t in times[1:]],
                first_step_s=times[0], tokens_per_s_per_device=tps, flops_per_token=cs.flops_per_token,
                peak_tflops=peak, mfu=None if peak is None or cs.flops_per_token is None
                else tps * cs.flops_per_token / (peak * 1e12),
                peak_bytes_in_use=stats.get("peak_bytes_in_use"), first_loss=losses[0], last_loss=losses[-1])


def run_cases(args) -> Iterator[dict]:
    """Every selected case in its own process with its own time limit, each record as soon as it is in; a failure
    is recorded (``error``), not raised."""
    for name in args.cases:
        env = dict(os.environ, JAXDLM_ATTENTION=CASES[name]["attention"])
        cmd = [sys.executable, os.path.abspath(__file__), "--case", name, *_passed_on(args)]
        timeout = args.case_timeout or CASES[name]["timeout_s"]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
            lines = [l for l in proc.stdout.splitlines() if l.startswith("CASE_JSON ")]
            if proc.returncode == 0 and lines:
                record = json.loads(lines[-1][len("CASE_JSON "):])
            else:
                record = dict(case=name, **CASES[name], error=f"exit {proc.returncode}",
                              stderr_tail=proc.stderr[-3000:])
        except subprocess.TimeoutExpired as e:
            record = dict(case=name, **CASES[name], error=f"timed out after {timeout} s",
                          stderr_tail=(e.stderr or b"")[-3000:].decode("utf-8", "replace")
                          if isinstance(e.stderr, bytes) else (e.stderr or "")[-3000:])
        record["wall_s"] = time.perf_counter() - t0
        print(json.dumps({k: v for k, v in record.items() if k not in ("step_s_all", "stderr_tail")}), flush=True)
        if "error" in record:
            print(record["stderr_tail"][-1500:], file=sys.stderr, flush=True)
        yield record


def ratios(results: list[dict]) -> dict:
    """:data:`PAIRS`: Pallas over XLA tokens/s of each pair where both cases ran (else ``None``)."""
    ran = {r["case"]: r["tokens_per_s_per_device"] for r in results if "tokens_per_s_per_device" in r}
    return {key: ran[a] / ran[b] if a in ran and b in ran else None for key, (a, b) in PAIRS.items()}


def write_json(path: str, obj) -> None:
    """``obj`` as JSON at ``path``, atomically (a temporary file beside it, then ``os.replace``): a reader, or a
    benchmark killed while writing, sees the previous complete file or the new one."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def _passed_on(args) -> list[str]:
    out = ["--preset", args.preset, "--seq-len", str(args.seq_len), "--batch", str(args.batch),
           "--steps", str(args.steps)]
    if args.tiny:
        out.append("--tiny")
    if args.peak_tflops is not None:
        out += ["--peak-tflops", str(args.peak_tflops)]
    return out


def _versions() -> dict:
    """``bench_generate.versions()`` (device, jax, flax, python) read in a child process (which has left the
    device by the time the cases start)."""
    code = "import json, bench_generate; print(json.dumps(bench_generate.versions()))"
    try:
        proc = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True,
                              timeout=VERSIONS_TIMEOUT_S)
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, IndexError, json.JSONDecodeError) as e:
        return {"error": f"versions not read: {e!r}"}


def table(results: list[dict]) -> str:
    lines = ["| case | model | attention | remat | tokens/s/device | MFU | step s | compile s | plan total GiB | "
             "peak in use GiB | fits 80 GB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    gib = lambda b: "" if b is None else f"{b / 2**30:.2f}"  # noqa: E731
    for r in results:
        model = r.get("preset_used", r.get("preset", "")) + (f" {r['adapter']['base_dtype']} base + adapter"
                                                              if "adapter" in r else " full")
        row = f"| {r['case']} | {model} | {r['attention']} | {r['remat']} | "
        if "error" in r:
            lines.append(row + f"{r['error']} | | | | | | |")
            continue
        fits = {True: "yes", False: "NO", None: ""}[r.get("fits_80gb")]
        plan_total = gib(r["memory_plan"]["memory"]["total"])
        if "skipped" in r:
            lines.append(row + f"skipped: plan does not fit | | | {r['compile_s']:.1f} | {plan_total} | | {fits} |")
            continue
        mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
        lines.append(row + f"{r['tokens_per_s_per_device']:.4g} | {mfu} | {r['step_s']:.4g} | {r['compile_s']:.1f} | "
                     f"{plan_total} | {gib(r['peak_bytes_in_use'])} | {fits} |")
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
    env = _versions()  # before the cases: a killed run keeps them (its child has left the device when they start)
    out = args.out or os.path.join(HERE, "results", f"bench_train_{'tiny' if args.tiny else args.preset}_"
                                                    f"{env.get('backend', 'unknown')}.json")
    result = dict(benchmark="bench_train", preset=args.preset, tiny=args.tiny, seq_len=args.seq_len,
                  batch=args.batch, steps=args.steps,
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  versions=env, cases=[], **ratios([]),
                  note="joint objective over [x_t | x_0] (2L tokens per sequence), AdamW with float32 master "
                       "weights, bf16 forward/backward; MFU counts model FLOPs (docs/training.md), not remat; "
                       "written again after each case (cases not listed did not finish)"
                       + ("; TINY DRY RUN: a tiny model (off a GPU, Pallas runs in interpret mode): the figures only "
                          "show that the code path runs, they measure nothing" if args.tiny else ""))
    write_json(out, result)
    for record in run_cases(args):  # (this process never starts a backend: the GPU's memory stays the cases')
        result["cases"].append(record)
        result.update(ratios(result["cases"]))
        write_json(out, result)
    print(table(result["cases"]))
    for key, (a, b) in PAIRS.items():
        if result[key] is not None:
            print(f"Pallas / XLA attention tokens/s, {a} / {b}: {result[key]:.2f}x")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
