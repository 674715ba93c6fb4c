"""Autoregressive decoding (docs/decoding.md, "AR"): one token per forward over the KV cache.

``nfe`` accounting: the prefill produces the first token and counts as its forward, every further
token costs one forward, so ``nfe == tokens emitted`` and TPF = 1 (docs/decoding.md).
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxdlm.generation import core
from jaxdlm.generation.sampling import choose
from jaxdlm.model import forward


def ar_cycle(module, plan: core.Plan, state: core.DecodeState, lora=None) -> core.DecodeState:
    """One AR cycle: a causal forward of every row's last token, one token chosen and emitted per active row."""
    active_B = ~state.done
    logits_Bx1xV, cache = forward(module, state.last_token[:, None], kind="causal", cache=state.cache,
                                  num_valid=active_B.astype(jnp.int32), **plan.forward_kw)
    tok_B = choose(logits_Bx1xV[:, 0], core.step_key(state), plan.sampler, state.knobs)
    state = core.count_forward(state.replace(cache=cache), active_B)
    return core.emit(state, plan, tok_B[:, None], jnp.ones_like(tok_B), active_B, logits_BxNxV=logits_Bx1xV)
