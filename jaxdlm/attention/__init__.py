"""The one attention API of jaxdlm.

``attention(q, k, v, q_info, k_info, scale=..., sliding_window=None, impl=None)``: queries
``[B, T, H, D]`` over keys / values ``[B, S, KVH, D]`` with the mask given by per-token metadata
(:mod:`jaxdlm.attention.masks`).  ``impl`` picks the backend: ``"xla"`` (reference, everywhere); the
default comes from the environment variable ``JAXDLM_ATTENTION`` (``xla`` unless set).
"""

from __future__ import annotations

import os

from jaxdlm.attention import masks, xla
from jaxdlm.attention.masks import CLEAN, NOISY, TokenInfo, allowed

IMPLS = ("xla",)


def default_impl() -> str:
    """The backend named by ``JAXDLM_ATTENTION`` (default ``"xla"``)."""
    impl = os.environ.get("JAXDLM_ATTENTION", "xla").strip().lower() or "xla"
    if impl not in IMPLS:
        raise ValueError(f"JAXDLM_ATTENTION={impl!r} is not a known attention backend; expected one of {IMPLS}")
    return impl


def attention(q, k, v, q_info: TokenInfo, k_info: TokenInfo, *, scale: float, sliding_window=None, impl=None):
    """Masked grouped-query attention; see the module docstring.  Returns ``[B, T, H, D]``."""
    impl = impl or default_impl()
    if impl == "xla":
        return xla.attention(q, k, v, q_info, k_info, scale=scale, sliding_window=sliding_window)
    raise ValueError(f"impl={impl!r} is not a known attention backend; expected one of {IMPLS}")


__all__ = ["attention", "masks", "TokenInfo", "allowed", "CLEAN", "NOISY", "IMPLS", "default_impl"]
