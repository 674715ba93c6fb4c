"""The slot engine: continuous batching over the generation package's decode state.

A slot is a batch row of one :class:`~jaxdlm.generation.core.DecodeState` of ``slots`` rows.  :meth:`Engine.insert`
prefills one request into a free slot (one jitted program per prompt bucket, the state donated, the other slots
untouched); :meth:`Engine.step` runs the server mode's :attr:`~jaxdlm.generation.modes.Mode.cycle` once over every
slot (finished and empty slots are masked: nothing of theirs changes) and returns each slot's newly committed
tokens and done flags.  Every per-request setting is a per-row traced value of the state: the knobs
(temperature, top-k, top-p, threshold, policy and its knob, thinking budget), the EOS ids, the output cap
(``max_tokens``) and the PRNG key with its own counter, so no request's value recompiles and no request reads
its neighbours'.

Exactness: a slot computes what row ``i`` of ``generate`` computes, so at T = 0 a request's tokens and ``nfe``
equal ``jaxdlm.generate`` of that prompt alone; at T > 0 its noise comes from its own seed and its own pass
counter, which is what a one-row ``generate`` draws, so seeded sampled outputs equal ``generate`` alone too
(tests/test_serving.py checks both).

Static, shared by every slot: the mode, the block length, the cache slots per row (``max_len``), the largest
``max_tokens`` (``max_new``), sampling compiled in (with the top-k and top-p filters; a slot at temperature 0 takes
the argmax, exactly as a greedy program does), the speculative acceptance rule and the draft LoRA.  Diffusion's
fixed schedule (``threshold=None``) shapes the program and is not served.

Shapes: ``S`` slots, ``P`` bucketed prompt length, ``K`` the widest emission of one step plus one, ``E`` EOS ids.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxdlm.cache import KVCache
from jaxdlm.generation import core
from jaxdlm.generation.api import (CACHE_ROUND, MIN_EOS_SLOTS, bucket_length, output_pad_id, padded_eos,
                                   resolve_mode)
from jaxdlm.generation.knobs import Knobs
from jaxdlm.generation.modes import MODES
from jaxdlm.generation.options import DecodeOptions
from jaxdlm.generation.sampling import Sampler
from jaxdlm.model import resolve_layers


@struct.dataclass
class StepOutput:
    """What one :meth:`Engine.step` returns (numpy on the host).

    Attributes:
      tokens: ``int32 [S, K]``: slot ``i``'s newly final tokens are ``tokens[i, :counts[i]]`` (the first step of a
        request also returns the token its prefill chose).
      counts: ``int32 [S]`` tokens that became final output this step.
      done: ``bool [S]`` the slot's request is finished (EOS, its ``max_tokens``, or cancelled).
      ended: ``bool [S]`` it finished on an EOS.
      nfe: ``int32 [S]`` forward passes the slot's request has taken part in.
      logp: ``float32 [S, K]`` each new token's log-probability (``Engine(logprobs=True)``), else None.
    """

    tokens: jax.Array
    counts: jax.Array
    done: jax.Array
    ended: jax.Array
    nfe: jax.Array
    logp: jax.Array | None = None


@dataclasses.dataclass
class Completion:
    """One finished request of :meth:`Engine.generate_many`.

    Attributes:
      tokens: ``int32 [n]`` the output (up to and including the first EOS, at most ``max_tokens``).
      nfe: forward passes the request took part in (docs/decoding.md accounting, as ``generate``).
      finish_reason: ``"stop"`` (an EOS) or ``"length"`` (``max_tokens``).
      logprobs: ``float32 [n]`` each token's log-probability (``Engine(logprobs=True)``), else None.
    """

    tokens: np.ndarray
    nfe: int
    finish_reason: str
    logprobs: np.ndarray | None = None


def _put(full, rows, slots_K, axis: int):
    """``full`` with its indices ``slots_K`` along ``axis`` replaced by the ``K`` rows ``rows`` (an index past the
    end is dropped: a padding row)."""
    rows = rows.astype(full.dtype)
    if axis == 0:
        return full.at[slots_K].set(rows, mode="drop")
    return full.at[:, slots_K].set(rows, mode="drop")


def put_rows(full: core.DecodeState, rows: core.DecodeState, slots_K) -> core.DecodeState:
    """``full`` with slots ``slots_K`` (``int32 [K]``; ``>= S``: skipped) replaced by the ``K``-row state ``rows``
    (the cache's batch axis is 1, every other per-row field's 0; the batch-wide pass counter ``total`` is kept)."""
    cache = KVCache(k=_put(full.cache.k, rows.cache.k, slots_K, 1), v=_put(full.cache.v, rows.cache.v, slots_K, 1),
                    length=_put(full.cache.length, rows.cache.length, slots_K, 0))
    strip = dict(cache=None, total=None)
    rest = jax.tree.map(lambda f, r: _put(f, r, slots_K, 0), full.replace(**strip), rows.replace(**strip))
    return rest.replace(cache=cache, total=full.total)


class Engine:
    """Continuous batching of one model in one mode over ``slots`` KV-cache rows.

    Args:
      model: a :class:`jaxdlm.Model`.
      mode: a registered mode (``"auto"`` is not: the engine's mode is fixed).
      slots: rows of KV cache (concurrent requests).
      max_len: cache slots per row: a request needs its prompt + ``max_tokens`` + the mode's widest write
        (``Mode.widest_write(block)``) to fit (rounded up to a multiple of 64).
      max_new: the largest ``max_tokens`` a request may ask (default ``max_len``).
      block_length: the diffusion / draft block length (default ``config.block_size``).
      sampling: compile sampling in (per-slot temperature; a slot at 0 is exact argmax); False: greedy only.
      spec_sampling: the self-speculative acceptance rule at T > 0 (``"exact"`` or ``"rejection"``).
      use_lora: the draft LoRA in linear-spec draft passes (when the model has one).
      eos_slots: EOS ids per request at most.
      logprobs: keep each emitted token's log-probability under the causal (AR) model at temperature 1: the
        verify pass's for the self-speculative modes, the commit pass's for diffusion, the forward's for AR.
      impl, layers: the forwards' attention backend and layer loop (as ``generate``).

    One host thread owns an engine (it is not thread-safe): :class:`jaxdlm.serving.server.Worker` in the server,
    :meth:`generate_many` offline.
    """

    def __init__(self, model, *, mode: str = "ar", slots: int = 8, max_len: int = 1024, max_new: int | None = None,
                 block_length: int | None = None, sampling: bool = True, spec_sampling: str = "exact",
                 use_lora: bool = True, eos_slots: int = MIN_EOS_SLOTS, logprobs: bool = False,
                 impl: str | None = None, layers: str = "auto"):
        c = model.config
        if mode == "auto" or mode not in MODES:
            raise ValueError(f"mode={mode!r}: an engine runs one registered mode, one of {tuple(MODES)}")
        if not isinstance(slots, int) or slots < 1:
            raise ValueError(f"slots={slots!r} must be an integer >= 1")
        block_length = c.block_size if block_length is None else int(block_length)
        record = resolve_mode(model, mode, slots, 1, block_length)
        block = block_length if record.uses_block else 1
        max_len = -(-int(max_len) // CACHE_ROUND) * CACHE_ROUND
        max_new = max_len if max_new is None else int(max_new)
        if max_new < 1 or max_len < 1 + record.widest_write(block) + 1:
            raise ValueError(f"max_len={max_len} and max_new={max_new} leave no room for a prompt and one "
                             f"{record.name} pass of {record.widest_write(block)} tokens")
        DecodeOptions(spec_sampling=spec_sampling).check(c)
        self.model, self.mode, self.slots, self.max_len = model, record, slots, max_len
        self.sampling, self.spec_sampling, self.eos_slots = bool(sampling), spec_sampling, int(eos_slots)
        self.logprobs = bool(logprobs)
        sampler = Sampler(greedy=not sampling, use_top_k=bool(sampling), use_top_p=bool(sampling),
                          mask_id=c.mask_token_id)
        self.plan = core.Plan(mode=record.name, max_new=max_new, block=block, cache_len=max_len, sampler=sampler,
                              mask_id=c.mask_token_id, pad_id=output_pad_id(c), spec_sampling=spec_sampling,
                              use_lora=bool(use_lora and model.lora is not None), impl=impl,
                              layers=resolve_layers(layers))
        self.width = block + 1  # K: the widest emission of one cycle, and one more
        self._insert = _insert_fn(model.graphdef, self.plan, record.name, self.logprobs)
        self._steps = {}
        with model.mesh_context():
            self.state = _empty_state(model.graphdef, self.plan, record.name, slots, self.eos_slots,
                                      self.logprobs)(model.params)
        self.alive = np.zeros(slots, bool)      # slots holding a request that is still running
        self.seen = np.zeros(slots, np.int32)   # output tokens of each slot's request already returned by step
        self.free = list(range(slots))[::-1]    # free slots (pop() takes the lowest)

    # ------------------------------------------------------------------------------------------- checks

    def check(self, prompt_len: int, options: DecodeOptions | None, max_tokens) -> DecodeOptions:
        """Checks one request (``options`` None: the defaults); returns its options checked (``ValueError`` naming
        the bad field)."""
        c = self.model.config
        options = (options or DecodeOptions()).check(c)
        options.check_mode(self.mode, self.plan.block)
        if not isinstance(max_tokens, (int, np.integer)) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ValueError(f"max_tokens={max_tokens!r} must be an integer >= 1")
        if max_tokens > self.plan.max_new:
            raise ValueError(f"max_tokens={max_tokens} exceeds this engine's limit of {self.plan.max_new}")
        widest = self.mode.widest_write(self.plan.block)
        if prompt_len + max_tokens + widest > self.max_len or prompt_len + max_tokens > c.max_position_embeddings:
            raise ValueError(f"max_tokens={max_tokens}: the prompt ({prompt_len} tokens) + max_tokens does not fit "
                             f"the context of {min(self.max_len - widest, c.max_position_embeddings)} tokens")
        if self.mode.has_policy and options.threshold is None:
            raise ValueError("threshold=None (diffusion's fixed schedule) shapes the compiled program and is not "
                             "served: give a threshold in [0, 1]")
        if float(options.temperature) > 0 and not self.sampling:
            raise ValueError(f"temperature={options.temperature!r}: this engine is greedy (sampling=False)")
        if options.spec_sampling != self.spec_sampling:
            raise ValueError(f"spec_sampling={options.spec_sampling!r}: this engine runs "
                             f"spec_sampling={self.spec_sampling!r}")
        if len(options.eos_ids(c)) > self.eos_slots:
            raise ValueError(f"eos_token_id: {len(options.eos_ids(c))} ids exceed the engine's {self.eos_slots}")
        return options

    def check_request(self, prompt: Sequence[int], options: DecodeOptions | None, max_tokens):
        """Checks a request's prompt (token ids) and settings; returns ``(prompt int32 [n], options checked)``."""
        row = np.asarray(prompt, np.int32).reshape(-1)
        vocab = self.model.config.vocab_size
        if row.size == 0 or row.min() < 0 or row.max() >= vocab:
            raise ValueError(f"prompt must be 1..{self.max_len} token ids in [0, {vocab})")
        return row, self.check(row.size, options, max_tokens)

    # ------------------------------------------------------------------------------------------- slots

    @property
    def active(self) -> int:
        """Slots holding a running request."""
        return int(self.alive.sum())

    def insert(self, prompt: Sequence[int], options: DecodeOptions | None = None, max_tokens: int = 16) -> int:
        """Prefills one request into a free slot; returns the slot (:meth:`insert_many` of one)."""
        return self.insert_many([(prompt, options, max_tokens)])[0]

    def insert_many(self, requests: Sequence[tuple]) -> list[int]:
        """Prefills ``(prompt, options, max_tokens)`` requests into free slots in one dispatch; returns their slots.
        The prompts (token ids) are padded to the longest one's bucket (:func:`jaxdlm.generation.bucket_length`, at
        most ``max_len``) and the rows to a power of two (at most ``slots``): one compiled program per (rows,
        bucket).  Every request is checked before any is inserted."""
        if len(requests) > len(self.free):
            raise RuntimeError(f"{len(requests)} requests, {len(self.free)} free slots of {self.slots}: wait for a "
                               f"step to finish one")
        c, rows, opts = self.model.config, [], []
        for prompt, options, max_tokens in requests:
            row, o = self.check_request(prompt, options, max_tokens)
            rows.append(row)
            opts.append(o)
        n = len(rows)
        k = min(1 << (n - 1).bit_length(), self.slots)
        p_len = min(bucket_length(max(r.size for r in rows)), self.max_len)
        padded, lens = np.zeros((k, p_len), np.int32), np.ones(k, np.int32)
        for i, r in enumerate(rows):
            padded[i, :r.size], lens[i] = r, r.size
        opts += [DecodeOptions()] * (k - n)  # padding rows: written nowhere
        knobs = jax.tree.map(lambda *x: np.stack([np.asarray(v) for v in x]), *[o.knobs() for o in opts])
        eos = np.stack([padded_eos(o.eos_ids(c), self.eos_slots) for o in opts])
        keys = np.stack([np.asarray(jax.random.PRNGKey(o.seed)) for o in opts])
        caps = np.asarray([m for _, _, m in requests] + [1] * (k - n), np.int32)
        slots = [self.free.pop() for _ in range(n)]
        slots_k = np.asarray(slots + [self.slots] * (k - n), np.int32)
        with self.model.mesh_context():
            self.state = self._insert(self.model.params, self.model.lora, self.state, slots_k, padded, lens, keys,
                                      knobs, eos, caps)
        self.alive[slots], self.seen[slots] = True, 0
        return slots

    def step(self, cycles: int = 1, until_free: int = 1) -> StepOutput:
        """One cycle of the mode over every slot (``cycles > 1``: up to that many in one dispatch, ending early
        once ``until_free`` running slots have finished, or all of them: fewer host round trips, coarser
        streaming); returns each slot's new tokens and flags (numpy).  A slot whose request is done is freed here
        (its next :meth:`insert` may take it at once).  Each ``cycles`` value is one compiled program
        (``until_free`` is traced)."""
        if cycles not in self._steps:
            self._steps[cycles] = _step_fn(self.model.graphdef, self.plan, self.mode.name, self.width, int(cycles))
        with self.model.mesh_context():
            self.state, out = self._steps[cycles](self.model.params, self.model.lora, self.state, self.alive,
                                                  self.seen, np.int32(until_free))
        out = jax.device_get(out)
        self.seen = self.seen + np.where(self.alive, out.counts, 0).astype(np.int32)
        for slot in np.flatnonzero(self.alive & out.done):
            self._release(int(slot))
        return out

    def cancel(self, slot: int) -> None:
        """Stops ``slot``'s request (a client went away): the slot is free now, and its row is masked from the
        next step on."""
        if self.alive[slot]:
            self._release(slot)

    def _release(self, slot: int) -> None:
        self.alive[slot] = False
        self.free.append(slot)
        self.free.sort(reverse=True)

    # ------------------------------------------------------------------------------------------- offline

    def generate_many(self, prompts: Sequence[Sequence[int]], options=None, max_tokens=16,
                      cycles: int = 8) -> list[Completion]:
        """Streams ``prompts`` through the slots (continuous batching); returns one :class:`Completion` per
        prompt, in input order.  ``options``: one :class:`DecodeOptions` (or None) for all, or one per prompt;
        ``max_tokens``: an int for all, or one per prompt.  Every request is checked before the first runs.
        ``cycles``: cycles per dispatch (:meth:`step`).  Prompts start in decreasing ``max_tokens`` (a request's
        output does not depend on when it runs) and enter free slots several per dispatch
        (:meth:`insert_many`), and a dispatch runs until a quarter of the slots (or every waiting prompt's worth) are
        free."""
        n = len(prompts)
        opts = list(options) if isinstance(options, (list, tuple)) else [options] * n
        caps = list(max_tokens) if isinstance(max_tokens, (list, tuple)) else [max_tokens] * n
        if len(opts) != n or len(caps) != n:
            raise ValueError(f"{n} prompts need one options / max_tokens each or one for all, got {len(opts)} "
                             f"and {len(caps)}")
        for p, o, m in zip(prompts, opts, caps):
            self.check(len(p), o, m)
        results: list[Completion | None] = [None] * n
        outputs: dict[int, list] = {}
        logps: dict[int, list] = {}
        owner: dict[int, int] = {}           # slot -> prompt index
        # the largest max_tokens first: the run's tail, where slots empty out, is then made of short requests
        order = sorted(range(n), key=lambda i: -caps[i])
        nxt = 0
        while nxt < n or owner:
            take = order[nxt:nxt + len(self.free)]
            if take:
                for slot, i in zip(self.insert_many([(prompts[j], opts[j], caps[j]) for j in take]), take):
                    owner[slot], outputs[i], logps[i] = i, [], []
                nxt += len(take)
            # a dispatch ends once enough slots are free for a batched insert (at most a quarter of them, at most
            # what still waits), or when every slot is done once nothing waits
            out = self.step(cycles, max(1, min(n - nxt, self.slots // 4)) if nxt < n else self.slots)
            for slot, i in list(owner.items()):
                outputs[i].extend(out.tokens[slot, :out.counts[slot]].tolist())
                if out.logp is not None:
                    logps[i].extend(out.logp[slot, :out.counts[slot]].tolist())
                if out.done[slot]:
                    lp = logps.pop(i)
                    results[i] = Completion(np.asarray(outputs.pop(i), np.int32), int(out.nfe[slot]),
                                            "stop" if out.ended[slot] else "length",
                                            np.asarray(lp, np.float32) if self.logprobs else None)
                    del owner[slot]
        return results


# ---------------------------------------------------------------------------------------------------
# the jitted programs, one per (graphdef, plan)


def _module(graphdef, params):
    from flax import nnx

    return nnx.merge(graphdef, params)


@functools.lru_cache(maxsize=16)
def _empty_state(graphdef, plan: core.Plan, mode: str, slots: int, eos_slots: int, logprobs: bool):
    """A program giving the state of ``slots`` empty (done) rows."""

    def make(params):
        module = _module(graphdef, params)
        record = MODES[mode]
        fields = record.engine_fields(module, plan, slots) if record.engine_fields else {}
        dtype = jax.tree.leaves(params)[0].dtype
        zeros = jnp.zeros((slots,), jnp.int32)
        knobs = jax.tree.map(lambda x: jnp.broadcast_to(x, (slots,)), Knobs.make())
        return core.DecodeState(
            cache=KVCache.init(module.config, slots, plan.cache_len, dtype),
            out=jnp.full((slots, plan.width), plan.pad_id, jnp.int32), count=zeros, length=zeros,
            ended=zeros.astype(bool), done=jnp.ones((slots,), bool), last_token=zeros,
            think_done=zeros.astype(bool), nfe=zeros, total=jnp.int32(0), step=zeros,
            key=jnp.zeros((slots, 2), jnp.uint32), knobs=knobs, eos=jnp.full((slots, eos_slots), -1, jnp.int32),
            cap=zeros, logp=jnp.zeros((slots, plan.width), jnp.float32) if logprobs else None, **fields)

    return jax.jit(make)


@functools.lru_cache(maxsize=16)
def _insert_fn(graphdef, plan: core.Plan, mode: str, logprobs: bool):
    """``insert(params, lora, state, slots [K], prompt [K, P], len [K], key [K, 2], knobs [K], eos [K, E], cap [K])
    -> state``: the causal prefill of ``K`` requests (``core.init_state`` of ``K`` rows) written into ``slots``
    (an index ``>= S``: a padding row, written nowhere)."""

    def insert(params, lora, state, slots_K, prompt_KxP, len_K, key_K, knobs_K, eos_KxE, cap_K):
        module = _module(graphdef, params)
        record = MODES[mode]
        k = prompt_KxP.shape[0]
        fields = record.engine_fields(module, plan, k) if record.engine_fields else {}  # the slots' reset
        dtype = jax.tree.leaves(params)[0].dtype
        rows = core.init_state(module, plan, prompt_KxP, len_K, key_K, knobs_K, eos_KxE, dtype,
                               prefill_nfe=record.prefill_nfe, cap_B=cap_K, logprobs=logprobs, **fields)
        return put_rows(state, rows, slots_K)

    return jax.jit(insert, donate_argnums=(2,))


@functools.lru_cache(maxsize=16)
def _step_fn(graphdef, plan: core.Plan, mode: str, width: int, cycles: int):
    """``step(params, lora, state, alive [S], seen [S], until_free []) -> (state, StepOutput)``: up to ``cycles``
    cycles of the mode over every slot, stopping early once ``until_free`` running slots are done (so that waiting
    requests take them at once) or every slot is;
    slots not ``alive`` are marked done first (nothing of theirs changes).  The output holds each slot's final
    tokens from index ``seen`` on (the first step after an insert also returns the prefill's token)."""

    def step(params, lora, state, alive_S, seen_S, until_free):
        module = _module(graphdef, params)
        state = state.replace(done=state.done | ~alive_S)
        record = MODES[mode]
        cycle = lambda s: record.engine_cycle(module, plan, s, lora if plan.use_lora else None)  # noqa: E731
        if cycles == 1:
            state = cycle(state)
        else:
            def more(carry):  # the first cycle always runs
                s, i = carry
                finished = jnp.sum((alive_S & s.done).astype(jnp.int32))
                return (i == 0) | ((i < cycles) & (finished < until_free) & jnp.any(~s.done))

            state, _ = jax.lax.while_loop(more, lambda c: (cycle(c[0]), c[1] + 1), (state, jnp.int32(0)))
        # final tokens not yet in the output (a diffusion block's committed prefix) stream at once, unless each
        # token's log-probability must come with it (the commit pass computes those)
        early = record.visible is not None and state.logp is None
        out_SxW, length_S = record.visible(state, plan) if early else (state.out, state.length)
        idx_SxK = jnp.minimum(seen_S[:, None] + jnp.arange(width * cycles)[None, :], plan.width - 1)
        tokens_SxK = jnp.take_along_axis(out_SxW, idx_SxK, axis=1)
        logp_SxK = None if state.logp is None else jnp.take_along_axis(state.logp, idx_SxK, axis=1)
        return state, StepOutput(tokens=tokens_SxK, counts=length_S - seen_S, done=state.done, ended=state.ended,
                                 nfe=state.nfe, logp=logp_SxK)

    return jax.jit(step, donate_argnums=(2,))
