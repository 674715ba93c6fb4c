"""Differences between the jax versions jaxdlm runs on (0.10.2 on CPU CI, 0.11.x on the GPU machines).

Keep every version-dependent import or call here.
"""

from __future__ import annotations

import jax
from jax.experimental import pallas as pl


def triton_compiler_params(num_warps: int | None = None, num_stages: int | None = None):
    """Compiler parameters that pin ``pl.pallas_call`` to the Triton GPU backend.

    ``jax.experimental.pallas.triton.CompilerParams`` (jax >= 0.7); older releases named it
    ``jax.experimental.pallas.gpu.TritonCompilerParams``.  Passing it explicitly matters: the default GPU
    backend of ``pallas_call`` is not the same in every jax version.
    """
    try:
        from jax.experimental.pallas import triton as pltriton
        cls = pltriton.CompilerParams
    except (ImportError, AttributeError):  # pragma: no cover - old jax
        from jax.experimental.pallas import gpu as plgpu_old
        cls = plgpu_old.TritonCompilerParams
    return cls(num_warps=num_warps, num_stages=num_stages)


#: the marker of a squeezed (size-1, dropped) block dimension in ``pl.BlockSpec``
SQUEEZED = getattr(pl, "squeezed", None)


def shard_map(fn, *, in_specs, out_specs):
    """``fn`` mapped over the shards of the mesh set with ``jax.set_mesh`` (the context mesh), without the
    replication check.

    ``jax.shard_map`` (``check_vma=``) where it exists (jax >= 0.7: 0.10, 0.11); older releases had
    ``jax.experimental.shard_map.shard_map`` (``check_rep=``, the mesh passed explicitly).  The check is off
    because with it on, jax 0.10 wants every ``pallas_call`` output shape annotated with the mesh axes it varies
    over; callers mention every mesh axis of size > 1 in the specs of their differentiable inputs, so no input
    is replicated and the transpose needs no implicit sum.
    """
    if hasattr(jax, "shard_map"):
        return jax.shard_map(fn, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import shard_map as old_shard_map  # pragma: no cover - old jax

    return old_shard_map(fn, mesh=jax.sharding.get_abstract_mesh(), in_specs=in_specs,  # pragma: no cover
                         out_specs=out_specs, check_rep=False)


#: the device an abstract lowering targets (compute capability 9.0)
ABSTRACT_H100 = "NVIDIA H100 80GB HBM3"


def _abstract_gpu(device_kind: str, mesh_shape=None):
    """A context naming an abstract GPU for lowering without one: jax 0.11 reads the target architecture
    from the abstract mesh's ``AbstractDevice``; jax 0.10 falls back to compute capability 9.0 by itself.
    ``mesh_shape`` (``{axis: size}``): an abstract mesh of those ``Auto`` axes (no devices needed), the context
    mesh of whatever lowers inside (``shard_map`` without a mesh argument)."""
    import contextlib

    sharding = jax.sharding
    kw = {}
    if hasattr(sharding, "AbstractDevice") and jax.default_backend() != "gpu":
        kw["abstract_device"] = sharding.AbstractDevice(device_kind=device_kind, num_cores=None, platform="gpu")
    if mesh_shape is None:
        if not kw:
            return contextlib.nullcontext()
        return sharding.use_abstract_mesh(sharding.AbstractMesh((1,), ("_",), **kw))
    types = (sharding.AxisType.Auto,) * len(mesh_shape)
    mesh = sharding.AbstractMesh(tuple(mesh_shape.values()), tuple(mesh_shape), axis_types=types, **kw)
    return sharding.use_abstract_mesh(mesh)


def lowered_text_for_platform(fn, *args, platform: str = "cuda", device_kind: str = ABSTRACT_H100,
                              mesh_shape=None) -> str:
    """StableHLO text of ``jax.jit(fn)(*args)`` lowered for ``platform`` without that device.

    Used to lower Pallas kernels for an abstract H100 on a CPU host, which catches primitives the Triton
    backend cannot lower.  ``mesh_shape`` (``{axis: size}``, e.g. ``{"data": 1, "fsdp": 2, "tensor": 2}``):
    lower under an abstract mesh of that many such GPUs (the sharded program of one of them).
    ``jit(...).trace(...).lower(lowering_platforms=...)`` where it exists (jax 0.10 / 0.11), else ``jax.export``
    with the Triton custom call allowed.
    """
    with _abstract_gpu(device_kind, mesh_shape):
        traced = jax.jit(fn).trace(*args)
        try:
            return traced.lower(lowering_platforms=(platform,)).as_text()
        except TypeError:  # pragma: no cover - a jax without lowering_platforms=
            from jax import export
            checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
            return export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(*args).mlir_module()


def detected_cluster() -> tuple[str, int] | None:
    """``(name, process count)`` of the cluster JAX's own auto-detection finds in the environment (SLURM, Open
    MPI, TPU pods, ...; the opt-in mpi4py method excluded), or ``None``.  JAX keeps its cluster list private
    (``jax._src.clusters``); a jax without it detects nothing here."""
    try:
        from jax._src import clusters
        envs = clusters.ClusterEnv._cluster_types
    except (ImportError, AttributeError):  # pragma: no cover - a jax that moved its cluster list
        return None
    for env in envs:
        if not env.opt_in_only_method and env.is_env_present():
            return env.__name__, int(env.get_process_count())
    return None


def use_gloo_cpu_collectives() -> None:
    """Cross-process collectives of the CPU backend through gloo (multi-process CPU runs need them; the option
    only concerns the CPU backend).  Must run before the backends start."""
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, KeyError, ValueError):  # pragma: no cover - a jax where gloo is the only choice
        pass


