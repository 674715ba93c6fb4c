"""Reference attention in plain jax.numpy: dense mask from :func:`masks.allowed`, fp32 softmax.

Runs everywhere and is the oracle for every kernel.
"""

from __future__ import annotations

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
    q_BxTxKxGxD = q.reshape(b, t, kvh, h // kvh, d)
    # Layouts [B, KVH, T, G, S] and [B, KVH, T, G, D] are the natural outputs of XLA's dot (batch dims,
    # then the free dims in operand order): other orders add a transpose of the [T, S] scores per layer,
    # which cost more than the two products on a CPU (7x slower attention at T = S ~ 1000).
    s_BxKxTxGxS = jnp.einsum(f"btkgd,{kv}->bktgs", q_BxTxKxGxD, k, preferred_element_type=jnp.float32) * scale
    mask_Bx1xTx1xS = allowed(q_info, k_info, sliding_window)[:, None, :, None, :]
    s_BxKxTxGxS = jnp.where(mask_Bx1xTx1xS, s_BxKxTxGxS, -jnp.inf)
    max_BxKxTxGx1 = jnp.max(s_BxKxTxGxS, axis=-1, keepdims=True)
    max_BxKxTxGx1 = jnp.where(jnp.isfinite(max_BxKxTxGx1), max_BxKxTxGx1, 0.0)  # a row that sees no key
    p_BxKxTxGxS = jnp.exp(s_BxKxTxGxS - max_BxKxTxGx1)
    denom_BxKxTxGx1 = jnp.sum(p_BxKxTxGxS, axis=-1, keepdims=True)
    p_BxKxTxGxS = p_BxKxTxGxS / jnp.where(denom_BxKxTxGx1 > 0, denom_BxKxTxGx1, 1.0)
    out_BxKxTxGxD = jnp.einsum(f"bktgs,{kv}->bktgd", p_BxKxTxGxS.astype(v.dtype), v,
                               preferred_element_type=jnp.float32)
    return out_BxKxTxGxD.transpose(0, 2, 1, 3, 4).reshape(b, t, h, d).astype(q.dtype)
