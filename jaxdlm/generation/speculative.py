"""Self-speculative decoding (docs/decoding.md): linear (draft pass + verify pass) and quadratic
(TiDAR-style: verification and the next draft in one forward over ``N(N+1)`` tokens).

Both keep the row's seed (last emitted token, not yet in the cache) in front of ``N-1`` drafts, verify
them with causal attention (the exact AR model, LoRA off), accept the longest verified prefix ``a``
plus one bonus token, and crop the cache to ``old_length + a + 1`` per row.  Emitted tokens per cycle:
``a + 1`` (outputs are capped at ``max_new_tokens``).

Acceptance (``spec_sampling``):

* ``"exact"`` (the reference): drafts are argmax fills; the verifier chooses its own token at every
  position (argmax at T=0, a Gumbel sample at T>0) and drafts are accepted while they equal those
  choices; the bonus is the verifier's choice at the first mismatch.  Every emitted token is the
  verifier's own choice made with fresh noise, so at T=0 the output equals ``ar_generate``.
* ``"rejection"`` (distribution-preserving speculative sampling): drafts are sampled from the draft
  distribution ``q``; draft ``i`` is accepted with probability ``min(1, p/q)``; the first rejection
  emits a sample of ``max(p - q, 0)`` (normalised), full acceptance a sample of ``p``.  The emitted
  sequence is distributed exactly as AR sampling with the same temperature / top-k / top-p.  At T=0
  both flavours coincide.

``nfe``: the prefill counts one (docs/decoding.md); linear counts two per cycle (draft, verify), quadratic one.

Quadratic layout (``T = N + N*N`` tokens, order ``[d_0..d_{N-1}, group_0 masks, ..., group_{N-1} masks]``,
``c`` = cache length): ``d_0`` is the seed and ``d_1..d_{N-1}`` the current drafts, CLEAN tokens at
positions ``c+j`` in block ``j+1``; group ``j``'s ``N`` masks are NOISY block ``j+2`` at positions
``c+j+1..c+j+N``, so by :func:`jaxdlm.attention.masks.allowed` they see the cache, ``d_0..d_j`` and their own
group (:func:`jaxdlm.attention.masks.quadratic_info`; the model runs it as ``forward(kind="quadratic")``).
The forward writes all ``N + N*N`` tokens' K/V at slots ``c..`` (the masks' slots are scratch, so the cache
needs ``N + N*N`` free slots) and the crop keeps the accepted drafts only.  The first cycle has no drafts yet: its drafts are MASK
ids (never accepted, since MASK is never chosen), so it emits exactly one token and yields the first
real draft.  The next draft comes from the group at the acceptance point; its first mask (predicting
the bonus position) is replaced by the exact AR bonus.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdlm.generation import core
from jaxdlm.generation.sampling import choose, exact_match_accept, probs, speculative_accept, split2
from jaxdlm.model import forward


def _accept(plan, state: core.DecodeState, draft_BxD, verify_logits_BxNxV, q_BxDxV, key):
    """``(a_B, bonus_B)`` for drafts ``[B, N-1]`` given verify logits ``[B, N, V]`` (see module docstring)."""
    if plan.sampler.greedy or plan.spec_sampling == "exact":
        ar_BxN = choose(verify_logits_BxNxV, key, plan.sampler, state.knobs)
        return exact_match_accept(draft_BxD, ar_BxN)
    return speculative_accept(draft_BxD, probs(verify_logits_BxNxV, plan.sampler, state.knobs), q_BxDxV, key)


def _draft(plan, state: core.DecodeState, logits_BxDxV, key):
    """Draft tokens from draft logits ``[B, D, V]`` and, for rejection sampling, their distribution."""
    if plan.sampler.greedy or plan.spec_sampling == "exact":
        greedy = type(plan.sampler)(greedy=True, mask_id=plan.sampler.mask_id)
        return choose(logits_BxDxV, key, greedy, state.knobs), None
    q_BxDxV = probs(logits_BxDxV, plan.sampler, state.knobs)
    return choose(logits_BxDxV, key, plan.sampler, state.knobs), q_BxDxV


def _finish_cycle(state: core.DecodeState, plan, active_B, old_len_B, cache, draft_BxD, a_B, bonus_B, vlogits_BxNxV):
    """Crop each active row's cache to ``old length + a + 1`` and emit its ``a`` accepted drafts + the bonus
    (``vlogits_BxNxV[:, j]``, the verify pass's logits, predict emitted token ``j``)."""
    cache = cache.with_length(jnp.where(active_B, old_len_B + a_B + 1, old_len_B))
    new = core.accepted_emission(draft_BxD, a_B, bonus_B, plan.pad_id)
    return core.emit(state.replace(cache=cache), plan, new, a_B + 1, active_B, logits_BxNxV=vlogits_BxNxV)


def linear_cycle(module, plan: core.Plan, state: core.DecodeState, lora=None) -> core.DecodeState:
    """One linear self-speculation cycle: a draft denoise pass (``lora`` on) then a causal verify pass (LoRA off)."""
    n = plan.block
    active_B = ~state.done
    old_len_B = state.cache.length
    blk_BxN = core.block_with_masks(state.last_token, n, plan.mask_id)
    dlogits_BxNxV, cache = forward(module, blk_BxN, kind="denoise", cache=state.cache, lora=lora, **plan.forward_kw)
    draft_BxD, q_BxDxV = _draft(plan, state, dlogits_BxNxV[:, 1:], core.step_key(state))
    state = core.count_forward(state.replace(cache=cache), active_B)
    blk_BxN = jnp.concatenate([state.last_token[:, None], draft_BxD], axis=1)
    vlogits_BxNxV, cache = forward(module, blk_BxN, kind="causal", cache=state.cache,
                                   num_valid=jnp.where(active_B, n, 0), **plan.forward_kw)
    a_B, bonus_B = _accept(plan, state, draft_BxD, vlogits_BxNxV, q_BxDxV, core.step_key(state))
    state = core.count_forward(state, active_B)
    return _finish_cycle(state, plan, active_B, old_len_B, cache, draft_BxD, a_B, bonus_B, vlogits_BxNxV)


def quadratic_fields(module, plan: core.Plan, batch: int) -> dict:
    """Quadratic self-speculation's extra decode state before the first cycle: no draft yet (MASK ids, never
    accepted) and, for rejection sampling, their one-hot draft distributions."""
    n = plan.block
    fields = dict(draft=jnp.full((batch, n - 1), plan.mask_id, jnp.int32))
    if not (plan.sampler.greedy or plan.spec_sampling == "exact"):
        v = module.config.vocab_size
        fields["draft_probs"] = jnp.broadcast_to(jax.nn.one_hot(plan.mask_id, v, dtype=jnp.float32),
                                                 (batch, n - 1, v))
    return fields


def quadratic_cycle(module, plan: core.Plan, state: core.DecodeState, lora=None) -> core.DecodeState:
    """One quadratic self-speculation cycle: one forward verifies the drafts and drafts the next block."""
    n = plan.block
    b = state.last_token.shape[0]
    active_B = ~state.done
    old_len_B = state.cache.length
    draft_BxD = state.draft
    tokens_BxT = jnp.concatenate([state.last_token[:, None], draft_BxD,
                                  jnp.full((b, n * n), plan.mask_id, jnp.int32)], axis=1)
    hidden_BxTxH, cache = forward(module, tokens_BxT, kind="quadratic", cache=state.cache, **plan.forward_kw,
                                  return_hidden=True)
    vlogits_BxNxV = core.head(module, hidden_BxTxH[:, :n])
    key_a, key_d = split2(core.step_key(state))
    a_B, bonus_B = _accept(plan, state, draft_BxD, vlogits_BxNxV, state.draft_probs, key_a)
    group_BxNxH = hidden_BxTxH[:, n:].reshape(b, n, n, -1)[jnp.arange(b), a_B]  # the group at the acceptance point
    new_draft, new_q = _draft(plan, state, core.head(module, group_BxNxH[:, 1:]), key_d)
    state = core.count_forward(state, active_B)
    state = state.replace(draft=jnp.where(active_B[:, None], new_draft, draft_BxD))
    if new_q is not None:
        state = state.replace(draft_probs=jnp.where(active_B[:, None, None], new_q, state.draft_probs))
    return _finish_cycle(state, plan, active_B, old_len_B, cache, draft_BxD, a_B, bonus_B, vlogits_BxNxV)
