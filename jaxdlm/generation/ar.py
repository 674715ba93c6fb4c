"""Autoregressive decoding (SPEC.md section 5, "AR"): one token per forward over the KV cache.

``nfe`` accounting: the prefill produces the first token and counts as its forward, every further
token costs one forward, so ``nfe == tokens emitted`` and TPF = 1 (as SPEC.md states).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdlm.generation import core
from jaxdlm.generation.sampling import choose
from jaxdlm.model import forward


def ar_program(module, plan: core.Plan, params_dtype, prompts, lens, key, knobs, eos, lora=None):
    """The AR generation program (traced inside the one jit of :mod:`jaxdlm.generation.api`)."""
    state = core.init_state(module, plan, prompts, lens, key, knobs, eos, params_dtype)
    state = dict(state, nfe=state["nfe"] + 1, total=state["total"] + 1)  # the prefill's forward

    def body(state):
        active = ~state["done"]
        logits, cache = forward(module, state["seed"][:, None], kind="causal", cache=state["cache"],
                                num_valid=active.astype(jnp.int32), **plan.forward_kw)
        tok = choose(logits[:, 0], core.step_key(state), plan.sampler, state["knobs"])
        state = core.count_forward(dict(state, cache=cache), active)
        return core.emit(state, plan, tok[:, None], jnp.ones_like(tok), active)

    state = jax.lax.while_loop(core.not_done, body, state)
    return core.finish(state, plan)
