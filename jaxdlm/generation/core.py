"""Shared pieces of the generation programs: the static plan, the loop state, prefill and emission.

Every mode is one jitted program: a causal prefill, then a ``lax.while_loop`` whose carry holds the
KV cache, a fixed-size output buffer, per-row counters (emitted tokens, final length, ``nfe``) and
per-row ``done`` flags.  Rows that are done still ride along in the batched forward passes (static
shapes) but nothing of theirs changes any more: their cache length, outputs and ``nfe`` are frozen,
so row ``i`` of a batch gives exactly what it gives alone.

Shapes: ``R`` rows (batch), ``P`` bucketed prompt length, ``S`` cache slots, ``B`` block length,
``V`` vocabulary, ``W`` output buffer width (``max_new_tokens`` + headroom for the widest emission).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from jaxdlm.cache import KVCache
from jaxdlm.generation.sampling import Sampler, choose
from jaxdlm.model import forward

# mode -> number of times its program was traced (a trace precedes every compilation); tests read it
TRACE_COUNTS: collections.Counter = collections.Counter()


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static description of one generation program (hashable: the jit cache key with the graphdef).

    Everything that changes shapes or control flow lives here; numeric knobs (threshold,
    temperature, top-k / top-p values, EOS ids) are traced arguments and never recompile.
    """

    mode: str
    max_new: int
    block: int
    cache_len: int
    sampler: Sampler
    mask_id: int | None
    pad_id: int
    fixed_steps: int | None = None      # diffusion with threshold=None: denoise steps per block
    spec_sampling: str = "exact"        # "exact" (reference) or "rejection" (distribution-preserving)
    use_lora: bool = False
    stream: Callable | None = None
    impl: str | None = None
    layers: str = "unrolled"            # the forwards' layer loop (resolved: model.LAYER_LOOPS)

    @property
    def forward_kw(self) -> dict:
        """Keyword arguments of every forward the program runs (attention backend, layer loop)."""
        return {"impl": self.impl, "layers": self.layers}

    @property
    def width(self) -> int:
        """Output buffer width: ``max_new`` plus the widest single emission."""
        return self.max_new + self.block + 1


def head(module, hidden):
    """Output-head logits ``float32 [..., V]`` of final normed hidden states ``[..., H]``."""
    return module.project(hidden)


def step_key(state, salt: int = 0):
    """A fresh PRNG key for the current forward pass (folded from the call's key and a counter)."""
    return jax.random.fold_in(jax.random.fold_in(state["key"], state["step"]), salt)


def init_state(module, plan: Plan, prompts, lens, key, knobs, eos, params_dtype, extra: dict | None = None):
    """Causal prefill of the right-padded prompts, the first token, and the initial loop state.

    ``prompts int32 [R, P]`` (row ``i`` valid up to ``lens[i]``).  The prefill writes the K/V of all
    ``P`` slots but advances each row's length by ``lens[i]`` only (padding slots are scratch).
    """
    r = prompts.shape[0]
    cache = KVCache.init(module.config, r, plan.cache_len, params_dtype)
    hidden, cache = forward(module, prompts, kind="causal", cache=cache, num_valid=lens, **plan.forward_kw,
                            return_hidden=True)
    last = jnp.take_along_axis(hidden, (lens - 1)[:, None, None], axis=1)[:, 0]
    state = dict(
        cache=cache,
        out=jnp.full((r, plan.width), plan.pad_id, jnp.int32),
        count=jnp.zeros((r,), jnp.int32),       # tokens emitted (may run past max_new / EOS)
        length=jnp.zeros((r,), jnp.int32),      # final output length so far (capped, up to first EOS)
        ended=jnp.zeros((r,), bool),            # an EOS was emitted within the cap
        done=jnp.zeros((r,), bool),
        seed=jnp.zeros((r,), jnp.int32),        # last emitted token = next token fed to the model
        think_done=jnp.zeros((r,), bool),
        nfe=jnp.zeros((r,), jnp.int32),
        total=jnp.zeros((), jnp.int32),
        step=jnp.zeros((), jnp.int32),
        key=key,
        knobs=knobs,
        eos=eos,
    )
    if extra:
        state.update(extra)
    t0 = choose(head(module, last), step_key(state), plan.sampler, knobs)
    state["step"] = state["step"] + 1
    return emit(state, plan, t0[:, None], jnp.ones((r,), jnp.int32), jnp.ones((r,), bool))


