"""Self-speculative decoding (SPEC.md section 5): linear (draft pass + verify pass) and quadratic
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

``nfe``: the prefill counts one (SPEC.md); linear counts two per cycle (draft, verify), quadratic one.

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


def _accept(plan, state, draft, verify_logits, q, key):
    """``(a, bonus)`` for drafts ``[R, B-1]`` given verify logits ``[R, B, V]`` (see module docstring)."""
    if plan.sampler.greedy or plan.spec_sampling == "exact":
        ar = choose(verify_logits, key, plan.sampler, state["knobs"])
        return exact_match_accept(draft, ar)
    return speculative_accept(draft, probs(verify_logits, plan.sampler, state["knobs"]), q, key)


def _draft(plan, state, logits, key):
    """Draft tokens from draft logits ``[R, N, V]`` and, for rejection sampling, their distribution."""
    if plan.sampler.greedy or plan.spec_sampling == "exact":
        greedy = type(plan.sampler)(greedy=True, mask_id=plan.sampler.mask_id)
        return choose(logits, key, greedy, state["knobs"]), None
    q = probs(logits, plan.sampler, state["knobs"])
    return choose(logits, key, plan.sampler, state["knobs"]), q


def _finish_cycle(state, plan, active, old_len, cache, draft, a, bonus):
    cache = cache.with_length(jnp.where(active, old_len + a + 1, old_len))
    new = core.accepted_emission(draft, a, bonus, plan.pad_id)
    return core.emit(dict(state, cache=cache), plan, new, a + 1, active)


def linear_program(module, plan: core.Plan, params_dtype, prompts, lens, key, knobs, eos, lora=None):
    """Linear self-speculation: a draft denoise pass (LoRA on) then a causal verify pass (LoRA off)."""
    b = plan.block
    state = core.init_state(module, plan, prompts, lens, key, knobs, eos, params_dtype)
    state = dict(state, nfe=state["nfe"] + 1, total=state["total"] + 1)  # SPEC: the prefill counts one
    draft_lora = lora if plan.use_lora else None

    def body(state):
        active = ~state["done"]
        old_len = state["cache"].length
        blk = core.block_with_masks(state["seed"], b, plan.mask_id)
        dlogits, cache = forward(module, blk, kind="denoise", cache=state["cache"], lora=draft_lora,
                                 **plan.forward_kw)
        draft, q = _draft(plan, state, dlogits[:, 1:], core.step_key(state))
        state = core.count_forward(dict(state, cache=cache), active)
        blk = jnp.concatenate([state["seed"][:, None], draft], axis=1)
        vlogits, cache = forward(module, blk, kind="causal", cache=state["cache"],
                                 num_valid=jnp.where(active, b, 0), **plan.forward_kw)
        a, bonus = _accept(plan, state, draft, vlogits, q, core.step_key(state))
        state = core.count_forward(state, active)
        return _finish_cycle(state, plan, active, old_len, cache, draft, a, bonus)

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
    b = plan.block
    r = prompts.shape[0]
    extra = dict(draft=jnp.full((r, b - 1), plan.mask_id, jnp.int32))
    if not (plan.sampler.greedy or plan.spec_sampling == "exact"):
        v = module.config.vocab_size
        extra["q"] = jnp.broadcast_to(jax.nn.one_hot(plan.mask_id, v, dtype=jnp.float32), (r, b - 1, v))
    state = core.init_state(module, plan, prompts, lens, key, knobs, eos, params_dtype, extra)
    state = dict(state, nfe=state["nfe"] + 1, total=state["total"] + 1)  # the prefill counts one
    rows = jnp.arange(r)

    def body(state):
        active = ~state["done"]
        cache = state["cache"]
        old_len = cache.length
        draft = state["draft"]
        tokens = jnp.concatenate([state["seed"][:, None], draft, jnp.full((r, b * b), plan.mask_id, jnp.int32)], 1)
        q_info, k_info = quadratic_infos(old_len, b, cache.max_len)
        hidden, cache = module(tokens, q_info.pos, q_info, k_info, cache=cache, **plan.forward_kw, return_hidden=True)
        vlogits = core.head(module, hidden[:, :b])
        key_a, key_d = jax.random.split(core.step_key(state))
        a, bonus = _accept(plan, state, draft, vlogits, state.get("q"), key_a)
        groups = hidden[:, b:].reshape(r, b, b, -1)[rows, a]          # [R, B, H] at the acceptance point
        new_draft, new_q = _draft(plan, state, core.head(module, groups[:, 1:]), key_d)
        state = core.count_forward(state, active)
        state["draft"] = jnp.where(active[:, None], new_draft, draft)
        if new_q is not None:
            state["q"] = jnp.where(active[:, None, None], new_q, state["q"])
        return _finish_cycle(state, plan, active, old_len, cache, draft, a, bonus)

    state = jax.lax.while_loop(core.not_done, body, state)
    return core.finish(state, plan)
