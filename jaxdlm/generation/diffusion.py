"""Block diffusion decoding (docs/decoding.md, "Block diffusion").

Per block ``blk = [seed, MASK * (N-1)]``: denoise passes (bidirectional over the block, the cache
read-only) commit tokens until no MASK is left (at most ``N-1`` steps) or an EOS is committed with no
MASK before it; then one causal commit pass writes the block's K/V and yields the next seed.

Which masked positions a denoise pass commits is the *policy* (:data:`jaxdlm.generation.policies.REGISTRY`, a traced id: switching
policy or changing its knob never recompiles).  Every policy commits at least one masked position per
pass (progress), and every score is read from the temperature-1 softmax over the full vocabulary (MASK
in the denominator, never chosen) of the chosen token ``x0`` (argmax, or a Gumbel-max sample at T > 0):

* ``"confidence"`` (the default, the reference's rule): the most confident masked position and every
  masked position with ``p(x0) >= threshold``.  SGLang's ``low_confidence`` commits the same set up to
  ``>`` against ``>=`` (``p > threshold``, else the most confident one).  ``threshold=None``: a fixed
  schedule of ``fixed_steps`` steps per block; step ``s`` commits the ``(N-1) // steps + (s < (N-1) %
  steps)`` most confident masked positions (ties: lower index first); vLLM's NLD sampler schedules the
  same way (``ceil(masks left / steps left)`` per step gives the same counts).
* ``"margin"``: the masked position with the largest margin and every one with margin ``>= margin``,
  where margin = ``p(x0)`` minus the largest probability of another non-MASK token (top-1 minus top-2
  at T = 0).  Dream / llama.cpp's MARGIN_BASED rank by the same score but commit a scheduled number of
  positions per step; here it is thresholded like ``confidence``.
* ``"entropy"``: masked positions in increasing entropy (ties: lower index first); commit the longest
  such prefix whose summed entropy (inclusive of the last one) is ``<= entropy_bound`` nats, and always
  at least the lowest-entropy one.  The EB-sampler (SGLang ``eb_sampling``) and DiffusionGemma's
  entropy bound admit a position when the sum of the entropies *before* it is within the bound (so they
  commit one position more than this rule at the same bound, and their "at least one" is implicit);
  DiffusionGemma also scores every canvas position (it re-noises), not only masked ones, and the
  EB-sampler drops MASK from the softmax.  SGLang's ``entropy_threshold`` bounds each position's
  entropy instead of the sum.
* ``"leftmost"``: only the leftmost contiguous run: the leftmost masked position (always: the progress
  guarantee, even when ``p(x0) < threshold``) and the masked positions right after it while each has
  ``p(x0) >= threshold``.  The committed part of a block then always grows as a prefix, like AR
  decoding or SDLM's confidence-based consecutive decoding; at ``threshold=1`` it is one denoiser token
  per pass.

Committed tokens are final under every policy (no re-masking or token-to-token edits such as SGLang's
``joint_threshold``), so the reference's early stop at EOS applies unchanged.

``nfe``: the prefill is not counted; every denoise pass and every commit pass counts one (the commit
pass runs for every block, the last one included, as in the reference's pseudo-code, docs/decoding.md).  The draft LoRA is
not used here (the reference's plain diffusion runs the base weights).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdlm.generation import core
from jaxdlm.generation.policies import POLICIES, commit_mask
from jaxdlm.generation.sampling import choose, confidence, per_row
from jaxdlm.model import forward

__all__ = ["POLICIES", "block_fields", "commit_mask", "diffusion_cycle", "diffusion_pass", "fixed_schedule_count",
           "visible_prefix"]


def fixed_schedule_count(step, masks: int, steps: int):
    """Number of masks committed at denoise step ``step`` (0-based) of an even ``steps``-step schedule."""
    base, rem = divmod(masks, steps)
    return base + (step < rem).astype(jnp.int32)


def _fixed_schedule_commit(logits, x0, masked, step, plan: core.Plan):
    """The fixed schedule (``threshold=None``, policy ``confidence``): the ``fixed_schedule_count`` most confident
    masked positions (ties: lower index first)."""
    conf_m = jnp.where(masked, confidence(logits, x0), -jnp.inf)
    n_commit = fixed_schedule_count(step, plan.block - 1, plan.fixed_steps)
    rank = jnp.argsort(jnp.argsort(-conf_m, axis=1, stable=True), axis=1, stable=True)
    return masked & (rank < n_commit)


def _denoise_pass(module, plan: core.Plan, state: core.DecodeState, blk_BxN, masked_BxN, live_B, i):
    """One denoise pass over the blocks of the ``live_B`` rows (the others change nothing): commits masked positions
    by the policy (or the fixed schedule's step ``i``).  Returns ``(state, blk_BxN, masked_BxN, live_B)``, a row
    staying live while MASK is left and no EOS is committed with no MASK before it."""
    logits_BxNxV, cache = forward(module, blk_BxN, kind="denoise", cache=state.cache, **plan.forward_kw)
    x0_BxN = choose(logits_BxNxV, core.step_key(state), plan.sampler, state.knobs)
    if plan.fixed_steps is None:
        commit = commit_mask(state.knobs.policy, logits_BxNxV, x0_BxN, masked_BxN, state.knobs, plan.mask_id)
    else:
        commit = _fixed_schedule_commit(logits_BxNxV, x0_BxN, masked_BxN, i, plan)
    commit = commit & live_B[:, None]
    blk_BxN = jnp.where(commit, x0_BxN, blk_BxN)
    masked_BxN = masked_BxN & ~commit
    state = core.count_forward(state.replace(cache=cache), live_B)
    # stop a row early once an EOS is committed with no MASK before it
    is_eos = core.is_eos(blk_BxN, state.eos) & ~masked_BxN
    no_mask_before = jnp.cumsum(masked_BxN.astype(jnp.int32), axis=1) == 0
    eos_stop = jnp.any(is_eos & no_mask_before, axis=1)
    live_B = live_B & jnp.any(masked_BxN, axis=1) & ~eos_stop
    return state, blk_BxN, masked_BxN, live_B


def _denoise_block(module, plan: core.Plan, state: core.DecodeState, active_B):
    """Denoise passes over ``[last token, MASK * (N-1)]`` until no MASK is left (at most ``N-1`` passes: every
    policy commits at least one; the bound keeps a broken rule from looping forever, its MASK ids would reach
    the output, which the tests reject) or an EOS is committed with no MASK before it.
    Returns ``(state, blk_BxN)``."""
    n = plan.block
    idx = jnp.arange(n)[None, :]

    def denoise_step(carry):
        state, blk_BxN, masked_BxN, live_B, i = carry
        return (*_denoise_pass(module, plan, state, blk_BxN, masked_BxN, live_B, i), i + 1)

    blk_BxN = core.block_with_masks(state.last_token, n, plan.mask_id)
    carry = (state, blk_BxN, jnp.broadcast_to(idx > 0, blk_BxN.shape), active_B, jnp.int32(0))
    state, blk_BxN, _, _, _ = jax.lax.while_loop(lambda c: jnp.any(c[3]) & (c[4] < n - 1), denoise_step, carry)
    return state, blk_BxN


def _commit_pass(module, plan: core.Plan, state: core.DecodeState, blk_BxN, active_B) -> core.DecodeState:
    """The causal commit pass of the ``active_B`` rows' blocks: writes their K/V, chooses the next seed and emits
    ``blk[1:]`` and the seed."""
    n = plan.block
    hidden_BxNxH, cache = forward(module, blk_BxN, kind="causal", cache=state.cache,
                                  num_valid=jnp.where(active_B, n, 0), **plan.forward_kw, return_hidden=True)
    nxt_B = choose(core.head(module, hidden_BxNxH[:, -1]), core.step_key(state), plan.sampler, state.knobs)
    state = core.count_forward(state.replace(cache=cache), active_B)
    new_BxN = jnp.concatenate([blk_BxN[:, 1:], nxt_B[:, None]], axis=1)
    # the commit pass's logits predict each emitted token (computed only when log-probabilities are kept)
    logits = core.head(module, hidden_BxNxH) if state.logp is not None else None
    return core.emit(state, plan, new_BxN, jnp.full_like(nxt_B, n), active_B, logits_BxNxV=logits)


def diffusion_cycle(module, plan: core.Plan, state: core.DecodeState, lora=None) -> core.DecodeState:
    """One block of block diffusion: denoise passes until the block is committed, then the causal commit pass
    that writes its K/V and chooses the next seed.  The draft LoRA is not used (``lora`` is ignored)."""
    active_B = ~state.done
    state, blk_BxN = _denoise_block(module, plan, state, active_B)
    return _commit_pass(module, plan, state, blk_BxN, active_B)


def block_fields(module, plan: core.Plan, batch: int) -> dict:
    """The per-pass form's extra decode state: no block in progress (:class:`core.BlockProgress`)."""
    n = plan.block
    return dict(block=core.BlockProgress(blk=jnp.full((batch, n), plan.mask_id, jnp.int32),
                                         masked=jnp.zeros((batch, n), bool), live=jnp.zeros((batch,), bool),
                                         i=jnp.zeros((batch,), jnp.int32)))


def diffusion_pass(module, plan: core.Plan, state: core.DecodeState, lora=None) -> core.DecodeState:
    """One pass of block diffusion per row (a step-wise engine's cycle; the state carries
    :class:`core.BlockProgress`): a row whose block takes more denoise passes runs one denoise pass (a row with no
    block in progress starts one at ``[last_token, MASK * (N-1)]``), every other running row its commit pass.
    Each row runs the passes, keys and ``nfe`` of :func:`diffusion_cycle`, one per call; each forward runs only
    when some row needs it."""
    n = plan.block
    active_B, p = ~state.done, state.block
    fresh_B = p.i == 0
    blk_BxN = jnp.where(fresh_B[:, None], core.block_with_masks(state.last_token, n, plan.mask_id), p.blk)
    masked_BxN = jnp.where(fresh_B[:, None], jnp.arange(n)[None, :] > 0, p.masked)
    denoise_B = active_B & (fresh_B | p.live) & (p.i < n - 1)
    commit_B = active_B & ~denoise_B
    state, blk_BxN, masked_BxN, live_B = jax.lax.cond(
        jnp.any(denoise_B), lambda s: _denoise_pass(module, plan, s, blk_BxN, masked_BxN, denoise_B, p.i),
        lambda s: (s, blk_BxN, masked_BxN, denoise_B), state)
    state = jax.lax.cond(jnp.any(commit_B), lambda s: _commit_pass(module, plan, s, blk_BxN, commit_B),
                         lambda s: s, state)
    i_B = jnp.where(commit_B, 0, p.i + denoise_B.astype(jnp.int32))
    return state.replace(block=core.BlockProgress(blk=blk_BxN, masked=masked_BxN, live=live_B, i=i_B))


def visible_prefix(state: core.DecodeState, plan: core.Plan):
    """What a step-wise engine may stream before a block's commit pass: the output with each running row's
    committed block prefix (up to its first MASK) appended, and each row's visible length (capped, up to the
    first EOS).  Committed tokens are final under every policy, and the commit pass emits exactly them (the
    thinking budget may replace only its last token, the next seed).  Returns ``(out_BxW, length_B)``."""
    p, r = state.block, state.out.shape[0]
    body_BxM, masked_BxM = p.blk[:, 1:], p.masked[:, 1:]
    j = jnp.arange(body_BxM.shape[1])[None, :]
    prefix_B = jnp.sum(jnp.cumprod(~masked_BxM, axis=1), axis=1).astype(jnp.int32)
    prefix_B = jnp.where((p.i > 0) & ~state.done, prefix_B, 0)
    valid = j < prefix_B[:, None]
    pos = state.count[:, None] + j
    out = state.out.at[jnp.arange(r)[:, None], jnp.where(valid, pos, plan.width)].set(body_BxM, mode="drop")
    cap = core.output_cap(state, plan)
    eos_BxM = core.is_eos(body_BxM, state.eos) & valid & (pos < per_row(cap, 2))
    hit = jnp.any(eos_BxM, axis=1)
    length = jnp.where(state.done | state.ended, state.length,
                       jnp.where(hit, state.count + jnp.argmax(eos_BxM, axis=1) + 1,
                                 jnp.minimum(state.count + prefix_B, cap)))
    return out, length
