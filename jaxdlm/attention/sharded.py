"""The Pallas kernels under a multi-device mesh: one kernel call per shard, inside ``shard_map``.

A ``pallas_call`` has no sharding rule, so GSPMD cannot partition it.  Under ``jax.set_mesh`` the Pallas
backend therefore runs :func:`jaxdlm.attention.pallas_gpu.attention` per shard: the batch rows split over the
mesh axes of the logical ``batch`` axis and the heads over those of ``heads`` / ``kv_heads``
(:data:`jaxdlm.sharding.DEFAULT_RULES`: ``(data, fsdp)`` and ``tensor``, the shardings the model already gives
its activations, so no data moves around the call).  The mask metadata (:class:`TokenInfo`, ``[B, T]``) splits
along the batch with the same axes.  Query heads split in contiguous chunks of ``H / n`` and kv heads in chunks
of ``KVH / n`` (``n`` the ``tensor`` size): the chunk of query heads ``i`` reads exactly the kv heads of chunk
``i``, so every GQA group stays on one device and no K/V is replicated.  The backward pass is the transpose of
the same ``shard_map`` (the kernels' ``custom_vjp`` per shard); a stacked KV cache ``[L, B, KVH, S, D]`` splits
by :data:`jaxdlm.sharding.CACHE_AXES` (batch and kv heads), read in place per shard as on one device.

:func:`unsplittable` says when a call cannot be split this way (then :func:`jaxdlm.attention.attention` falls
back to the XLA path, with a warning): the batch does not divide by its mesh axes, the query or kv heads do not
divide by the head axes (``jaxdlm.sharding.check_divisible`` refuses such meshes for the model's weights
anyway), ``heads`` and ``kv_heads`` map to different mesh axes, or a mesh axis of size > 1 is neither a batch
nor a head axis (its devices would hold replicated inputs, whose gradients ``shard_map`` would have to sum).
"""

from __future__ import annotations

import functools
import math

import jax

from jaxdlm import compat
from jaxdlm import sharding as sh
from jaxdlm.attention import pallas_gpu
from jaxdlm.attention.masks import TokenInfo

_Q_AXES = ("batch", None, "heads", None)  # q and the output [B, T, H, D]
_KV_AXES = ("batch", None, "kv_heads", None)  # k, v [B, S, KVH, D]


def split_mesh():
    """The mesh set with ``jax.set_mesh`` when it has a non-manual axis of size > 1 (work to split), else
    ``None`` (no mesh, one device, or inside a ``shard_map`` that already split every axis)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return None
    return mesh if _split_sizes(mesh) else None


def _split_sizes(mesh) -> dict[str, int]:
    manual = set(getattr(mesh, "manual_axes", ()))
    return {a: n for a, n in mesh.shape.items() if n > 1 and a not in manual}


def _specs(mesh, stacked: bool):
    """``(q spec, k/v spec, TokenInfo spec)`` under the sharding rules on ``mesh``."""
    info = sh.logical_spec(("batch", None), mesh=mesh)
    kv = sh.logical_spec(sh.CACHE_AXES if stacked else _KV_AXES, mesh=mesh)
    return sh.logical_spec(_Q_AXES, mesh=mesh), kv, info


def _size(mesh, entry) -> int:
    return math.prod(mesh.shape[a] for a in sh.mesh_axes(entry))


def unsplittable(mesh, q_shape, k_shape, stacked: bool) -> str | None:
    """Why attention of ``q [B, T, H, D]`` over ``k`` (``[B, S, KVH, D]``, or ``[L, B, KVH, S, D]`` when
    ``stacked``) cannot run split by :func:`attention` on ``mesh``; ``None`` when it can."""
    q_spec, kv_spec, _ = _specs(mesh, stacked)
    b, _, h, _ = q_shape
    kvh = k_shape[2]
    heads, kv_heads = sh.mesh_axes(q_spec[2]), sh.mesh_axes(kv_spec[2])
    if heads != kv_heads:
        return (f"query heads split over {heads or 'no axis'} but kv heads over {kv_heads or 'no axis'}; the "
                "sharding rules must map 'heads' and 'kv_heads' to the same mesh axes")
    covered = set(sh.mesh_axes(q_spec[0])) | set(heads)
    stray = sorted(set(_split_sizes(mesh)) - covered)
    if stray:
        return (f"mesh axes {stray} split neither the batch ({sh.mesh_axes(q_spec[0])}) nor the heads "
                f"({heads}); use a mesh whose axes of size > 1 are batch or head axes")
    for what, size, entry in (("batch", b, q_spec[0]), ("num_heads", h, q_spec[2]), ("num_kv_heads", kvh, q_spec[2])):
        n = _size(mesh, entry)
        if size % n:
            return f"{what}={size} does not divide by the {n} shards of mesh axes {sh.mesh_axes(entry)}"
    return None


def attention(q, k, v, q_info: TokenInfo, k_info: TokenInfo, *, scale: float, sliding_window=None,
              layer: int | None = None, config: pallas_gpu.KernelConfig | None = None):
    """:func:`jaxdlm.attention.pallas_gpu.attention` split over the mesh set with ``jax.set_mesh``.

    Same arguments and result as the unsplit call (``q [B, T, H, D]``; ``k, v [B, S, KVH, D]``, or with a Python
    int ``layer`` a stacked cache ``[L, B, KVH, S, D]``; ``q_info`` / ``k_info`` fields ``[B, T]`` / ``[B, S]``)
    -> ``[B, T, H, D]``.  The caller checks :func:`unsplittable` first.
    """
    mesh = jax.sharding.get_abstract_mesh()
    q_spec, kv_spec, info_spec = _specs(mesh, layer is not None)
    local = functools.partial(pallas_gpu.attention, scale=scale, sliding_window=sliding_window, layer=layer,
                              config=config)
    mapped = compat.shard_map(local, in_specs=(q_spec, kv_spec, kv_spec, info_spec, info_spec), out_specs=q_spec)
    return mapped(q, k, v, q_info, k_info)


__all__ = ["attention", "split_mesh", "unsplittable"]
