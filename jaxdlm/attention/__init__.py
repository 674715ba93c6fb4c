"""The one attention API of jaxdlm.

``attention(q, k, v, q_info, k_info, scale=..., sliding_window=None, impl=None, layer=None)``: queries
``[B, T, H, D]`` over keys / values ``[B, S, KVH, D]`` with the mask given by per-token metadata
(:mod:`jaxdlm.attention.masks`).  With ``layer`` the keys / values are a whole stacked KV cache
``[L, B, KVH, S, D]`` (:class:`jaxdlm.cache.KVCache`'s heads-major layout) and layer ``layer`` is read: a Python
int lets every backend read it in place (no copy of the layer's cache), a traced index (a scanned layer loop)
slices it out first.  ``impl`` picks the backend: ``"xla"`` (reference, everywhere) or
``"pallas"`` (Pallas Triton kernels, :mod:`jaxdlm.attention.pallas_gpu`; interpret mode off GPU).  The default comes from the environment
variable ``JAXDLM_ATTENTION`` (``xla`` | ``pallas``); unset, it is ``pallas`` on a GPU (with or without a mesh)
and ``xla`` elsewhere.

Under a multi-device mesh (``jax.set_mesh``) the Pallas kernels run per shard inside ``shard_map``
(:mod:`jaxdlm.attention.sharded`: batch rows over the mesh's batch axes, query and kv heads over ``tensor``, GQA
groups kept together), in the forward, the ``custom_vjp`` backward and over a stacked KV cache.  Where the shapes
do not split that way (a batch or a head count that does not divide by its mesh axes, a mesh axis that is neither
a batch nor a head axis; :func:`jaxdlm.attention.sharded.unsplittable` names the reason) the call falls back to
the XLA path with a warning.
"""

from __future__ import annotations

import os
import warnings

import jax

from jaxdlm.attention import masks, xla
from jaxdlm.attention.masks import CLEAN, NOISY, TokenInfo, allowed

IMPLS = ("xla", "pallas")


def default_impl() -> str:
    """The backend named by ``JAXDLM_ATTENTION``; unset: ``"pallas"`` on a GPU, else ``"xla"``.

    A multi-device mesh does not change the choice: the Pallas kernels run per shard
    (:mod:`jaxdlm.attention.sharded`).  The shapes are only known at the call, so a call whose batch or heads do
    not split over the mesh falls back to ``"xla"`` there (:func:`attention`, with a warning that says why).
    """
    auto = "pallas" if jax.default_backend() == "gpu" else "xla"
    impl = os.environ.get("JAXDLM_ATTENTION", auto).strip().lower() or auto
    if impl not in IMPLS:
        raise ValueError(f"JAXDLM_ATTENTION={impl!r} is not a known attention backend; expected one of {IMPLS}")
    return impl


def attention(q, k, v, q_info: TokenInfo, k_info: TokenInfo, *, scale: float, sliding_window=None, impl=None,
              layer=None):
    """Masked grouped-query attention; see the module docstring.  Returns ``[B, T, H, D]``."""
    impl = impl or default_impl()
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not a known attention backend; expected one of {IMPLS}")
    if layer is not None and not isinstance(layer, int):  # traced index: slice the layer (a one-layer stack)
        k, v, layer = k[layer][None], v[layer][None], 0
    if impl == "pallas":
        from jaxdlm.attention import pallas_gpu, sharded

        kw = dict(scale=scale, sliding_window=sliding_window, layer=layer)
        mesh = sharded.split_mesh()
        if mesh is None:
            return pallas_gpu.attention(q, k, v, q_info, k_info, **kw)
        reason = sharded.unsplittable(mesh, q.shape, k.shape, stacked=layer is not None)
        if reason is None:
            return sharded.attention(q, k, v, q_info, k_info, **kw)
        warnings.warn(f"pallas attention falls back to xla under the mesh {dict(mesh.shape)}: {reason}",
                      stacklevel=2)
    if layer is not None:
        return xla.attention(q, k[layer], v[layer], q_info, k_info, scale=scale, sliding_window=sliding_window,
                             heads_major=True)
    return xla.attention(q, k, v, q_info, k_info, scale=scale, sliding_window=sliding_window)


__all__ = ["attention", "masks", "TokenInfo", "allowed", "CLEAN", "NOISY", "IMPLS", "default_impl"]
