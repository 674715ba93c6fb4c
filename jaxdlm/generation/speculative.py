"""Self-speculative decoding (docs/decoding.md): linear (draft pass + verify pass) and quadratic
(TiDAR-style: verification and the next draft in one forward over ``B(B+1)`` tokens).

Both keep the row's seed (last emitted token, not yet in the cache) in front of ``B-1`` drafts, verify
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

Quadratic layout (``T = B + B*B`` tokens, order ``[d_0..d_{B-1}, group_0 masks, ..., group_{B-1} masks]``,
``c`` = cache length): ``d_0`` is the seed and ``d_1..d_{B-1}`` the current drafts, CLEAN tokens at
positions ``c+j`` in block ``j+1``; group ``j``'s ``B`` masks are NOISY block ``j+2`` at positions
``c+j+1..c+j+B``, so by :func:`jaxdlm.attention.masks.allowed` they see the cache, ``d_0..d_j`` and their own
group.  The forward writes all ``B + B*B`` tokens' K/V at slots ``c..`` (the masks' slots are scratch, so the
cache needs ``B + B*B`` free slots) and the crop keeps the accepted drafts only.  The first cycle has no drafts yet: its drafts are MASK
ids (never accepted, since MASK is never chosen), so it emits exactly one token and yields the first
real draft.  The next draft comes from the group at the acceptance point; its first mask (predicting
the bonus position) is replaced by the exact AR bonus.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdlm.attention.masks import CLEAN, NOISY, TokenInfo
from jaxdlm.generation import core
from jaxdlm.generation.sampling import choose, exact_match_accept, probs, speculative_accept
from jaxdlm.model import forward


def _accept(plan, state: core.DecodeState, draft_RxD, verify_logits_RxNxV, q_RxDxV, key):
    """``(a_R, bonus_R)`` for drafts ``[R, N-1]`` given verify logits ``[R, N, V]`` (see module docstring)."""
    if plan.sampler.greedy or plan.spec_sampling == "exact":
        ar_RxN = choose(verify_logits_RxNxV, key, plan.sampler, state.knobs)
        return exact_match_accept(draft_RxD, ar_RxN)
    return speculative_accept(draft_RxD, probs(verify_logits_RxNxV, plan.sampler, state.knobs), q_RxDxV, key)


def _draft(plan, state: core.DecodeState, logits_RxDxV, key):
    """Draft tokens from draft logits ``[R, D, V]`` and, for rejection sampling, their distribution."""
    if plan.sampler.greedy or plan.spec_sampling == "exact":
        greedy = type(plan.sampler)(greedy=True, mask_id=plan.sampler.mask_id)
        return choose(logits_RxDxV, key, greedy, state.knobs), None
    q_RxDxV = probs(logits_RxDxV, plan.sampler, state.knobs)
    return choose(logits_RxDxV, key, plan.sampler, state.knobs), q_RxDxV


def _finish_cycle(state: core.DecodeState, plan, active_R, old_len_R, cache, draft_RxD, a_R, bonus_R):
    """Crop each active row's cache to ``old length + a + 1`` and emit its ``a`` accepted drafts + the bonus."""
    cache = cache.with_length(jnp.where(active_R, old_len_R + a_R + 1, old_len_R))
    new = core.accepted_emission(draft_RxD, a_R, bonus_R, plan.pad_id)
    return core.emit(state.replace(cache=cache), plan, new, a_R + 1, active_R)


def linear_program(module, plan: core.Plan, params_dtype, prompts, lens, key, knobs, eos, lora=None):
    """Linear self-speculation: a draft denoise pass (LoRA on) then a causal verify pass (LoRA off)."""
    n = plan.block
    state = core.init_state(module, plan, prompts, lens, key, knobs, eos, params_dtype)
    draft_lora = lora if plan.use_lora else None

    def body(state: core.DecodeState):
        active_R = ~state.done
        old_len_R = state.cache.length
        blk_RxN = core.block_with_masks(state.last_token, n, plan.mask_id)
        dlogits_RxNxV, cache = forward(module, blk_RxN, kind="denoise", cache=state.cache, lora=draft_lora,
                                       **plan.forward_kw)
        draft_RxD, q_RxDxV = _draft(plan, state, dlogits_RxNxV[:, 1:], core.step_key(state))
        state = core.count_forward(state.replace(cache=cache), active_R)
        blk_RxN = jnp.concatenate([state.last_token[:, None], draft_RxD], axis=1)
        vlogits_RxNxV, cache = forward(module, blk_RxN, kind="causal", cache=state.cache,
                                       num_valid=jnp.where(active_R, n, 0), **plan.forward_kw)
        a_R, bonus_R = _accept(plan, state, draft_RxD, vlogits_RxNxV, q_RxDxV, core.step_key(state))
        state = core.count_forward(state, active_R)
        return _finish_cycle(state, plan, active_R, old_len_R, cache, draft_RxD, a_R, bonus_R)

    state = jax.lax.while_loop(core.not_done, body, state)
    return core.finish(state, plan)


