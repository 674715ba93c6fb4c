"""KV cache: an explicit pytree passed into and returned from every cached forward pass."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxdlm.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values of committed (causal) tokens.

    Attributes:
      k, v: ``[num_layers, batch, num_kv_heads, max_len, head_dim]``; slot ``s`` of a row holds the
        token at position ``s`` (RoPE already applied to keys).  Heads-major: each (row, kv head) holds
        its keys contiguously, so attention reads a layer as ``[B, KVH, S, D]`` batched matrices in place.
      length: ``int32 [batch]`` number of valid slots per row.  Slots at or beyond ``length`` hold
        scratch data and are never attended to.
    """

    k: jax.Array
    v: jax.Array
    length: jax.Array

    @classmethod
    def init(cls, config: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> "KVCache":
        """An empty cache of ``max_len`` slots per row."""
        if batch < 1 or max_len < 1:
            raise ValueError(f"KVCache needs batch >= 1 and max_len >= 1, got batch={batch}, max_len={max_len}")
        shape = (config.num_layers, batch, config.num_kv_heads, max_len, config.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch,), jnp.int32))

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def advance(self, n) -> "KVCache":
        """Marks ``n`` (scalar or ``[batch]``) more slots valid, clipped to ``max_len``."""
        n = jnp.broadcast_to(jnp.asarray(n, jnp.int32), self.length.shape)
        return dataclasses.replace(self, length=jnp.minimum(self.length + n, self.max_len))

    def with_length(self, length) -> "KVCache":
        """Sets the per-row lengths to ``length`` (scalar or ``[batch]``): shorter crops rejected tokens (a
        self-speculation verify), longer claims slots (no checks: the caller guarantees they hold valid K/V)."""
        length = jnp.broadcast_to(jnp.asarray(length, jnp.int32), self.length.shape)
        return dataclasses.replace(self, length=length)


def write(buffer: jax.Array, layer, new: jax.Array, start: jax.Array) -> jax.Array:
    """Writes ``new [B, T, KVH, D]`` into layer ``layer`` of ``buffer [L, B, KVH, S, D]`` at per-row slot ``start [B]``.

    One scatter of ``B * T`` rows into the stacked buffer: XLA updates it in place (no copy of a layer or of
    the whole cache).  Slots past the end are dropped (never clamped onto valid data).  ``layer`` is a
    Python int or a traced index.
    """
    b, t = new.shape[:2]
    rows_Bx1 = jnp.arange(b)[:, None]
    slots_BxT = start[:, None].astype(jnp.int32) + jnp.arange(t, dtype=jnp.int32)[None, :]
    # advanced indices (layer, rows, slots) around a slice: the indexed view is [B, T, KVH, D], as `new`
    return buffer.at[layer, rows_Bx1, :, slots_BxT].set(new.astype(buffer.dtype), mode="drop")
