"""Training the draft LoRA of linear self-speculation (o_proj only; the base model stays frozen).

At inference (docs/decoding.md section 6) a draft is ONE denoise pass with the LoRA over ``[seed, MASK * (n-1)]``
placed right after the committed cache (whose K/V come from LoRA-free causal passes); the verify pass
(causal, LoRA off) then accepts the longest prefix where the draft equals the AR prediction.  So the
draft at position ``c + i`` should predict what the AR model predicts for position ``c + i``, i.e. the AR
logits at position ``c + i - 1``.

Training reproduces that layout for every block of a sequence at once, without the two-stream forward
(which would put the LoRA on the clean keys too):

1. a causal pass over the clean ``x_0 [B, L]`` WITHOUT LoRA fills a KV cache and gives the AR logits
   (the teacher; no gradient);
2. one pass over ``x_d`` = each block ``j`` as ``[x_0[j n], MASK * (n-1)]`` WITH the LoRA, whose queries
   see their own block bidirectionally and the cached clean keys of strictly earlier blocks
   (the denoise mask of :mod:`jaxdlm.attention.masks`), i.e. exactly a draft pass at ``c = j n``.

Loss (``target="soft"``, default): ``KL(AR || draft)`` between the AR model's softmax at ``p - 1`` and
the draft distribution at position ``p``, for every non-seed position ``p`` of every block;
``target="hard"``: cross-entropy against the AR argmax at ``p - 1`` (what verification accepts).  With
``x_0`` the AR model's own greedy text the teacher-forced targets equal the tokens the verifier accepts.
Reported metric ``match``: the fraction of draft argmaxes equal to the AR argmax; ``accept``: the mean
number of leading draft tokens per block that verification would accept.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from jaxdlm.attention import masks
from jaxdlm.attention.masks import TokenInfo
from jaxdlm.cache import KVCache
from jaxdlm.lora import OProjLoRA
from jaxdlm.model import Transformer, forward

TARGETS = ("soft", "hard")


def draft_inputs(tokens, block_size: int, mask_id: int):
    """``[x_0[j n], MASK * (n-1)]`` for every block ``j``: ``int32 [B, L]`` (``L`` a multiple of ``n``)."""
    b, l = tokens.shape
    if l % block_size:
        raise ValueError(f"sequence length L={l} must be a multiple of block_size={block_size}")
    is_seed = (jnp.arange(l) % block_size) == 0
    return jnp.where(is_seed[None, :], tokens, jnp.int32(mask_id))


def draft_and_verify_logits(module: Transformer, tokens, lora: OProjLoRA):
    """``(draft_logits, ar_logits)``, both float32 ``[B, L, V]``; see the module docstring.

    ``ar_logits`` come from a LoRA-free causal pass; ``draft_logits`` from one pass with the LoRA over
    :func:`draft_inputs` against the causal K/V of strictly earlier blocks.
    """
    c = module.config
    tokens = jnp.asarray(tokens, jnp.int32)
    b, l = tokens.shape
    n = c.block_size
    # slots 0..L-1: the clean tokens' K/V (causal pass); slots L..2L-1: the draft tokens' (scratch of the draft pass)
    cache = KVCache.init(c, b, 2 * l, dtype=module.embed[...].dtype)
    ar_logits, cache = forward(module, tokens, kind="causal", cache=cache, layers="scan")
    cache = jax.tree.map(jax.lax.stop_gradient, cache)
    x_d = draft_inputs(tokens, n, c.mask_token_id)
    pos = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
    blk = pos // n
    ones = jnp.ones((b, l), bool)
    q_info = TokenInfo(pos, blk, jnp.full((b, l), masks.NOISY, jnp.int32), ones)
    cache_info = TokenInfo(pos, blk, jnp.full((b, l), masks.CLEAN, jnp.int32), ones)
    k_info = TokenInfo(*(jnp.concatenate([x, y], axis=1) for x, y in zip(cache_info, q_info)))
    draft_logits, _ = module(x_d, pos, q_info, k_info, cache=cache, lora=lora, layers="scan")
    return draft_logits, ar_logits


def draft_loss(module: Transformer, tokens, lora: OProjLoRA, *, target: str = "soft", loss_mask=None):
    """Loss pulling the draft toward the verify (AR) prediction: ``(loss, metrics)``; see module docstring.

    ``loss_mask [B, L]`` (optional) excludes positions (padding) from the loss.
    """
    if target not in TARGETS:
        raise ValueError(f"target={target!r} is not supported; expected one of {TARGETS}")
    c = module.config
    if c.mask_token_id is None:
        raise ValueError("draft training needs config.mask_token_id")
    tokens = jnp.asarray(tokens, jnp.int32)
    b, l = tokens.shape
    n = c.block_size
    draft, ar = draft_and_verify_logits(module, tokens, lora)
    ar = jax.lax.stop_gradient(ar)
    # draft position p (not a seed) is compared with the AR prediction made at p - 1
    teacher = jnp.concatenate([jnp.zeros_like(ar[:, :1]), ar[:, :-1]], axis=1)
    in_block = jnp.arange(l) % n
    valid = jnp.broadcast_to(in_block[None, :] != 0, (b, l))
    if loss_mask is not None:
        valid = valid & jnp.asarray(loss_mask, bool)
    logp = jax.nn.log_softmax(draft, axis=-1)
    ar_arg = jnp.argmax(teacher, axis=-1)
    if target == "soft":
        t_logp = jax.nn.log_softmax(teacher, axis=-1)
        ce = jnp.sum(jnp.exp(t_logp) * (t_logp - logp), axis=-1)
    else:
        ce = -jnp.take_along_axis(logp, ar_arg[..., None], axis=-1)[..., 0]
    n_valid = jnp.maximum(jnp.sum(valid), 1)
    loss = jnp.sum(jnp.where(valid, ce, 0.0)) / n_valid
    hit = (jnp.argmax(draft, axis=-1) == ar_arg) & valid
    # accepted prefix per block: leading run of hits over the block's non-seed positions
    hits_blk = hit.reshape(b, l // n, n)[:, :, 1:]
    accept = jnp.sum(jnp.cumprod(hits_blk.astype(jnp.int32), axis=-1), axis=-1)
    metrics = {"loss": loss, "match": jnp.sum(hit) / n_valid, "accept": jnp.mean(accept.astype(jnp.float32))}
    return loss, metrics


def make_lora_step(graphdef, tx: optax.GradientTransformation, *, target: str = "soft", donate: bool = True):
    """A jitted ``step(params, lora_state, batch) -> (lora_state, metrics)``.

    ``params`` (the frozen base ``nnx.State``) is an input only: no gradient is taken with respect to
    it and it is never returned.  ``lora_state`` is :func:`init_lora_state`'s dict; ``batch = {"tokens":
    [B, L], "loss_mask": [B, L] (optional)}``.  ``a`` and ``b`` train; the scale is fixed (no gradient
    flows into it and the update leaves it as it was, whatever the optimizer does with a zero gradient).
    """

    def loss_fn(lora, params, batch):
        module = nnx.merge(graphdef, params)
        lora = dataclasses.replace(lora, scale=jax.lax.stop_gradient(lora.scale))
        return draft_loss(module, batch["tokens"], lora, target=target, loss_mask=batch.get("loss_mask"))

    def step(params, lora_state, batch):
        lora = lora_state["lora"]
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(lora, params, batch)
        updates, opt_state = tx.update(grads, lora_state["opt_state"], lora)
        new_lora = dataclasses.replace(optax.apply_updates(lora, updates), scale=lora.scale)
        metrics = dict(metrics, grad_norm=optax.global_norm(grads))
        return {"lora": new_lora, "opt_state": opt_state, "step": lora_state["step"] + 1}, metrics

    return jax.jit(step, donate_argnums=(1,) if donate else ())


@struct.dataclass
class LoraTrainState:
    """What a draft-LoRA run (``jaxdlm train`` with ``[lora]``) checkpoints: the :func:`make_lora_step` state plus
    the run's ``rng`` (saved under these field names)."""

    step: jax.Array  # int32 []
    lora: OProjLoRA
    opt_state: Any
    rng: jax.Array  # uint32 [2]


def init_lora_state(lora: OProjLoRA, tx: optax.GradientTransformation) -> dict:
    """``{"lora": lora, "opt_state": tx.init(lora), "step": int32 0}``: the state :func:`make_lora_step` updates."""
    return {"lora": lora, "opt_state": tx.init(lora), "step": jnp.zeros((), jnp.int32)}
