"""Optimizer and the jitted train step (optax).

The train state is a :class:`TrainState` pytree: ``step`` int32 [], ``params`` (``nnx.State``, float32 master
copy), ``opt_state`` (optax) and ``rng`` uint32 [2] (raw PRNG key data).

A batch is ``{"tokens": int32 [A, B, L], "loss_mask": bool [A, B, L]}`` with ``A`` micro-batches that
are accumulated (a ``lax.scan``) into ONE optimizer update; the gradient and the loss are the mean over
micro-batches.  The noise of step ``s``, micro-batch ``a`` uses ``fold_in(fold_in(rng, s), a)``, so a
step's result depends only on the state and the batch (what makes resumed runs bit-identical).

With ``compute_dtype=bfloat16`` the forward/backward runs on a bf16 cast of the float32 master params;
gradients flow back through the cast and the update is applied to the float32 copy.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from jaxdlm.model import check_remat
from jaxdlm.training.losses import LossConfig, batch_loss

DECAY_SHAPES = ("linear", "cosine")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with a warmup-stable-decay learning rate and global-norm clipping.

    The learning rate rises linearly from 0 to ``lr`` over ``warmup_steps``, stays at ``lr``, and
    decays to ``min_lr`` over the last ``decay_steps`` of ``total_steps`` (``decay_shape`` linear or
    cosine).  Weight decay skips norm weights.  ``clip_norm`` ``None`` or 0 disables clipping.
    """

    lr: float = 1e-4
    min_lr: float = 0.0
    total_steps: int = 1000
    warmup_steps: int = 0
    decay_steps: int = 0
    decay_shape: str = "linear"
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float | None = 1.0

    def __post_init__(self):
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be > 0")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr={self.min_lr} must be in [0, lr={self.lr}]")
        if self.total_steps < 1:
            raise ValueError(f"total_steps={self.total_steps} must be >= 1")
        if self.warmup_steps < 0 or self.decay_steps < 0 or self.warmup_steps + self.decay_steps > self.total_steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} and decay_steps={self.decay_steps} must be >= 0 "
                             f"and sum to at most total_steps={self.total_steps}")
        if self.decay_shape not in DECAY_SHAPES:
            raise ValueError(f"decay_shape={self.decay_shape!r} is not supported; expected one of {DECAY_SHAPES}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay={self.weight_decay} must be >= 0")
        for name in ("b1", "b2"):
            v = getattr(self, name)
            if not 0 <= v < 1:
                raise ValueError(f"{name}={v} must be in [0, 1)")
        if not self.eps > 0:
            raise ValueError(f"eps={self.eps} must be > 0")
        if self.clip_norm is not None and self.clip_norm < 0:
            raise ValueError(f"clip_norm={self.clip_norm} must be >= 0 (0 or None disables clipping)")


def wsd_schedule(cfg: OptimConfig) -> optax.Schedule:
    """Warmup-stable-decay learning rate as a function of the optimizer step."""
    stable = cfg.total_steps - cfg.warmup_steps - cfg.decay_steps
    parts, bounds = [], []
    if cfg.warmup_steps:
        parts.append(optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps))
        bounds.append(cfg.warmup_steps)
    parts.append(optax.constant_schedule(cfg.lr))
    if cfg.decay_steps:
        bounds.append(cfg.warmup_steps + stable)
        if cfg.decay_shape == "linear":
            parts.append(optax.linear_schedule(cfg.lr, cfg.min_lr, cfg.decay_steps))
        else:
            parts.append(optax.cosine_decay_schedule(cfg.lr, cfg.decay_steps, alpha=cfg.min_lr / cfg.lr))
    return optax.join_schedules(parts, bounds) if bounds else parts[0]


