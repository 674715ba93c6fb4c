"""The joint AR + block-diffusion training loss (docs/training.md).

One forward over ``[x_t | x_0]`` (kind ``two_stream``, or ``two_stream_bidirectional`` for the fully
bidirectional comparison): the x_t half predicts the clean token AT the same position (diffusion), the
x_0 half the NEXT token (AR).  ``loss = L_AR + alpha * L_diff`` with

* ``normalization="pretrain"``: ``(sum_AR CE + alpha * sum_masked CE / p) / (n_masked + n_AR)``;
* ``normalization="sft"``: ``sum_AR CE / n_AR + alpha * sum_masked (CE / p) / n_masked``.

``loss_mask [B, L]`` marks the tokens that carry loss: only they can be masked, and an AR target
(the next token) counts only when it is marked.  For pretraining it is "not padding"; for SFT it is
"answer token", which gives answer-only masking and answer-only AR loss.

The vocabulary projection is done in chunks of ``ce_chunk`` positions under ``jax.checkpoint`` so the
``[B, 2L, V]`` float32 logits are never materialised at once (forward or backward).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxdlm.model import Transformer, forward
from jaxdlm.training import masking

OBJECTIVES = ("joint", "ar")
NORMALIZATIONS = ("pretrain", "sft")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """What to optimise.

    ``objective``: ``"joint"`` (L_AR + alpha L_diff over ``[x_t | x_0]``) or ``"ar"`` (plain next-token
    loss over a causal pass: AR pretraining).  ``schedule``: ``"uniform"`` or ``"position"`` (see
    :mod:`jaxdlm.training.masking`).  ``bidirectional``: fully bidirectional x_t stream instead of
    block-causal.  ``ce_chunk``: positions per chunk of the vocabulary projection (``None``: all at once).
    """

    objective: str = "joint"
    alpha: float = 0.3
    normalization: str = "pretrain"
    schedule: str = "uniform"
    eps: float = 1e-3
    bidirectional: bool = False
    ce_chunk: int | None = 512

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective={self.objective!r} is not supported; expected one of {OBJECTIVES}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization={self.normalization!r} is not supported; expected one of {NORMALIZATIONS}")
        if self.schedule not in masking.SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r} is not supported; expected one of {masking.SCHEDULES}")
        if not self.alpha >= 0:
            raise ValueError(f"alpha={self.alpha} must be >= 0")
        if not 0 < self.eps < 1:
            raise ValueError(f"eps={self.eps} must be in (0, 1)")
        if self.ce_chunk is not None and self.ce_chunk < 1:
            raise ValueError(f"ce_chunk={self.ce_chunk} must be a positive integer or None")


def token_ce(hidden, head, targets, chunk: int | None = None):
    """Per-token cross-entropy ``float32 [B, T]`` of ``softmax(hidden @ head)`` against ``targets [B, T]``.

    ``hidden [B, T, H]`` (any float dtype), ``head [H, V]``; logits accumulate in float32.  With
    ``chunk``, positions are processed ``chunk`` at a time and recomputed in the backward pass.
    """
    b, t, h = hidden.shape

    def ce(h_blk, y_blk):
        logits = jnp.matmul(h_blk, head.astype(h_blk.dtype), preferred_element_type=jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        return lse - jnp.take_along_axis(logits, y_blk[..., None], axis=-1)[..., 0]

    if chunk is None or t <= chunk:
        return ce(hidden, targets)
    nc = -(-t // chunk)
    pad = nc * chunk - t
    hp = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(b, nc, chunk, h).swapaxes(0, 1)
    yp = jnp.pad(targets, ((0, 0), (0, pad))).reshape(b, nc, chunk).swapaxes(0, 1)
    out = jax.lax.map(lambda xs: jax.checkpoint(ce)(*xs), (hp, yp))
    return out.swapaxes(0, 1).reshape(b, nc * chunk)[:, :t]


def _ar_targets(tokens, loss_mask):
    """Next-token targets ``[B, L]`` and their validity (the last position has none)."""
    b, l = tokens.shape
    tgt = jnp.concatenate([tokens[:, 1:], jnp.zeros((b, 1), tokens.dtype)], axis=1)
    valid = jnp.concatenate([loss_mask[:, 1:], jnp.zeros((b, 1), bool)], axis=1)
    return tgt, valid


def _safe_div(a, n):
    return a / jnp.maximum(n, 1).astype(jnp.float32)


def ar_loss(module: Transformer, tokens, loss_mask=None, *, ce_chunk: int | None = 512, remat: str = "none"):
    """Plain next-token loss over one causal pass: ``(loss, metrics)``; ``tokens [B, L]``.  ``remat``: per-layer
    rematerialisation (:data:`jaxdlm.model.REMAT_POLICIES`)."""
    tokens = jnp.asarray(tokens, jnp.int32)
    loss_mask = jnp.ones(tokens.shape, bool) if loss_mask is None else jnp.asarray(loss_mask, bool)
    hidden, _ = forward(module, tokens, kind="causal", return_hidden=True, layers="scan", remat=remat)
    tgt, valid = _ar_targets(tokens, loss_mask)
    ce = token_ce(hidden, module.head_weight(), tgt, ce_chunk)
    sum_a = jnp.sum(jnp.where(valid, ce, 0.0))
    n_a = jnp.sum(valid)
    loss = _safe_div(sum_a, n_a)
    return loss, {"loss": loss, "ar_loss": loss, "ar_sum": sum_a, "n_ar": n_a}


def joint_loss(module: Transformer, tokens, noised: masking.Noised, loss_mask=None, *, alpha: float = 0.3,
               normalization: str = "pretrain", bidirectional: bool = False, ce_chunk: int | None = 512,
               remat: str = "none"):
    """``L_AR + alpha * L_diff`` for clean ``tokens [B, L]`` and their noised copy (see module docstring).
    ``remat``: per-layer rematerialisation of the forward (:data:`jaxdlm.model.REMAT_POLICIES`).

    Returns ``(loss, metrics)``; metrics hold the unweighted mean CEs (``ar_loss``, ``diff_loss``), the
    sums and the counts (``n_masked``, ``n_ar``) so callers can aggregate exactly.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization={normalization!r} is not supported; expected one of {NORMALIZATIONS}")
    tokens = jnp.asarray(tokens, jnp.int32)
    b, l = tokens.shape
    loss_mask = jnp.ones(tokens.shape, bool) if loss_mask is None else jnp.asarray(loss_mask, bool)
    kind = "two_stream_bidirectional" if bidirectional else "two_stream"
    hidden, _ = forward(module, jnp.concatenate([noised.x_t, tokens], axis=1), kind=kind, return_hidden=True,
                        layers="scan", remat=remat)
    ar_tgt, ar_valid = _ar_targets(tokens, loss_mask)
    ce = token_ce(hidden, module.head_weight(), jnp.concatenate([tokens, ar_tgt], axis=1), ce_chunk)
    ce_d, ce_a = ce[:, :l], ce[:, l:]
    masked = noised.masked & loss_mask
    weight = jnp.where(masked, noised.weight, 0.0)
    sum_d = jnp.sum(ce_d * weight)
    sum_a = jnp.sum(jnp.where(ar_valid, ce_a, 0.0))
    n_m, n_a = jnp.sum(masked), jnp.sum(ar_valid)
    if normalization == "pretrain":
        loss = _safe_div(sum_a + alpha * sum_d, n_m + n_a)
    else:
        loss = _safe_div(sum_a, n_a) + alpha * _safe_div(sum_d, n_m)
    diff_plain = jnp.sum(jnp.where(masked, ce_d, 0.0))
    metrics = {"loss": loss, "ar_loss": _safe_div(sum_a, n_a), "diff_loss": _safe_div(diff_plain, n_m),
               "ar_sum": sum_a, "diff_sum": diff_plain, "diff_weighted_sum": sum_d, "n_ar": n_a, "n_masked": n_m}
    return loss, metrics


