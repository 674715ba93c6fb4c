"""Noise schedules for block-diffusion training (docs/training.md).

Every function is jittable and keyed by a JAX PRNG key.  Shapes: ``B`` batch, ``L`` sequence length.
Each returns ``Noised(x_t, masked, weight)``:

* ``x_t``    ``int32 [B, L]``: the clean tokens with the masked positions replaced by ``mask_id``;
* ``masked`` ``bool [B, L]``: which positions were masked (these carry the diffusion loss);
* ``weight`` ``float32 [B, L]``: the loss weight of each position (``1/p`` or ``1/m``; 0 where unmasked).

``maskable`` (``bool [B, L]``, default all True) restricts which positions may be masked: padding, or
the prompt in SFT (answer-only masking, :func:`sft_mask`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

SCHEDULES = ("uniform", "position")


class Noised(NamedTuple):
    x_t: jax.Array
    masked: jax.Array
    weight: jax.Array


def _maskable(tokens, maskable):
    return jnp.ones(tokens.shape, bool) if maskable is None else jnp.asarray(maskable, bool)


def uniform_mask(key, tokens, mask_id: int, *, eps: float = 1e-3, maskable=None) -> Noised:
    """Uniform noise: one ``t ~ U(0, 1)`` per sequence, ``p = (1 - eps) t + eps``, i.i.d. masking with
    probability ``p``; masked positions weigh ``1 / p``.
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    b, l = tokens.shape
    k_t, k_m = jax.random.split(key)
    t = jax.random.uniform(k_t, (b, 1), jnp.float32)
    p = (1.0 - eps) * t + eps
    masked = (jax.random.uniform(k_m, (b, l), jnp.float32) < p) & _maskable(tokens, maskable)
    x_t = jnp.where(masked, jnp.int32(mask_id), tokens)
    weight = jnp.where(masked, 1.0 / p, 0.0).astype(jnp.float32)
    return Noised(x_t, masked, weight)


def position_lambda(block_size: int) -> float:
    """Efficient-DLM's log-weight slope ``lambda = ln 2 / (0.25 n)`` for blocks of ``n`` tokens."""
    return math.log(2.0) / (0.25 * block_size)


def position_mask(key, tokens, mask_id: int, block_size: int, *, eps: float = 1e-3, maskable=None) -> Noised:
    """Efficient-DLM position-dependent masking, per block of ``n = block_size`` tokens.

    Per block: ``m ~ U(eps, 1)``; ``k = round(m * n_b)`` tokens are masked, where ``n_b`` is the number
    of maskable tokens of the block (``n`` without padding / prompt); they are drawn without
    replacement by Gumbel-top-k over the log-weights ``lambda * (1 - m) * i`` (``i`` = index inside
    the block, ``lambda = ln 2 / (0.25 n)``), so later positions are masked more when ``m`` is small.
    Masked tokens weigh ``1 / m``.  ``L`` must be a multiple of ``block_size``.
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    b, l = tokens.shape
    n = block_size
    if l % n:
        raise ValueError(f"position masking needs the sequence length L={l} to be a multiple of block_size={n}")
    nb = l // n
    ok = _maskable(tokens, maskable).reshape(b, nb, n)
    k_m, k_g = jax.random.split(key)
    m = jax.random.uniform(k_m, (b, nb, 1), jnp.float32, minval=eps, maxval=1.0)
    count = jnp.sum(ok, axis=-1, keepdims=True).astype(jnp.float32)
    k = jnp.round(m * count).astype(jnp.int32)
    i = jnp.arange(n, dtype=jnp.float32)
    logw = position_lambda(n) * (1.0 - m) * i
    score = logw + jax.random.gumbel(k_g, (b, nb, n), jnp.float32)
    score = jnp.where(ok, score, -jnp.inf)
    # rank 0 = highest score; ties between -inf entries are harmless (they are never among the top k)
    order = jnp.argsort(-score, axis=-1)
    rank = jnp.argsort(order, axis=-1)
    masked = (rank < k) & ok
    weight = jnp.where(masked, 1.0 / m, 0.0).reshape(b, l).astype(jnp.float32)
    masked = masked.reshape(b, l)
    return Noised(jnp.where(masked, jnp.int32(mask_id), tokens), masked, weight)


def apply_noise(key, tokens, mask_id: int, *, schedule: str = "uniform", block_size: int = 32,
                eps: float = 1e-3, maskable=None) -> Noised:
    """Dispatches to :func:`uniform_mask` (``"uniform"``) or :func:`position_mask` (``"position"``)."""
    if schedule == "uniform":
        return uniform_mask(key, tokens, mask_id, eps=eps, maskable=maskable)
    if schedule == "position":
        return position_mask(key, tokens, mask_id, block_size, eps=eps, maskable=maskable)
    raise ValueError(f"schedule={schedule!r} is not a noise schedule; expected one of {SCHEDULES}")


def sft_mask(key, tokens, answer_mask, mask_id: int, *, schedule: str = "uniform", block_size: int = 32,
             eps: float = 1e-3) -> Noised:
    """SFT answer-only masking: only positions with ``answer_mask [B, L]`` True can be masked."""
    return apply_noise(key, tokens, mask_id, schedule=schedule, block_size=block_size, eps=eps,
                       maskable=answer_mask)
