"""Block diffusion decoding (SPEC.md section 5, "Diffusion").

Per block ``blk = [seed, MASK * (B-1)]``: denoise passes (bidirectional over the block, the cache
read-only) commit tokens until no MASK is left (at most ``B-1`` steps) or an EOS is committed with no
MASK before it; then one causal commit pass writes the block's K/V and yields the next seed.

* ``threshold`` (traced): each step commits the most confident masked position and every masked
  position whose chosen token has probability ``>= threshold``.
* ``threshold=None``: a fixed schedule of ``fixed_steps`` steps per block; step ``s`` commits the
  ``(B-1) // steps + (s < (B-1) % steps)`` most confident masked positions (ties: lower index first).

``nfe``: the prefill is not counted; every denoise pass and every commit pass counts one (the commit
pass runs for every block, the last one included, as in SPEC.md's pseudo-code).  The draft LoRA is
not used here (the reference's plain diffusion runs the base weights).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdlm.generation import core
from jaxdlm.generation.sampling import choose, confidence
from jaxdlm.model import forward


def fixed_schedule_count(step, masks: int, steps: int):
    """Number of masks committed at denoise step ``step`` (0-based) of an even ``steps``-step schedule."""
    base, rem = divmod(masks, steps)
    return base + (step < rem).astype(jnp.int32)


def diffusion_program(module, plan: core.Plan, params_dtype, prompts, lens, key, knobs, eos, lora=None):
    """The block diffusion program (traced inside the one jit of :mod:`jaxdlm.generation.api`)."""
    b = plan.block
    state = core.init_state(module, plan, prompts, lens, key, knobs, eos, params_dtype)
    idx = jnp.arange(b)[None, :]

    def denoise_step(inner):
        state, blk, masked, live, i = inner
        logits, cache = forward(module, blk, kind="denoise", cache=state["cache"], **plan.forward_kw)
        x0 = choose(logits, core.step_key(state), plan.sampler, state["knobs"])
        conf = confidence(logits, x0)
        conf_m = jnp.where(masked, conf, -jnp.inf)
        if plan.fixed_steps is None:
            best = jnp.argmax(conf_m, axis=1)
            commit = masked & ((conf >= state["knobs"]["threshold"]) | (idx == best[:, None]))
        else:
            n_commit = fixed_schedule_count(i, b - 1, plan.fixed_steps)
            order = jnp.argsort(-conf_m, axis=1, stable=True)
            rank = jnp.argsort(order, axis=1, stable=True)
            commit = masked & (rank < n_commit)
        commit = commit & live[:, None]
        blk = jnp.where(commit, x0, blk)
        masked = masked & ~commit
        state = core.count_forward(dict(state, cache=cache), live)
        # stop a row early once an EOS is committed with no MASK before it
        is_eos = jnp.any(blk[:, :, None] == state["eos"][None, None, :], axis=-1) & ~masked
        no_mask_before = jnp.cumsum(masked.astype(jnp.int32), axis=1) == 0
        eos_stop = jnp.any(is_eos & no_mask_before, axis=1)
        live = live & jnp.any(masked, axis=1) & ~eos_stop
        return state, blk, masked, live, i + 1

    def block_step(state):
        active = ~state["done"]
        blk = core.block_with_masks(state["seed"], b, plan.mask_id)
        masked = jnp.broadcast_to(idx > 0, blk.shape)
        inner = (state, blk, masked, active, jnp.int32(0))
        state, blk, masked, _, _ = jax.lax.while_loop(lambda c: jnp.any(c[3]), denoise_step, inner)
        hidden, cache = forward(module, blk, kind="causal", cache=state["cache"],
                                num_valid=jnp.where(active, b, 0), **plan.forward_kw, return_hidden=True)
        seed = choose(core.head(module, hidden[:, -1]), core.step_key(state), plan.sampler, state["knobs"])
        state = core.count_forward(dict(state, cache=cache), active)
        new = jnp.concatenate([blk[:, 1:], seed[:, None]], axis=1)
        return core.emit(state, plan, new, jnp.full_like(seed, b), active)

    state = jax.lax.while_loop(core.not_done, block_step, state)
    return core.finish(state, plan)