def quadratic_infos(length, block: int, max_len: int):
    """Query and key :class:`TokenInfo` of the quadratic layout for cache lengths ``length [R]``.

    Queries: ``B + B*B`` tokens (see the module docstring).  Keys: the ``max_len`` cache slots after the
    forward wrote all ``B + B*B`` tokens at slots ``c..``: the ``B`` drafts at ``c..c+B-1`` (CLEAN, blocks
    ``1..B``), then the masks at ``c+B..c+B+B*B-1`` (scratch slots that keep the masks' own metadata);
    later slots are invalid.
    """
    r = length.shape[0]
    c = length[:, None].astype(jnp.int32)
    j = jnp.arange(block, dtype=jnp.int32)
    d_pos = c + j[None, :]
    m_pos = (c[:, :, None] + j[None, :, None] + 1 + j[None, None, :]).reshape(r, block * block)
    m_block = jnp.broadcast_to(jnp.repeat(j + 2, block)[None, :], (r, block * block))
    full = lambda shape, v: jnp.full(shape, v, jnp.int32)  # noqa: E731
    q = TokenInfo(
        pos=jnp.concatenate([d_pos, m_pos], axis=1),
        block=jnp.concatenate([jnp.broadcast_to(j[None, :] + 1, (r, block)), m_block], axis=1),
        stream=jnp.concatenate([full((r, block), CLEAN), full((r, block * block), NOISY)], axis=1),
        valid=jnp.ones((r, block + block * block), bool),
    )
    slot = jnp.broadcast_to(jnp.arange(max_len, dtype=jnp.int32)[None, :], (r, max_len))
    idx = jnp.clip(slot - c, 0, block + block * block - 1)  # which new token a slot >= c holds
    new = slot >= c
    pick = lambda x: jnp.take_along_axis(x, idx, axis=1)  # noqa: E731
    k = TokenInfo(pos=jnp.where(new, pick(q.pos), slot), block=jnp.where(new, pick(q.block), 0),
                  stream=jnp.where(new, pick(q.stream), CLEAN), valid=slot < c + block + block * block)
    return q, k


def quadratic_program(module, plan: core.Plan, params_dtype, prompts, lens, key, knobs, eos, lora=None):
    """Quadratic self-speculation: one forward per cycle verifies the drafts and drafts the next block."""
    n = plan.block
    r = prompts.shape[0]
    fields = dict(draft=jnp.full((r, n - 1), plan.mask_id, jnp.int32))  # no draft yet: never accepted
    if not (plan.sampler.greedy or plan.spec_sampling == "exact"):
        v = module.config.vocab_size
        fields["draft_probs"] = jnp.broadcast_to(jax.nn.one_hot(plan.mask_id, v, dtype=jnp.float32), (r, n - 1, v))
    state = core.init_state(module, plan, prompts, lens, key, knobs, eos, params_dtype, **fields)
    rows = jnp.arange(r)

    def body(state: core.DecodeState):
        active_R = ~state.done
        old_len_R = state.cache.length
        draft_RxD = state.draft
        tokens = jnp.concatenate([state.last_token[:, None], draft_RxD,
                                  jnp.full((r, n * n), plan.mask_id, jnp.int32)], axis=1)
        q_info, k_info = quadratic_infos(old_len_R, n, state.cache.max_len)
        hidden, cache = module(tokens, q_info.pos, q_info, k_info, cache=state.cache, **plan.forward_kw,
                               return_hidden=True)
        vlogits_RxNxV = core.head(module, hidden[:, :n])
        key_a, key_d = jax.random.split(core.step_key(state))
        a_R, bonus_R = _accept(plan, state, draft_RxD, vlogits_RxNxV, state.draft_probs, key_a)
        group_RxNxH = hidden[:, n:].reshape(r, n, n, -1)[rows, a_R]          # the group at the acceptance point
        new_draft, new_q = _draft(plan, state, core.head(module, group_RxNxH[:, 1:]), key_d)
        state = core.count_forward(state, active_R)
        state = state.replace(draft=jnp.where(active_R[:, None], new_draft, draft_RxD))
        if new_q is not None:
            state = state.replace(draft_probs=jnp.where(active_R[:, None, None], new_q, state.draft_probs))
        return _finish_cycle(state, plan, active_R, old_len_R, cache, draft_RxD, a_R, bonus_R)

    state = jax.lax.while_loop(core.not_done, body, state)
    return core.finish(state, plan)