def count_forward(state, active, n: int = 1):
    """``nfe += n`` for active rows; one more batched pass (``total``) and a fresh PRNG step."""
    state = dict(state)
    state["nfe"] = state["nfe"] + n * active.astype(jnp.int32)
    state["total"] = state["total"] + n
    state["step"] = state["step"] + 1
    return state


def emit(state, plan: Plan, new, n, active):
    """Appends ``new[i, :n[i]]`` (``int32 [R, N]``) to each active row's output.

    The last appended token is the row's new seed (the next token the model is conditioned on).
    Thinking budget: once a row has emitted ``max_thinking`` tokens without ``end_think``, its new
    seed is replaced by ``end_think`` before anything is conditioned on it, and the replacement is
    what is emitted.  A row is done once an EOS lands within ``max_new`` tokens or ``max_new``
    tokens are out; the stream callback, if any, receives the tokens that became final output.
    """
    state = dict(state)
    r, nn = new.shape
    rows = jnp.arange(r)
    j = jnp.arange(nn)[None, :]
    n = jnp.where(active, n, 0)
    valid = j < n[:, None]
    last = jnp.maximum(n - 1, 0)
    # thinking budget (always compiled in; traced budget and id, end_think < 0 = off)
    end = state["knobs"]["end_think"]
    seen_before = state["think_done"] | jnp.any((new == end) & (j < last[:, None]) & valid, axis=1)
    force = (active & (n > 0) & ~seen_before & (end >= 0)
             & (state["count"] + last >= state["knobs"]["max_thinking"]))
    new = new.at[rows, last].set(jnp.where(force, end, new[rows, last]))
    state["think_done"] = state["think_done"] | jnp.any((new == end) & valid, axis=1)
    pos = state["count"][:, None] + j
    dest = jnp.where(valid, pos, plan.width)  # out of range: dropped
    state["out"] = state["out"].at[rows[:, None], dest].set(new, mode="drop")
    # final length: up to and including the first EOS, capped at max_new
    in_cap = valid & (pos < plan.max_new) & ~state["ended"][:, None]
    is_eos = jnp.any(new[:, :, None] == state["eos"][None, None, :], axis=-1) & in_cap
    first_eos = jnp.argmax(is_eos, axis=1)
    hit = jnp.any(is_eos, axis=1)
    new_count = state["count"] + n
    new_length = jnp.where(state["ended"], state["length"],
                           jnp.where(hit, state["count"] + first_eos + 1, jnp.minimum(new_count, plan.max_new)))
    if plan.stream is not None:
        delta = new_length - state["length"]
        jax.debug.callback(plan.stream, jnp.where(j < delta[:, None], new, plan.pad_id), delta, ordered=True)
    state["length"] = new_length
    state["ended"] = state["ended"] | hit
    state["count"] = new_count
    state["done"] = state["done"] | state["ended"] | (new_count >= plan.max_new)
    state["seed"] = jnp.where(active & (n > 0), new[rows, last], state["seed"])
    return state


def finish(state, plan: Plan):
    """``(tokens int32 [R, max_new], lengths [R], nfe [R], total [])``; slots past a row's length hold pad."""
    out = state["out"][:, :plan.max_new]
    lengths = state["length"]
    out = jnp.where(jnp.arange(plan.max_new)[None, :] < lengths[:, None], out, plan.pad_id)
    return out, lengths, state["nfe"], state["total"]


def not_done(state):
    return jnp.any(~state["done"])


def block_with_masks(seed, block: int, mask_id: int):
    """``[seed, MASK * (block - 1)]`` per row: ``int32 [R, block]``."""
    r = seed.shape[0]
    return jnp.concatenate([seed[:, None], jnp.full((r, block - 1), mask_id, jnp.int32)], axis=1)


def accepted_emission(draft, a, bonus, pad_id: int):
    """The tokens a speculative cycle emits: ``draft[:, :a]`` then ``bonus`` (``int32 [R, N+1]``)."""
    r, n = draft.shape
    j = jnp.arange(n + 1)[None, :]
    padded = jnp.concatenate([draft, jnp.full((r, 1), pad_id, jnp.int32)], axis=1)
    return jnp.where(j < a[:, None], padded, jnp.where(j == a[:, None], bonus[:, None], pad_id))

