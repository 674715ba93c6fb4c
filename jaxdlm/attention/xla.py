"""Reference attention in plain jax.numpy: dense mask from :func:`masks.allowed`, fp32 softmax.

Runs everywhere and is the oracle for every kernel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdlm.attention.masks import TokenInfo, allowed


def attention(q, k, v, q_info: TokenInfo, k_info: TokenInfo, *, scale: float, sliding_window=None,
              heads_major: bool = False):
    """Grouped-query attention.

    Args:
      q: ``[B, T, H, D]`` queries (RoPE and any query scale already applied).
      k, v: ``[B, S, KVH, D]`` keys / values, ``H % KVH == 0``; with ``heads_major`` ``[B, KVH, S, D]`` (a layer
        of the KV cache: batch and kv-head dims major, so the matmuls read it without a transpose copy).
      q_info, k_info: mask metadata ``[B, T]`` / ``[B, S]``.
      scale: softmax scale (``head_dim ** -0.5``).

    Returns ``[B, T, H, D]`` in ``q.dtype``.  Scores and softmax are float32; the probabilities are cast
    to ``v.dtype`` before the value product (transformers' eager behaviour).  A query that sees no key
    gets zeros.
    """
    b, t, h, d = q.shape
    kvh = k.shape[1 if heads_major else 2]
    kv = "bksd" if heads_major else "bskd"
    qg = q.reshape(b, t, kvh, h // kvh, d)
    scores = jnp.einsum(f"btkgd,{kv}->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    mask = allowed(q_info, k_info, sliding_window)[:, None, None, :, :]
    scores = jnp.where(mask, scores, -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    p = jnp.exp(scores - row_max)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom > 0, denom, 1.0)
    # output [B, KVH, G, T, D] then one transpose of the (small) result: XLA's CPU backend has no bf16 x bf16 -> f32
    # batched dot that writes the transposed layout directly
    out = jnp.einsum(f"bkgts,{kv}->bkgtd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d).astype(q.dtype)
