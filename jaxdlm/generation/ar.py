"""Autoregressive decoding (docs/decoding.md, "AR"): one token per forward over the KV cache.

``nfe`` accounting: the prefill produces the first token and counts as its forward, every further
token costs one forward, so ``nfe == tokens emitted`` and TPF = 1 (docs/decoding.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdlm.generation import core
from jaxdlm.generation.sampling import choose
from jaxdlm.model import forward


def ar_program(module, plan: core.Plan, params_dtype, prompts, lens, key, knobs, eos, lora=None):
    """The AR generation program (traced inside the program of :mod:`jaxdlm.generation.api`)."""
    state = core.init_state(module, plan, prompts, lens, key, knobs, eos, params_dtype)

    def body(state: core.DecodeState):
        active_R = ~state.done
        logits_Rx1xV, cache = forward(module, state.last_token[:, None], kind="causal", cache=state.cache,
                                      num_valid=active_R.astype(jnp.int32), **plan.forward_kw)
        tok_R = choose(logits_Rx1xV[:, 0], core.step_key(state), plan.sampler, state.knobs)
        state = core.count_forward(state.replace(cache=cache), active_R)
        return core.emit(state, plan, tok_R[:, None], jnp.ones_like(tok_R), active_R)

    state = jax.lax.while_loop(core.not_done, body, state)
    return core.finish(state, plan)
