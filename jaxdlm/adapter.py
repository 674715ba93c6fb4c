"""Adapters on the base model: low-rank updates of chosen linear layers for parameter-efficient fine-tuning
(LoRA; QLoRA-style with a quantized frozen base).

An adapter adds ``scale * (x @ A) @ B`` to the output ``x @ W`` of each *target* linear layer of every decoder
layer (``q_proj`` ... ``down_proj``), with ``scale = alpha / rank``.  ``W`` stays frozen (float, or quantized by
:mod:`jaxdlm.quant`: the delta is added to the dequantizing matmul's output); only ``A`` and ``B`` train.

* :class:`AdapterConfig` (rank, alpha, targets) is static: like :class:`~jaxdlm.quant.Quantization` it lives in
  the module graph (``Transformer.adapter``, ``Model.adapter_config``).
* The factors live in the model's parameters beside their weight: ``layers/<target>_lora_a`` ``[L, in, r]`` and
  ``layers/<target>_lora_b`` ``[L, r, out]`` in the compute dtype, so every forward of the model (generation,
  serving, :meth:`~jaxdlm.model.Model.logits`) applies them; ``jaxdlm.model._apply`` is the one place that does.
* :class:`Adapter` is the typed pytree that training differentiates, the optimizer updates and the run folder
  checkpoints: the same factors keyed by target, float32 master copies.  :func:`jaxdlm.model.add_adapter`,
  :func:`adapter_of` and :func:`set_adapter` move it into and out of a model; :func:`jaxdlm.model.merge_adapter`
  folds it into the weights (``W + scale * A @ B``).

This is unrelated to the draft LoRA of linear self-speculation (:class:`jaxdlm.lora.OProjLoRA`, applied to draft
passes only); a model may carry both.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxdlm.quant import LINEARS

TARGETS = LINEARS  # the linear layers an adapter may target
A_SUFFIX = "_lora_a"  # layers/<target>_lora_a [L, in, r]
B_SUFFIX = "_lora_b"  # layers/<target>_lora_b [L, r, out]


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """What an adapter adds (static, hashable).

    Attributes:
      rank: ``r``, the inner dimension of ``A [in, r]`` and ``B [r, out]``.
      alpha: the update is scaled by ``alpha / rank``.
      targets: the linear layers that get an update, a non-empty subset of :data:`TARGETS` (kept in that order).
    """

    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = TARGETS

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, (int, np.integer)) or self.rank < 1:
            raise ValueError(f"rank={self.rank!r} must be a positive integer")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ValueError(f"alpha={self.alpha!r} must be a number > 0")
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        bad = [t for t in targets if t not in TARGETS]
        if bad or not targets or len(set(targets)) != len(targets):
            what = f"{bad[0]!r} is not a linear layer" if bad else "list each layer once, at least one"
            raise ValueError(f"targets={list(targets)!r}: {what}; allowed: {list(TARGETS)}")
        object.__setattr__(self, "rank", int(self.rank))
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "targets", tuple(t for t in TARGETS if t in targets))

    @property
    def scale(self) -> float:
        """``alpha / rank``."""
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, d: Mapping | None) -> "AdapterConfig | None":
        """The inverse of :meth:`to_dict` (``None`` -> ``None``)."""
        return None if d is None else cls(d["rank"], d["alpha"], tuple(d["targets"]))

    def shapes(self, layout: Mapping) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
        """Target -> (``A`` shape ``[L, in, r]``, ``B`` shape ``[L, r, out]``) for a model of ``layout``
        (:func:`jaxdlm.model.param_layout`)."""
        out = {}
        for t in self.targets:
            n_layers, k, n = layout[("layers", t)].shape
            out[t] = ((n_layers, k, self.rank), (n_layers, self.rank, n))
        return out

    def logical_axes(self, layout: Mapping) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
        """Target -> (``A``'s logical axes, ``B``'s) for a model of ``layout``: the weight's input axis and
        ``"lora"``, ``"lora"`` and its output axis, after ``"layers"``."""
        out = {}
        for t in self.targets:
            lead, k, n = layout[("layers", t)].axes
            out[t] = ((lead, k, "lora"), (lead, "lora", n))
        return out


def delta(x, a, b, scale: float) -> jax.Array:
    """One layer's update ``scale * (x @ a) @ b`` ``[..., out]`` of ``x [..., in]`` (``a [in, r]``, ``b [r, out]``),
    computed in ``x.dtype``."""
    return (jnp.matmul(jnp.matmul(x, a.astype(x.dtype)), b.astype(x.dtype)) * scale).astype(x.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Adapter:
    """The trained factors, keyed by target layer name.

    Attributes:
      a: ``{target: [L, in, r]}`` (PEFT's ``lora_A`` transposed, stacked over layers).
      b: ``{target: [L, r, out]}`` (PEFT's ``lora_B`` transposed); zero at initialisation, so a fresh adapter
        leaves the model unchanged.

    The scale and the rank are the :class:`AdapterConfig`'s; the run folder's checkpoint stores this tree (entries
    ``a/<target>``, ``b/<target>``).
    """

    a: dict
    b: dict

    @classmethod
    def init(cls, layout: Mapping, adapter: AdapterConfig, key, dtype=jnp.float32) -> "Adapter":
        """A fresh adapter for a model of ``layout`` (:func:`jaxdlm.model.param_layout`): ``A`` Kaiming-uniform-like
        (``U(+-1/sqrt(in))``), ``B`` zero."""
        a, b = {}, {}
        for i, (t, (a_shape, b_shape)) in enumerate(adapter.shapes(layout).items()):
            bound = 1.0 / np.sqrt(a_shape[1])
            a[t] = jax.random.uniform(jax.random.fold_in(key, i), a_shape, jnp.float32, -bound, bound).astype(dtype)
            b[t] = jnp.zeros(b_shape, dtype)
        return cls(a, b)

    @classmethod
    def abstract(cls, layout: Mapping, adapter: AdapterConfig, dtype=jnp.float32) -> "Adapter":
        """Shapes and dtypes only (``jax.ShapeDtypeStruct`` leaves): a restore target."""
        shapes = adapter.shapes(layout)
        return cls({t: jax.ShapeDtypeStruct(s[0], jnp.dtype(dtype)) for t, s in shapes.items()},
                   {t: jax.ShapeDtypeStruct(s[1], jnp.dtype(dtype)) for t, s in shapes.items()})

    @property
    def rank(self) -> int:
        return next(iter(self.a.values())).shape[-1]


def adapter_shardings(layout: Mapping, adapter: AdapterConfig, mesh, rules=None) -> Adapter:
    """NamedShardings for an :class:`Adapter` of a model of ``layout`` (an ``Adapter`` with sharding leaves), from
    :meth:`AdapterConfig.logical_axes`."""
    from jaxdlm import sharding as sh

    rules = sh.DEFAULT_RULES if rules is None else rules
    axes = adapter.logical_axes(layout)
    return Adapter({t: sh.named_sharding(ax[0], mesh, rules) for t, ax in axes.items()},
                   {t: sh.named_sharding(ax[1], mesh, rules) for t, ax in axes.items()})


# ------------------------------------------------------------------------------------------- models


def leaf_paths(adapter: AdapterConfig) -> list[tuple[str, tuple[str, str], tuple[str, str]]]:
    """``(target, A path, B path)`` of each target in the pure-dict parameter tree."""
    return [(t, ("layers", t + A_SUFFIX), ("layers", t + B_SUFFIX)) for t in adapter.targets]


def adapter_of(model) -> Adapter | None:
    """The :class:`Adapter` a model carries (its factors, in the compute dtype), or ``None``."""
    cfg = model.adapter_config
    if cfg is None:
        return None
    layers = model.params["layers"]
    return Adapter({t: layers[a[-1]][...] for t, a, _ in leaf_paths(cfg)},
                   {t: layers[b[-1]][...] for t, _, b in leaf_paths(cfg)})


def set_adapter(module, factors: Adapter) -> None:
    """Writes ``factors`` (cast to each factor's dtype) into a merged :class:`~jaxdlm.model.Transformer` that has an
    adapter of that shape, in place: the way a traced train step puts its adapter into the frozen base.  Inside a
    transformation the module must be merged in that trace (``nnx.merge(graphdef, params, copy=True)``): NNX refuses
    to update variables created outside it."""
    cfg = module.adapter
    if cfg is None or set(factors.a) != set(cfg.targets):
        raise ValueError(f"an adapter for {sorted(factors.a)} does not fit a model with "
                         f"{'no adapter' if cfg is None else 'an adapter on ' + str(list(cfg.targets))}")
    for t, a_path, b_path in leaf_paths(cfg):
        for path, value in ((a_path, factors.a[t]), (b_path, factors.b[t])):
            var = getattr(module.layers, path[-1])
            var.value = jnp.asarray(value).astype(var.value.dtype)
