"""The one attention API of jaxdlm.

``attention(q, k, v, q_info, k_info, scale=..., sliding_window=None, impl=None, layer=None)``: queries
``[B, T, H, D]`` over keys / values ``[B, S, KVH, D]`` with the mask given by per-token metadata
(:mod:`jaxdlm.attention.masks`).  With ``layer`` the keys / values are a whole stacked KV cache
``[L, B, KVH, S, D]`` (:class:`jaxdlm.cache.KVCache`'s heads-major layout) and layer ``layer`` is read: a Python
int lets every backend read it in place (no copy of the layer's cache), a traced index (a scanned layer loop)
slices it out first.  ``impl`` picks the backend: ``"xla"`` (reference, everywhere) or
``"pallas"`` (Pallas Triton kernels, :mod:`jaxdlm.attention.pallas_gpu`; interpret mode off GPU).  The default comes from the environment
variable ``JAXDLM_ATTENTION`` (``xla`` | ``pallas``); unset, it is ``pallas`` on a GPU and ``xla`` elsewhere.
"""

from __future__ import annotations

import math
import os

import jax

from jaxdlm.attention import masks, xla
from jaxdlm.attention.masks import CLEAN, NOISY, TokenInfo, allowed

IMPLS = ("xla", "pallas")


def _under_multi_device_mesh() -> bool:
    mesh = jax.sharding.get_abstract_mesh()
    return mesh is not None and not mesh.empty and math.prod(mesh.shape.values()) > 1


def default_impl() -> str:
    """The backend named by ``JAXDLM_ATTENTION``; unset: ``"pallas"`` on a GPU, else ``"xla"``.

    Under a multi-device mesh (``jax.set_mesh``) the automatic choice is ``"xla"``: ``pallas_call`` has
    no sharding rule, so GSPMD could not partition it.
    """
    auto = "pallas" if jax.default_backend() == "gpu" and not _under_multi_device_mesh() else "xla"
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
    if impl == "xla":
        if layer is not None:
            return xla.attention(q, k[layer], v[layer], q_info, k_info, scale=scale, sliding_window=sliding_window,
                                 heads_major=True)
        return xla.attention(q, k, v, q_info, k_info, scale=scale, sliding_window=sliding_window)
    from jaxdlm.attention import pallas_gpu

    return pallas_gpu.attention(q, k, v, q_info, k_info, scale=scale, sliding_window=sliding_window, layer=layer)


__all__ = ["attention", "masks", "TokenInfo", "allowed", "CLEAN", "NOISY", "IMPLS", "default_impl"]
