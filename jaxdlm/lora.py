"""The draft LoRA on ``o_proj``: one typed pytree used by the forward, training, checkpoints, the
converter and sharding.

Linear self-speculation drafts with a low-rank update of every layer's output projection (the
``linear_spec_lora`` adapter of NLD instruct models; docs/model.md section 6).  The forward adds
``scale * (o @ a) @ b`` to the ``o_proj`` output of draft passes only (:meth:`OProjLoRA.delta`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxdlm.config import ModelConfig


def _field(axes: tuple[str, ...]):
    """A LoRA field with its logical axes (mapped to mesh axes by :func:`jaxdlm.sharding.logical_spec`)."""
    return dataclasses.field(metadata={"axes": axes})


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class OProjLoRA:
    """Low-rank update of every layer's ``o_proj``: ``o @ W_o + scale * (o @ a) @ b``.

    Attributes:
      a: ``[L, heads * head_dim, r]`` (PEFT's ``lora_A`` transposed, stacked over layers).
      b: ``[L, r, H]`` (PEFT's ``lora_B`` transposed), same dtype as ``a``.
      scale: float32 ``[]``: ``alpha / r`` (``alpha / sqrt(r)`` for rsLoRA).  Not trained.  Any array
        that broadcasts against ``[B, T, H]`` works in the forward (e.g. a per-token scale).

    Inside the layer loop the forward slices ``a`` and ``b`` to one layer (``[heads * head_dim, r]``,
    ``[r, H]``) and keeps ``scale``.  The on-disk form (``lora/`` of a checkpoint folder) is an Orbax
    PyTree with the entries ``a``, ``b`` and ``scale``, the field names.
    """

    a: jax.Array = _field(("layers", "heads", "lora"))
    b: jax.Array = _field(("layers", "lora", "embed"))
    scale: jax.Array = _field(())

    @classmethod
    def init(cls, config: ModelConfig, rank: int, alpha: float, key, dtype=jnp.float32) -> "OProjLoRA":
        """A fresh LoRA: ``a`` Kaiming-uniform-like (``U(+-1/sqrt(fan_in))``), ``b`` zero, so the draft starts
        equal to the base denoise pass; ``scale = alpha / rank``."""
        if rank < 1:
            raise ValueError(f"rank={rank} must be a positive integer")
        shapes = cls.abstract(config, rank, dtype)
        bound = 1.0 / np.sqrt(shapes.a.shape[1])
        a = jax.random.uniform(key, shapes.a.shape, jnp.float32, -bound, bound).astype(dtype)
        return cls(a, jnp.zeros(shapes.b.shape, dtype), jnp.asarray(alpha / rank, jnp.float32))

    @classmethod
    def abstract(cls, config: ModelConfig, rank: int, dtype=jnp.float32) -> "OProjLoRA":
        """Shapes and dtypes only (``jax.ShapeDtypeStruct`` leaves; ``scale`` float32): a restore target."""
        c = config
        return cls(jax.ShapeDtypeStruct((c.num_layers, c.num_heads * c.head_dim, rank), jnp.dtype(dtype)),
                   jax.ShapeDtypeStruct((c.num_layers, rank, c.hidden_size), jnp.dtype(dtype)),
                   jax.ShapeDtypeStruct((), jnp.float32))

    @classmethod
    def logical_axes(cls) -> dict[str, tuple[str, ...]]:
        """Field name -> logical axes (the names :mod:`jaxdlm.sharding`'s rules map to mesh axes)."""
        return {f.name: f.metadata["axes"] for f in dataclasses.fields(cls)}

    @property
    def rank(self) -> int:
        return self.a.shape[-1]

    def delta(self, o_BxTxF: jax.Array) -> jax.Array:
        """One layer's update ``scale * (o @ a) @ b`` ``[B, T, H]`` of the attention output ``o [B, T, F]``
        (``F = heads * head_dim``), for a LoRA sliced to that layer."""
        return (o_BxTxF @ self.a) @ self.b * self.scale
