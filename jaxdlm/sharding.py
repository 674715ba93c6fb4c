"""SPMD partitioning with jax.sharding: logical axis names, rules, meshes.

Every parameter (and the KV cache) carries logical axis names; a rule table maps logical names to the
mesh axes ``data``, ``fsdp`` and ``tensor``.  Parameters declare their axes where they are created
(:mod:`jaxdlm.model`, read back by :func:`jaxdlm.model.param_layout`), the draft LoRA on its fields
(:class:`jaxdlm.lora.OProjLoRA`), the KV cache here (:data:`CACHE_AXES`); :func:`named_sharding` turns
axes into a sharding.  XLA's GSPMD partitioner does the rest (collectives are
inserted by the compiler, not written by hand).  Inside ``with jax.set_mesh(mesh):`` the model pins the
sharding of its residual stream, KV cache writes and logits (:func:`constrain`); without a mesh those
constraints vanish.

Default rules (Megatron-style tensor parallelism + FSDP):

===========  ===================  =====================================================
logical      mesh axes            meaning
===========  ===================  =====================================================
batch        (data, fsdp)         batch rows of activations and of the KV cache
vocab        tensor               embedding rows and head columns
heads        tensor               query heads (q_proj columns, o_proj rows)
kv_heads     tensor               key/value heads (k/v_proj columns, KV cache)
mlp          tensor               MLP hidden units
embed        fsdp                 the model dimension of every weight matrix
layers       -                    the stacked layer axis (scanned)
===========  ===================  =====================================================
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
from flax import nnx, traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxdlm.config import ModelConfig
from jaxdlm.lora import OProjLoRA
from jaxdlm.quant import SCALE_SUFFIX

MESH_AXES = ("data", "fsdp", "tensor")

DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", "fsdp"),
    ("layers", None),
    ("norm", None),
    ("head_dim", None),
    ("seq", None),
    ("lora", None),
)

CACHE_AXES = ("layers", "batch", "kv_heads", "seq", "head_dim")


def parse_mesh_spec(spec: str | Mapping[str, int]) -> dict[str, int]:
    """``"tensor=2,fsdp=4"`` -> ``{"data": 1, "fsdp": 4, "tensor": 2}`` (missing axes are 1)."""
    if isinstance(spec, str):
        sizes = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, sep, value = part.partition("=")
            name = name.strip()
            if not sep or not value.strip().isdigit():
                raise ValueError(f"mesh spec part {part!r} is not NAME=SIZE (e.g. 'tensor=2,fsdp=4')")
            if name in sizes:
                raise ValueError(f"mesh axis {name!r} is given twice in {spec!r}")
            sizes[name] = int(value)
    else:
        sizes = dict(spec)
    for name, size in sizes.items():
        if name not in MESH_AXES:
            raise ValueError(f"mesh axis {name!r} is unknown; axes are {', '.join(MESH_AXES)}")
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"mesh axis {name}={size!r} must be a positive integer")
    return {a: sizes.get(a, 1) for a in MESH_AXES}


def make_mesh(spec: str | Mapping[str, int] = "", *, devices: Sequence | None = None) -> Mesh:
    """A mesh with axes ``(data, fsdp, tensor)`` from a short spec such as ``"tensor=2,fsdp=4"``.

    Axis sizes must multiply to the number of devices used (all of ``jax.devices()`` by default;
    an empty spec puts every device on ``fsdp``).  Axes are ``Auto`` (GSPMD) typed.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec)
    if not spec:
        sizes["fsdp"] = len(devices)
    total = math.prod(sizes.values())
    if total != len(devices):
        raise ValueError(f"mesh {sizes} needs {total} devices but {len(devices)} are available; "
                         f"make the axis sizes multiply to {len(devices)}")
    shape = tuple(sizes[a] for a in MESH_AXES)
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types, devices=devices)


def mesh_axes(target: str | Sequence[str] | None) -> tuple[str, ...]:
    """A rule's mesh-axis target (or a PartitionSpec entry) as a tuple: ``None`` -> ``()``,
    ``"tensor"`` -> ``("tensor",)``, ``("data", "fsdp")`` unchanged."""
    if target is None:
        return ()
    return (target,) if isinstance(target, str) else tuple(target)


def logical_spec(axes: Sequence[str], rules=DEFAULT_RULES, mesh: Mesh | None = None) -> PartitionSpec:
    """PartitionSpec for logical ``axes`` under ``rules`` (mesh axes of size 1 are dropped)."""
    table = dict(rules)
    out = []
    used: set[str] = set()
    for name in axes:
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise ValueError(f"logical axis {name!r} has no rule; known: {sorted(table)}")
        targets = mesh_axes(table[name])
        if mesh is not None:
            targets = tuple(t for t in targets if mesh.shape.get(t, 1) > 1)
        targets = tuple(t for t in targets if t not in used)  # a mesh axis shards one dim at most
        used.update(targets)
        out.append(None if not targets else (targets[0] if len(targets) == 1 else targets))
    return PartitionSpec(*out)