def batch_loss(module: Transformer, batch: dict, key, cfg: LossConfig, remat: str = "none"):
    """The configured loss on one batch ``{"tokens": [B, L], "loss_mask": [B, L] (optional)}``.

    ``key`` draws the noise; ``remat``: per-layer rematerialisation (:data:`jaxdlm.model.REMAT_POLICIES`).
    Returns ``(loss, metrics)``.
    """
    tokens = jnp.asarray(batch["tokens"], jnp.int32)
    loss_mask = batch.get("loss_mask")
    loss_mask = jnp.ones(tokens.shape, bool) if loss_mask is None else jnp.asarray(loss_mask, bool)
    if cfg.objective == "ar":
        return ar_loss(module, tokens, loss_mask, ce_chunk=cfg.ce_chunk, remat=remat)
    c = module.config
    if c.mask_token_id is None:
        raise ValueError("the joint objective needs config.mask_token_id (set it with dataclasses.replace)")
    noised = masking.apply_noise(key, tokens, c.mask_token_id, schedule=cfg.schedule, block_size=c.block_size,
                                 eps=cfg.eps, maskable=loss_mask)
    return joint_loss(module, tokens, noised, loss_mask, alpha=cfg.alpha, normalization=cfg.normalization,
                      bidirectional=cfg.bidirectional, ce_chunk=cfg.ce_chunk, remat=remat)
