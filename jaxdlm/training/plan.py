"""The memory plan of ``jaxdlm train CONFIG --check``: the run's train step compiled from abstract shapes (no data
read, no weights), on the run's mesh and shardings, and the per-device bytes XLA assigns it.

:func:`memory_plan` returns the JSON object ``--check --json`` prints::

    {"devices": 8, "memory": {"params": B, "optimizer": B, "temporaries": B, "total": B},
     "device_memory": B or null, "fits": true | false | null}

``params`` and ``optimizer`` are this device's shards of the float32 master parameters and of the optimizer
state (an ``[adapter]`` run: the frozen base in its ``base_dtype`` plus the float32 adapter, and the adapter's
optimizer state); ``temporaries`` is XLA's scratch space of the step (activations kept for the backward pass,
gradients, the bf16 copy); ``total`` is every live byte of the step: arguments + outputs - outputs that reuse
donated arguments + temporaries.  ``device_memory`` is the device's ``bytes_limit`` (``null`` where the backend does not
report one, e.g. a CPU) unless given; ``fits`` is ``total <= device_memory`` (``null`` when that is unknown).
"""

from __future__ import annotations

import functools
import math

PARTS = ("params", "optimizer", "temporaries")


def _shard_bytes(tree) -> int:
    """Bytes of one device's shard of every ``ShapeDtypeStruct`` leaf of ``tree`` (``.sharding`` set)."""
    import jax
    import numpy as np

    return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def device_memory_limit() -> int | None:
    """``bytes_limit`` of the first local device's ``memory_stats()``, or ``None`` where it gives none."""
    import jax

    try:
        stats = jax.local_devices()[0].memory_stats()
    except (NotImplementedError, RuntimeError):  # pragma: no cover - a backend without memory stats
        stats = None
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def memory_plan(cfg, *, device_memory: int | None = None) -> dict:
    """The memory plan of the run ``cfg`` (a validated :class:`~jaxdlm.training.config.TrainConfig`: a full-parameter
    or an ``[adapter]`` run) on this process's devices (see the module docstring); ``device_memory``: bytes per
    device to plan against instead of the device's own limit."""
    from jaxdlm.training import config as config_lib
    from jaxdlm.training import run

    if cfg.lora.enabled:
        raise ValueError("the memory plan covers full-parameter and [adapter] runs; lora.enabled=true trains the "
                         "draft LoRA of a frozen base (its memory is the base model's parameters plus a small adapter)")
    mcfg = config_lib.model_config(cfg)
    mesh = run.run_mesh(cfg, mcfg)
    batch_shape = (cfg.accum, cfg.batch_size, cfg.data.seq_len)
    if cfg.adapter.enabled:
        memory = _adapter_step_memory(mcfg, cfg.adapter.adapter_config(), cfg.adapter.base_dtype, cfg.optim,
                                      cfg.objective, mesh, cfg.model.remat, batch_shape)
    else:
        memory = _step_memory(mcfg, cfg.optim, cfg.objective, cfg.compute_dtype, mesh, cfg.model.remat, batch_shape)
    return plan_of(memory, mesh.size, device_memory)


def plan_of(memory: dict, devices: int, device_memory: int | None = None) -> dict:
    """The plan object (module docstring) of the per-device bytes ``memory`` (``{"params", "optimizer",
    "temporaries", "total"}``) on ``devices`` devices, against ``device_memory`` or the device's own limit."""
    limit = device_memory if device_memory is not None else device_memory_limit()
    return {"devices": devices, "memory": dict(memory), "device_memory": limit,
            "fits": None if limit is None else memory["total"] <= limit}


def _abstract_batch(mesh, batch_shape) -> dict:
    """``{"tokens", "loss_mask"}`` ``ShapeDtypeStruct``s of one ``[A, B, L]`` step batch, rows over the batch
    shards of ``mesh``."""
    import jax
    import jax.numpy as jnp

    from jaxdlm import sharding as sh
    from jaxdlm.training import run

    where = run._with_leading_axis(sh.batch_sharding(mesh, 2))
    return {"tokens": jax.ShapeDtypeStruct(batch_shape, jnp.int32, sharding=where),
            "loss_mask": jax.ShapeDtypeStruct(batch_shape, jnp.bool_, sharding=where)}


def compiled_bytes(compiled) -> dict:
    """``{"temporaries", "total"}`` bytes per device of a compiled step (``compiled.memory_analysis()``): ``total``
    is arguments + outputs - outputs that reuse donated arguments + temporaries."""
    from jaxdlm import compat

    mem = compat.compiled_memory(compiled)
    return {"temporaries": mem["temp"], "total": mem["argument"] + mem["output"] - mem["alias"] + mem["temp"]}