def named_sharding(axes: Sequence[str], mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
    """The sharding of an array with logical ``axes`` on ``mesh`` (:func:`logical_spec` under ``rules``)."""
    return NamedSharding(mesh, logical_spec(axes, rules, mesh))


def constrain(x, axes: Sequence[str | None], rules=DEFAULT_RULES):
    """``with_sharding_constraint`` by logical axes under the mesh set with ``jax.set_mesh``; a no-op
    when no mesh is set (single-device code is unchanged)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_spec(axes, rules, mesh))


def check_divisible(config: ModelConfig, mesh: Mesh, rules=DEFAULT_RULES, batch: int | None = None,
                    layout: Mapping | None = None):
    """Raises ``ValueError`` naming the mesh axis and sizes when the mesh does not divide the model (with the
    model's ``layout``, :meth:`jaxdlm.Model.layout`: also the quantization scales' groups, ``in / group_size``
    along a weight's sharded input axis)."""
    table = dict(rules)
    dims = {"heads": ("num_attention_heads", config.num_heads), "kv_heads": ("num_key_value_heads", config.num_kv_heads),
            "vocab": ("vocab_size", config.vocab_size), "mlp": ("intermediate_size", config.intermediate_size),
            "embed": ("hidden_size", config.hidden_size)}
    if batch is not None:
        dims["batch"] = ("batch", batch)
    for logical, (field, size) in dims.items():
        targets = mesh_axes(table.get(logical))
        n = math.prod(mesh.shape.get(t, 1) for t in targets)
        if size % n:
            axes = "x".join(f"{t}={mesh.shape.get(t, 1)}" for t in targets)
            raise ValueError(f"mesh axis {axes} (size {n}) does not divide {field}={size}; "
                             f"choose a {'/'.join(targets)} size that divides {size}")
    for path, info in (layout or {}).items():
        if not path[-1].endswith(SCALE_SUFFIX):
            continue
        for size, logical in zip(info.shape, info.axes):
            targets = mesh_axes(table.get(logical)) if logical is not None else ()
            n = math.prod(mesh.shape.get(t, 1) for t in targets)
            if size % n:
                axes = "x".join(f"{t}={mesh.shape.get(t, 1)}" for t in targets)
                raise ValueError(f"mesh axis {axes} (size {n}) does not divide the {size} quantization scale groups "
                                 f"of {'/'.join(path)} along {logical}; choose a {'/'.join(targets)} size that "
                                 f"divides {size}")


def param_shardings(model, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedShardings for ``model.params`` (an ``nnx.State`` with NamedSharding leaves), from the logical axes each
    parameter declares (:meth:`jaxdlm.Model.layout`)."""
    layout = model.layout()
    check_divisible(model.config, mesh, rules, layout=layout)
    shardings = traverse_util.unflatten_dict({path: named_sharding(info.axes, mesh, rules)
                                              for path, info in layout.items()})
    target = jax.tree.map(lambda x: x, model.params)
    nnx.replace_by_pure_dict(target, shardings)
    return target


def sharding_for_path(layout: Mapping, mesh: Mesh, rules=DEFAULT_RULES):
    """A function ``parameter path tuple -> NamedSharding`` for the parameters of ``layout`` (a model's
    :meth:`~jaxdlm.Model.layout`, or :func:`jaxdlm.model.param_layout` of a config; LoRA leaves are
    ``("lora", "a")`` ...), the form :func:`jaxdlm.load` takes to restore straight into the target shardings."""
    lora_axes = OProjLoRA.logical_axes()

    def fn(path: tuple[str, ...]) -> NamedSharding:
        if len(path) == 2 and path[0] == "lora" and path[1] in lora_axes:
            return named_sharding(lora_axes[path[1]], mesh, rules)
        if path not in layout:
            known = sorted("/".join(p) for p in layout) + [f"lora/{name}" for name in lora_axes]
            raise ValueError(f"{'/'.join(path)} is not a parameter of this model; known: {', '.join(known)}")
        return named_sharding(layout[path].axes, mesh, rules)

    return fn


def lora_shardings(mesh: Mesh, rules=DEFAULT_RULES) -> OProjLoRA:
    """NamedShardings for an :class:`~jaxdlm.lora.OProjLoRA` (an ``OProjLoRA`` with sharding leaves)."""
    return OProjLoRA(**{name: named_sharding(axes, mesh, rules) for name, axes in OProjLoRA.logical_axes().items()})


def cache_sharding(mesh: Mesh, rules=DEFAULT_RULES):
    """NamedShardings for a :class:`~jaxdlm.cache.KVCache` (k, v over batch and kv heads; length over batch)."""
    from jaxdlm.cache import KVCache

    kv = named_sharding(CACHE_AXES, mesh, rules)
    return KVCache(kv, kv, named_sharding(("batch",), mesh, rules))


def batch_sharding(mesh: Mesh, ndim: int = 2, rules=DEFAULT_RULES) -> NamedSharding:
    """Sharding of a ``[B, ...]`` activation or token array: rows over ``batch``'s mesh axes."""
    return named_sharding(("batch",) + ("seq",) * (ndim - 1), mesh, rules)


def batch_size_divisor(mesh: Mesh, rules=DEFAULT_RULES) -> int:
    """How many ways the ``batch`` logical axis is split on ``mesh`` (batch sizes must be multiples)."""
    return math.prod(mesh.shape[a] for a in mesh_axes(logical_spec(("batch",), rules, mesh)[0]))


def shard_model(model, mesh: Mesh, rules=DEFAULT_RULES):
    """A copy of ``model`` with parameters (and LoRA) placed on ``mesh`` by ``rules``."""
    params = jax.device_put(model.params, param_shardings(model, mesh, rules))
    lora = None if model.lora is None else jax.device_put(model.lora, lora_shardings(mesh, rules))
    return model.replace(params=params, lora=lora, mesh=mesh)
