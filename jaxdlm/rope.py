"""Rotary position embeddings (default, llama3, yarn) with Hugging Face transformers' semantics.

Inverse frequencies are computed once on the host in float32, following transformers' order of
float32 operations (powers are computed in float64 and rounded once, so they are correctly rounded;
torch's float32 ``pow`` can be one ulp away).  A bf16 table would corrupt the angles, so tables are
never built in the parameter dtype.  Angles are computed on the fly from integer positions, so
positions can come from a KV cache length.
"""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp
import numpy as np

from jaxdlm.config import RopeConfig

_f32 = np.float32


def _base_powers(theta: float, dim: int) -> np.ndarray:
    """``theta ** (arange(0, dim, 2) / dim)`` as float32 (power in float64, rounded once)."""
    exponent = (np.arange(0, dim, 2).astype(_f32) / _f32(dim)).astype(np.float64)
    return np.power(float(theta), exponent).astype(_f32)


@functools.lru_cache(maxsize=64)
def _inv_freq_cached(rope: RopeConfig, head_dim: int) -> tuple[tuple[float, ...], float]:
    dim = head_dim
    pos_freqs = _base_powers(rope.theta, dim)
    inv_freq = (_f32(1.0) / pos_freqs).astype(_f32)
    attention_factor = 1.0
    if rope.rope_type == "default":
        pass
    elif rope.rope_type == "llama3":
        factor = _f32(rope.factor)
        low, high = _f32(rope.low_freq_factor), _f32(rope.high_freq_factor)
        old_len = _f32(rope.original_max_position_embeddings)
        low_wavelen = old_len / low
        high_wavelen = old_len / high
        wavelen = (_f32(2 * math.pi) / inv_freq).astype(_f32)
        inv_llama = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq).astype(_f32)
        smooth = ((old_len / wavelen - low) / (high - low)).astype(_f32)
        smoothed = ((_f32(1) - smooth) * inv_llama / factor + smooth * inv_llama).astype(_f32)
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = np.where(medium, smoothed, inv_llama).astype(_f32)
    elif rope.rope_type == "yarn":
        factor = rope.factor
        base = rope.theta
        orig = rope.original_max_position_embeddings

        def get_mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        if rope.attention_factor is not None:
            attention_factor = float(rope.attention_factor)
        elif rope.mscale and rope.mscale_all_dim:
            attention_factor = float(get_mscale(factor, rope.mscale) / get_mscale(factor, rope.mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)
        beta_fast = rope.beta_fast or 32
        beta_slow = rope.beta_slow or 1

        def correction_dim(rotations):
            return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if rope.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(dim // 2).astype(_f32) - _f32(low)) / _f32(high - low), 0, 1).astype(_f32)
        extrapolation = (_f32(1) - ramp).astype(_f32)
        inv_extra = inv_freq
        inv_inter = (_f32(1.0) / (_f32(factor) * pos_freqs)).astype(_f32)
        inv_freq = (inv_inter * (_f32(1) - extrapolation) + inv_extra * extrapolation).astype(_f32)
    else:  # pragma: no cover - RopeConfig validates rope_type
        raise ValueError(f"rope_type={rope.rope_type!r} is not supported")
    return tuple(float(x) for x in inv_freq), float(attention_factor)


def inv_freq(rope: RopeConfig, head_dim: int) -> tuple[np.ndarray, float]:
    """Returns ``(inv_freq [head_dim // 2] float32, attention_factor)`` for ``rope``."""
    values, factor = _inv_freq_cached(rope, head_dim)
    return np.asarray(values, dtype=_f32), factor


def cos_sin(rope: RopeConfig, head_dim: int, positions: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos and sin of the rotation angles, float32 ``[..., head_dim // 2]`` for integer ``positions [...]``.

    The attention factor (yarn's mscale ratio) is folded in, as transformers does.
    """
    freqs, factor = inv_freq(rope, head_dim)
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(freqs)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    if factor != 1.0:
        cos, sin = cos * factor, sin * factor
    return cos, sin


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate-half (NeoX) RoPE.  ``x [B, T, heads, head_dim]``, ``cos/sin [B, T, head_dim // 2]``.

    cos/sin are cast to ``x.dtype`` first (transformers' behaviour in bf16).
    """
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def query_scale(rope: RopeConfig, positions: jnp.ndarray) -> jnp.ndarray | None:
    """Llama-4 query scale ``1 + beta * log(1 + floor(pos / original_max))`` float32 ``[...]``.

    ``None`` when the config has no ``llama_4_scaling_beta`` (the scale is then 1).
    """
    if rope.llama4_scaling_beta is None:
        return None
    orig = float(rope.original_max_position_embeddings)
    pos = positions.astype(jnp.float32)
    return 1.0 + rope.llama4_scaling_beta * jnp.log1p(jnp.floor(pos / orig))