def _compiled_bytes(mesh, lowered_fn) -> dict:
    """:func:`compiled_bytes` of the step ``lowered_fn()`` lowers (under ``mesh``), compiled for analysis."""
    import jax

    from jaxdlm import compat

    with jax.set_mesh(mesh):
        return compiled_bytes(compat.compile_for_analysis(lowered_fn()))


@functools.lru_cache(maxsize=8)
def _step_memory(mcfg, optim_cfg, loss_cfg, compute_dtype: str, mesh, remat: str, batch_shape) -> dict:
    """``{"params", "optimizer", "temporaries", "total"}`` bytes per device of the run's train step
    (:func:`jaxdlm.training.run._steps`) on a ``[A, B, L]`` batch, compiled from abstract shapes (cached: the
    same plan against another device memory compiles nothing)."""
    from jaxdlm.training import run

    _, train_step, _, shapes, shardings = run._steps(mcfg, optim_cfg, loss_cfg, compute_dtype, mesh, remat)
    state = run._placed(shapes, shardings)
    batch = _abstract_batch(mesh, batch_shape)
    return {"params": _shard_bytes(state.params), "optimizer": _shard_bytes(state.opt_state),
            **_compiled_bytes(mesh, lambda: train_step.lower(state, batch))}


@functools.lru_cache(maxsize=8)
def _adapter_step_memory(mcfg, acfg, base_dtype: str, optim_cfg, loss_cfg, mesh, remat: str, batch_shape) -> dict:
    """The bytes of :func:`_step_memory` for an adapter run's step (:func:`jaxdlm.training.run._adapter_steps`):
    the base in ``base_dtype`` with the adapter ``acfg`` added
    (:func:`jaxdlm.training.adapter.abstract_base`: no weights loaded, no checkpoint read), sharded as a run shards
    it.  ``params``: the base's shards plus the float32 adapter's; ``optimizer``: the adapter's optimizer state."""
    from jaxdlm import sharding as sh
    from jaxdlm.training import adapter as tune
    from jaxdlm.training import run

    base = tune.abstract_base(mcfg, acfg, base_dtype)
    base_params = run._placed(base.params, sh.param_shardings(base, mesh))
    steps = run._adapter_steps(base.graphdef, mcfg, acfg, optim_cfg, loss_cfg, mesh, remat, 0)
    state = run._placed(steps.shapes, steps.shardings)
    batch = _abstract_batch(mesh, batch_shape)
    return {"params": _shard_bytes(base_params) + _shard_bytes(state.params),
            "optimizer": _shard_bytes(state.opt_state),
            **_compiled_bytes(mesh, lambda: steps.train_step.lower(state, base_params, batch))}


def _bytes_text(n: int) -> str:
    """Bytes for people, in the largest binary unit that keeps the figure >= 1 (B, KiB, MiB, GiB)."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def describe(plan: dict) -> str:
    """One line of the plan for people."""
    m, limit = plan["memory"], plan["device_memory"]
    parts = ", ".join(f"{k} {_bytes_text(m[k])}" for k in PARTS)
    against = "device memory unknown" if limit is None else f"{_bytes_text(limit)} device memory"
    verdict = {True: "fits", False: "does NOT fit", None: "fit unknown"}[plan["fits"]]
    return (f"memory plan per device ({plan['devices']} devices): {parts}; total {_bytes_text(m['total'])} of {against}: "
            f"{verdict}")


def advice(plan: dict, cfg) -> str:
    """The one line a plan that does not fit stops with: the biggest part and what to change."""
    m = plan["memory"]
    biggest = max(PARTS, key=lambda k: m[k])
    if biggest == "temporaries":
        todo = []
        if cfg.model.remat != "full":
            todo.append(f'set [model] remat = "full" (now "{cfg.model.remat}")')
        todo.append(f"lower optim.batch_size={cfg.batch_size} and raise optim.accum={cfg.accum} to keep the "
                    "tokens per step")
    else:
        todo = []
        if cfg.adapter.enabled and biggest == "params" and cfg.adapter.base_dtype != "int4":
            smaller = "int8" if cfg.adapter.base_dtype in ("float32", "bfloat16") else "int4"
            todo.append(f'set adapter.base_dtype = "{smaller}" (now "{cfg.adapter.base_dtype}")')
        todo.append(f"raise mesh.fsdp to shard the {biggest} over more devices (now {plan['devices']} devices, "
                    f"mesh data={cfg.mesh.data} fsdp={cfg.mesh.fsdp} tensor={cfg.mesh.tensor})")
    return (f"the run does not fit: {_bytes_text(m['total'])} per device > {_bytes_text(plan['device_memory'])} device memory; "
            f"the biggest part is {biggest} ({_bytes_text(m[biggest])}): " + ", or ".join(todo))