def decay_mask(params):
    """True for parameters that get weight decay (everything but norm weights)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: "norm" not in jax.tree_util.keystr(path).lower(), params)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """``clip_by_global_norm`` then AdamW with :func:`wsd_schedule` (norm weights are not decayed)."""
    adamw = optax.adamw(wsd_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                        mask=decay_mask)
    if cfg.clip_norm:
        return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)
    return adamw


@struct.dataclass
class TrainState:
    """What a full train step updates.  Orbax saves it under its field names, the keys of the plain dict that
    earlier versions used, so their checkpoints restore into it (and a dict target restores parts of it)."""

    step: jax.Array  # int32 []: optimizer steps taken
    params: Any  # nnx.State: the float32 master parameters (an adapter run: the jaxdlm.adapter.Adapter)
    opt_state: Any  # optax state (Adam's moments shaped like params)
    rng: jax.Array  # uint32 [2]: raw PRNG key data of the training noise


def init_state(params, tx: optax.GradientTransformation, seed: int) -> TrainState:
    """A fresh train state around float32 ``params`` (an ``nnx.State`` or any pytree).  Quantized weights
    (:mod:`jaxdlm.quant`) are refused: their scales live apart and a cast to float32 would silently drop them."""
    _refuse_quantized(params)
    # a copy: the jitted step donates the state, which must not delete the caller's model params
    params = jax.tree.map(lambda x: jnp.array(x, jnp.float32 if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype),
                          params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.PRNGKey(seed))


def _refuse_quantized(params) -> None:
    from jaxdlm.quant import SCALE_SUFFIX

    for path, _ in jax.tree_util.tree_leaves_with_path(params):
        name = "/".join(key for k in path if not (key := str(getattr(k, "key", k))).startswith("."))
        if name.endswith(SCALE_SUFFIX):
            raise ValueError(f"params hold quantized weights ({name}): training needs float parameters; train "
                             "the float model and quantize afterwards (jaxdlm.model.quantize_model)")


def cast_floating(tree, dtype):
    """Casts every floating leaf of ``tree`` to ``dtype`` (``None``: unchanged)."""
    if dtype is None:
        return tree
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def make_loss_fn(graphdef, loss_cfg: LossConfig, compute_dtype=None, remat: str = "none") -> Callable:
    """``loss_fn(params, batch, key) -> (loss, metrics)`` for one micro-batch ``{"tokens": [B, L], ...}``;
    ``remat``: per-layer rematerialisation of the forward (:data:`jaxdlm.model.REMAT_POLICIES`)."""
    check_remat(remat)

    def loss_fn(params, batch, key):
        module = nnx.merge(graphdef, cast_floating(params, compute_dtype))
        return batch_loss(module, batch, key, loss_cfg, remat)

    return loss_fn


def _accumulate(loss_fn, params, batch, key):
    """Mean gradient and metrics over the ``A`` micro-batches of ``batch`` (leading axis)."""
    a = batch["tokens"].shape[0]
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def micro(carry, xs):
        i, mb = xs
        (_, metrics), grads = grad_fn(params, mb, jax.random.fold_in(key, i))
        g_acc, m_acc = carry
        g_acc = jax.tree.map(lambda s, g: s + g.astype(jnp.float32), g_acc, grads)
        m_acc = jax.tree.map(lambda s, m: s + m.astype(jnp.float32), m_acc, metrics)
        return (g_acc, m_acc), None

    zeros_g = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), params)
    m_shape = jax.eval_shape(lambda: loss_fn(params, jax.tree.map(lambda x: x[0], batch), key)[1])
    zeros_m = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), m_shape)
    (g_sum, m_sum), _ = jax.lax.scan(micro, (zeros_g, zeros_m), (jnp.arange(a), batch))
    return jax.tree.map(lambda g: g / a, g_sum), jax.tree.map(lambda m: m / a, m_sum)


def apply_gradients(state: TrainState, grads, metrics: dict, tx: optax.GradientTransformation,
                    schedule: optax.Schedule | None = None) -> tuple[TrainState, dict]:
    """One optimizer update of ``state.params`` by ``grads`` (shaped like them): the new state (step + 1) and
    ``metrics`` with ``grad_norm`` (before clipping) and, given the ``schedule``, ``lr``."""
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, grad_norm=optax.global_norm(grads))
    if schedule is not None:
        metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def make_train_step(graphdef, tx: optax.GradientTransformation, loss_cfg: LossConfig, *, compute_dtype=None,
                    schedule: optax.Schedule | None = None, donate: bool = True, out_shardings=None,
                    remat: str = "none") -> Callable:
    """A jitted ``step(state, batch) -> (state, metrics)`` (see the module docstring for the layouts).

    Metrics: the loss terms averaged over micro-batches, ``grad_norm`` (before clipping) and ``lr``.
    ``out_shardings``: ``(state shardings, metrics sharding)`` to pin the outputs to (on a mesh: the state keeps
    the layout it was created or restored in, so every step runs the same compiled program).
    ``remat``: ``"none"``, ``"full"`` or ``"dots"``, per-layer rematerialisation (:data:`jaxdlm.model.REMAT_POLICIES`;
    the gradients do not change, the memory of the backward pass does).
    """
    loss_fn = make_loss_fn(graphdef, loss_cfg, compute_dtype, remat)

    def step(state, batch):
        key = jax.random.fold_in(state.rng, state.step)
        grads, metrics = _accumulate(loss_fn, state.params, batch, key)
        return apply_gradients(state, grads, metrics, tx, schedule)

    pinned = {} if out_shardings is None else {"out_shardings": out_shardings}
    return jax.jit(step, donate_argnums=(0,) if donate else (), **pinned)


def make_eval_step(graphdef, loss_cfg: LossConfig, *, compute_dtype=None, remat: str = "none") -> Callable:
    """A jitted ``eval(params, batch [B, L], key) -> metrics`` (no gradient; ``remat`` as the train step's)."""
    loss_fn = make_loss_fn(graphdef, loss_cfg, compute_dtype, remat)
    return jax.jit(lambda params, batch, key: loss_fn(params, batch, key)[1])
