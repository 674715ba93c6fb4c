"""Shared pieces of the generation programs: the static plan, the traced knobs, the loop state, prefill and
emission.

Every mode is one program: a causal prefill, then a ``lax.while_loop`` whose carry (:class:`DecodeState`) holds
the KV cache, a fixed-size output buffer, per-row counters (emitted tokens, final length, ``nfe``) and per-row
``done`` flags.  Rows that are done still ride along in the batched forward passes (static shapes) but nothing
of theirs changes any more: their cache length, outputs and ``nfe`` are frozen, so row ``i`` of a batch gives
exactly what it gives alone.

Shape names (nanodo style suffixes, e.g. ``blk_BxN``): ``R`` rows (the batch), ``P`` bucketed prompt length,
``S`` cache slots, ``N`` block length (``block_length``), ``V`` vocabulary, ``W`` output buffer width
(``max_new_tokens`` + headroom for the widest emission), ``E`` EOS id slots.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from flax import struct

from jaxdlm.cache import KVCache
from jaxdlm.generation.knobs import Knobs
from jaxdlm.generation.sampling import Sampler, choose, fold_in, keys_per_row, per_row
from jaxdlm.model import forward


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static description of one generation program (hashable: the jit cache key with the graphdef).

    Everything that changes shapes or control flow lives here; numeric knobs (:class:`Knobs`: threshold,
    policy, temperature, top-k / top-p values, thinking budget) and the EOS ids are traced and never recompile.
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


@struct.dataclass
class BlockProgress:
    """A diffusion block in progress, per row: the state a step-wise engine keeps between passes
    (:func:`jaxdlm.generation.diffusion.diffusion_pass`; ``generate`` keeps it inside its denoise loop instead).

    Attributes:
      blk: ``int32 [B, N]`` the block: the seed, then committed tokens and MASK ids.
      masked: ``bool [B, N]`` positions still masked.
      live: ``bool [B]`` the block takes more denoise passes (MASK left and no EOS committed with no MASK before it).
      i: ``int32 [B]`` denoise passes run on this block; 0: no block in progress (the next pass starts one at
        ``[last_token, MASK * (N-1)]``).
    """

    blk: jax.Array
    masked: jax.Array
    live: jax.Array
    i: jax.Array


@struct.dataclass
class DecodeState:
    """The loop carry of every generation program (a pytree; ``state.replace(field=...)`` makes a new one).

    Attributes:
      cache: the KV cache (committed tokens only; passes that commit nothing write scratch slots).
      out: ``int32 [B, W]`` every emitted token, in order (may run past ``max_new`` and past an EOS).
      count: ``int32 [B]`` tokens emitted so far.
      length: ``int32 [B]`` final output length so far (capped at ``max_new``, up to the first EOS).
      ended: ``bool [B]`` an EOS was emitted within the cap.
      done: ``bool [B]`` the row takes no further part (ended, or ``max_new`` tokens out).
      last_token: ``int32 [B]`` the last emitted token: the next token the model is conditioned on (it is not
        in the cache yet).
      think_done: ``bool [B]`` the end-of-thinking token has been emitted.
      nfe: ``int32 [B]`` forward passes the row took part in.
      total: ``int32 []`` batched forward passes run.
      step: ``int32 []`` PRNG counter (one per forward); with per-row keys ``int32 [B]``, one per forward the
        row took part in.
      key: the call's PRNG key, or one per row (``uint32 [B, 2]``: the serving engine; each row's randomness then
        comes from its own key and counter only).
      knobs: the traced numeric settings (:class:`Knobs`): scalars, or ``[B]`` arrays (one value per row).
      eos: ``int32 [E]`` EOS ids (``-1`` = unused slot), or ``int32 [B, E]`` per row.
      draft: quadratic self-speculation: ``int32 [B, N-1]`` the current drafts (else None).
      draft_probs: quadratic rejection sampling: ``float32 [B, N-1, V]`` their draft distributions (else None).
      cap: ``int32 [B]`` per-row output caps ``<= plan.max_new`` (the serving engine's ``max_tokens``), or None
        (every row's cap is ``plan.max_new``).
      logp: ``float32 [B, W]`` the causal (AR) model's log-probability of each emitted token at temperature 1
        (the serving engine's ``logprobs``), or None (not computed).
      block: a step-wise engine's diffusion block in progress (:class:`BlockProgress`), else None.
    """

    cache: KVCache
    out: jax.Array
    count: jax.Array
    length: jax.Array
    ended: jax.Array
    done: jax.Array
    last_token: jax.Array
    think_done: jax.Array
    nfe: jax.Array
    total: jax.Array
    step: jax.Array
    key: jax.Array
    knobs: Knobs
    eos: jax.Array
    draft: jax.Array | None = None
    draft_probs: jax.Array | None = None
    cap: jax.Array | None = None
    logp: jax.Array | None = None
    block: BlockProgress | None = None


def head(module, hidden):
    """Output-head logits ``float32 [..., V]`` of final normed hidden states ``[..., H]``."""
    return module.project(hidden)


def step_key(state: DecodeState, salt: int = 0):
    """A fresh PRNG key for the current forward pass (folded from the call's key and a counter)."""
    return fold_in(fold_in(state.key, state.step), salt)


def init_state(module, plan: Plan, prompts_BxP, lens_B, key, knobs: Knobs, eos_E, params_dtype, *,
               prefill_nfe: int, cap_B=None, logprobs: bool = False, **mode_fields) -> DecodeState:
    """Causal prefill of the right-padded prompts, the first token, and the initial loop state.

    ``prompts_BxP`` int32 (row ``i`` valid up to ``lens_B[i]``).  The prefill writes the K/V of all ``P`` slots
    but advances each row's length by ``lens_B[i]`` only (padding slots are scratch).  The prefill's forward
    counts ``prefill_nfe`` in ``nfe`` (the mode's accounting, :attr:`jaxdlm.generation.modes.Mode.prefill_nfe`).  ``mode_fields`` set the
    mode-specific fields of :class:`DecodeState` (``draft``, ``draft_probs``).  Per-row settings (the serving
    engine): ``key`` ``uint32 [B, 2]``, ``knobs`` of ``[B]`` arrays, ``eos_E`` ``[B, E]`` and ``cap_B`` (per-row
    output caps); ``logprobs``: keep each emitted token's log-probability (:attr:`DecodeState.logp`).
    """
    r = prompts_BxP.shape[0]
    cache = KVCache.init(module.config, r, plan.cache_len, params_dtype)
    hidden_BxPxH, cache = forward(module, prompts_BxP, kind="causal", cache=cache, num_valid=lens_B,
                                  **plan.forward_kw, return_hidden=True)
    last_BxH = jnp.take_along_axis(hidden_BxPxH, (lens_B - 1)[:, None, None], axis=1)[:, 0]
    zeros = jnp.zeros((r,), jnp.int32)
    state = DecodeState(cache=cache, out=jnp.full((r, plan.width), plan.pad_id, jnp.int32), count=zeros,
                        length=zeros, ended=zeros.astype(bool), done=zeros.astype(bool), last_token=zeros,
                        think_done=zeros.astype(bool), nfe=zeros + prefill_nfe,
                        total=jnp.int32(prefill_nfe), step=jnp.zeros(key.shape[:1] if keys_per_row(key) else (),
                                                                     jnp.int32),
                        key=key, knobs=knobs, eos=eos_E, cap=cap_B,
                        logp=jnp.zeros((r, plan.width), jnp.float32) if logprobs else None, **mode_fields)
    logits_BxV = head(module, last_BxH)
    t0_B = choose(logits_BxV, step_key(state), plan.sampler, knobs)
    state = state.replace(step=state.step + 1)
    return emit(state, plan, t0_B[:, None], jnp.ones((r,), jnp.int32), jnp.ones((r,), bool),
                logits_BxNxV=logits_BxV[:, None])


def token_logp(logits_BxNxV, tokens_BxN):
    """``float32 [B, N]``: ``log softmax(logits)[token]`` at temperature 1 over the full vocabulary."""
    logp = jax.nn.log_softmax(logits_BxNxV.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, tokens_BxN[..., None], -1)[..., 0]


def count_forward(state: DecodeState, active_B, n: int = 1) -> DecodeState:
    """``nfe += n`` for active rows; one more batched pass (``total``) and a fresh PRNG step (per-row counters:
    for the active rows only, so a row's randomness never depends on the passes its neighbours take)."""
    step = state.step + (1 if state.step.ndim == 0 else active_B.astype(jnp.int32))
    return state.replace(nfe=state.nfe + n * active_B.astype(jnp.int32), total=state.total + n, step=step)


def is_eos(tokens_BxN, eos):
    """``bool [B, N]``: which tokens are EOS ids (``eos``: ``int32 [E]`` for every row, or ``[B, E]`` per row)."""
    eos_1xE = eos[None, None, :] if eos.ndim == 1 else eos[:, None, :]
    return jnp.any(tokens_BxN[:, :, None] == eos_1xE, axis=-1)


def output_cap(state: DecodeState, plan: Plan):
    """Each row's output cap: ``plan.max_new`` (a Python int), or the per-row ``state.cap`` (``int32 [B]``)."""
    return plan.max_new if state.cap is None else state.cap


def _think_budget(state: DecodeState, new_BxN, n_B, active_B):
    """Thinking budget (always compiled in; traced budget and id, ``end_think < 0`` = off): once a row has emitted
    ``max_thinking`` tokens without ``end_think``, the last token of this emission becomes ``end_think``.
    Returns ``(new_BxN, think_done_B)``."""
    r, nn = new_BxN.shape
    rows, j = jnp.arange(r), jnp.arange(nn)[None, :]
    valid = j < n_B[:, None]
    last = jnp.maximum(n_B - 1, 0)
    end = state.knobs.end_think
    end_col = per_row(end, 2)
    seen_before = state.think_done | jnp.any((new_BxN == end_col) & (j < last[:, None]) & valid, axis=1)
    force = (active_B & (n_B > 0) & ~seen_before & (end >= 0) & (state.count + last >= state.knobs.max_thinking))
    new_BxN = new_BxN.at[rows, last].set(jnp.where(force, end, new_BxN[rows, last]))
    return new_BxN, state.think_done | jnp.any((new_BxN == end_col) & valid, axis=1)


def emit(state: DecodeState, plan: Plan, new_BxN, n_B, active_B, logits_BxNxV=None) -> DecodeState:
    """Appends ``new_BxN[i, :n_B[i]]`` to each active row's output.

    The last appended token is the row's new ``last_token`` (the next token the model is conditioned on).
    Thinking budget: once a row has emitted ``max_thinking`` tokens without ``end_think``, its last token is
    replaced by ``end_think`` before anything is conditioned on it, and the replacement is what is emitted.  A
    row is done once an EOS lands within ``max_new`` tokens or ``max_new`` tokens are out; the stream callback,
    if any, receives the tokens that became final output.  ``logits_BxNxV``: the causal model's logits that
    predict each emitted token (read only when the state keeps log-probabilities, :attr:`DecodeState.logp`).
    """
    r, nn = new_BxN.shape
    rows, j = jnp.arange(r), jnp.arange(nn)[None, :]
    n_B = jnp.where(active_B, n_B, 0)
    valid = j < n_B[:, None]
    new_BxN, think_done = _think_budget(state, new_BxN, n_B, active_B)
    pos = state.count[:, None] + j
    where_BxN = jnp.where(valid, pos, plan.width)
    out = state.out.at[rows[:, None], where_BxN].set(new_BxN, mode="drop")  # past W: dropped
    if state.logp is not None:
        state = state.replace(logp=state.logp.at[rows[:, None], where_BxN].set(
            token_logp(logits_BxNxV, new_BxN), mode="drop"))
    # final length: up to and including the first EOS, capped at max_new
    cap = output_cap(state, plan)
    in_cap = valid & (pos < per_row(cap, 2)) & ~state.ended[:, None]
    eos_BxN = is_eos(new_BxN, state.eos) & in_cap
    hit = jnp.any(eos_BxN, axis=1)
    count = state.count + n_B
    length = jnp.where(state.ended, state.length,
                       jnp.where(hit, state.count + jnp.argmax(eos_BxN, axis=1) + 1, jnp.minimum(count, cap)))
    if plan.stream is not None:
        delta = length - state.length
        jax.debug.callback(plan.stream, jnp.where(j < delta[:, None], new_BxN, plan.pad_id), delta, ordered=True)
    ended = state.ended | hit
    last = jnp.where(active_B & (n_B > 0), new_BxN[rows, jnp.maximum(n_B - 1, 0)], state.last_token)
    return state.replace(out=out, count=count, length=length, ended=ended, think_done=think_done,
                         done=state.done | ended | (count >= cap), last_token=last)


def finish(state: DecodeState, plan: Plan):
    """``(tokens int32 [B, max_new], lengths [B], nfe [B], total [])``; slots past a row's length hold pad."""
    out = state.out[:, :plan.max_new]
    out = jnp.where(jnp.arange(plan.max_new)[None, :] < state.length[:, None], out, plan.pad_id)
    return out, state.length, state.nfe, state.total


def not_done(state: DecodeState):
    return jnp.any(~state.done)


def block_with_masks(last_B, block: int, mask_id: int):
    """``[last token, MASK * (block - 1)]`` per row: ``int32 [B, block]``."""
    r = last_B.shape[0]
    return jnp.concatenate([last_B[:, None], jnp.full((r, block - 1), mask_id, jnp.int32)], axis=1)


def accepted_emission(draft_BxD, a_B, bonus_B, pad_id: int):
    """The tokens a speculative cycle emits: ``draft[:, :a]`` then ``bonus`` (``int32 [B, D+1]``)."""
    r, d = draft_BxD.shape
    j = jnp.arange(d + 1)[None, :]
    padded = jnp.concatenate([draft_BxD, jnp.full((r, 1), pad_id, jnp.int32)], axis=1)
    return jnp.where(j < a_B[:, None], padded, jnp.where(j == a_B[:, None], bonus_B[:, None], pad_id))