def wait_for_all_processes(name: str, timeout_s: int) -> None:
    """Blocks until every process of the ``jax.distributed`` job reached the barrier ``name`` (through the
    coordination service, not a device collective).  JAX exposes its client only privately
    (``jax._src.distributed.global_state.client.wait_at_barrier``)."""
    from jax._src import distributed

    distributed.global_state.client.wait_at_barrier(name, int(timeout_s * 1000))


def compiled_memory(compiled) -> dict[str, int]:
    """Per-device bytes of a compiled program (``compiled.memory_analysis()``): ``argument``, ``output``,
    ``alias`` (outputs that reuse donated arguments) and ``temp``.  jax returns a ``CompiledMemoryStats`` object
    (0.10 / 0.11); older releases a list with one per device, or ``None`` where the backend has no analysis
    (then ``ValueError``)."""
    stats = compiled.memory_analysis()
    if isinstance(stats, (list, tuple)):  # pragma: no cover - older jax
        stats = stats[0] if stats else None
    if stats is None:  # pragma: no cover - a backend without memory analysis
        raise ValueError(f"the {jax.default_backend()} backend gives no memory analysis of a compiled program")
    return {name: int(getattr(stats, f"{name}_size_in_bytes")) for name in ("argument", "output", "alias", "temp")}


def compiled_flops(compiled) -> float:
    """XLA's FLOP count of a compiled program (``compiled.cost_analysis()["flops"]``: a dict in jax 0.10 / 0.11,
    a list of one dict per device in older releases)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # pragma: no cover - older jax
        cost = cost[0]
    return float(cost["flops"])


#: XLA options of a program compiled only to be analysed (memory, FLOPs), never run: no backend (LLVM) optimisation,
#: which halves a CPU compilation; buffer assignment and the FLOP count come from the HLO passes before it.
ANALYSIS_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def compile_for_analysis(lowered):
    """``lowered.compile()`` with :data:`ANALYSIS_COMPILER_OPTIONS` (a jax or backend that refuses them: plain)."""
    try:
        return lowered.compile(ANALYSIS_COMPILER_OPTIONS)
    except (TypeError, ValueError, jax.errors.JaxRuntimeError):  # pragma: no cover - options not accepted
        return lowered.compile()
