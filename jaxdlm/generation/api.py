"""``jaxdlm.generate`` and ``jaxdlm.make_generate_fn``: one implementation of every decoding mode.

Both take the decoding settings as one :class:`~jaxdlm.generation.options.DecodeOptions` (or its fields as
keywords) and build their static plan in one place (:func:`build_plan`: the mode's registry record, the options'
static part, the cache size).  :func:`make_generate_fn` fixes the static choices (mode, batch, prompt length,
``max_new_tokens``, block length, cache size, greedy or sampling, ...) and returns a PURE function of the parameters, the prompts, a PRNG key and
the numeric knobs: it traces under the caller's ``jax.jit``, ``lax.scan``, ``jax.vmap`` and mesh, with no host
callback and no numpy inside.  :func:`generate` is the host wrapper over the same program: argument checks,
prompt bucketing (:func:`bucket_length`, so prompts in one bucket share a compiled program), streaming, a
cached ``jax.jit`` per static plan, numpy out.  The threshold, the diffusion policy and its knobs, temperature,
top-k / top-p values, the thinking budget, EOS ids and seed are traced: changing them never recompiles.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxdlm.generation import core
from jaxdlm.generation.knobs import Knobs
from jaxdlm.generation.modes import MODES, Mode, get_mode, run
from jaxdlm.generation.options import TRACED, DecodeOptions
from jaxdlm.generation.sampling import Sampler
from jaxdlm.model import resolve_layers

# auto mode: AR for short outputs or large batches, linear self-speculation otherwise
AUTO_AR_MIN_BATCH = 16
# KV cache slots are rounded up to a multiple of this: every key tile of the attention kernels (16..128) divides
# it, so a layer of the stacked cache is read in place, never padded
CACHE_ROUND = 64
# EOS ids travel as a traced int32 array padded with -1 (never a token id); its length is static, so up to this
# many ids (the next power of two beyond) share one compiled program
MIN_EOS_SLOTS = 4


def bucket_length(n: int, minimum: int = 64) -> int:
    """Padded prompt length for ``n`` tokens: the next power of two, at least ``minimum``."""
    return max(minimum, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def auto_mode(model, batch: int, max_new_tokens: int, block_length: int | None = None) -> str:
    """The ``mode="auto"`` rule.

    * ``"ar"`` when the model cannot run ``"linear_spec"`` (no MASK token: a plain AR checkpoint), when
      ``batch >= 16`` (compute-bound: the extra draft tokens of self-speculation are no longer free), or when
      ``max_new_tokens <= block_length`` (too short for drafting to pay off; default: the training block);
    * ``"linear_spec"`` otherwise (it uses the draft LoRA when the model has one).
    """
    config = getattr(model, "config", model)  # a Model or its ModelConfig
    block = config.block_size if block_length is None else block_length
    if not MODES["linear_spec"].available(config) or batch >= AUTO_AR_MIN_BATCH or max_new_tokens <= block:
        return "ar"
    return "linear_spec"


def cache_slots(mode: Mode, longest: int, p_len: int, max_new: int, block: int, requested: int | None) -> int:
    """KV cache slots per row: ``requested`` (checked) or the default.

    A row's cache grows to at most ``longest + max_new`` committed tokens and every forward writes up to
    ``mode.widest_write(block)`` tokens after it (scratch for the passes that do not commit them), so that many
    slots are needed; the default also holds the whole bucketed prompt (``p_len``) and a block of margin,
    rounded up to a multiple of :data:`CACHE_ROUND`.  ``block``: the plan's block (1 for modes without one).
    """
    widest = mode.widest_write(block)
    needed = max(p_len, longest + max_new + widest)
    if requested is None:
        return -(-(needed + block) // CACHE_ROUND) * CACHE_ROUND
    if int(requested) < needed:
        raise ValueError(f"cache_length={requested} is too small: prompt length {longest} + max_new_tokens="
                         f"{max_new} + {widest} slots for the widest {mode.name} pass (block_length={block}; and at "
                         f"least the bucketed prompt length {p_len}) need {needed}")
    return int(requested)


def output_pad_id(config) -> int:
    """The id that fills ``tokens[i, lengths[i]:]``: ``config.pad_token_id`` (0 when unset), but never the MASK
    id (a MASK id in the output would read as an undecoded position): then 0, or 1 when MASK is 0."""
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    if pad == config.mask_token_id:
        pad = 0 if config.mask_token_id != 0 else 1
    return int(pad)


def eos_slots_for(n: int) -> int:
    """EOS slots of a program for ``n`` ids: the next power of two >= ``n``, at least :data:`MIN_EOS_SLOTS` (so
    other EOS ids do not recompile)."""
    return max(MIN_EOS_SLOTS, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def padded_eos(ids, slots: int):
    """``int32 [slots]`` EOS ids padded with -1 (never a token id).  ``ids``: an id, a sequence of ids or an
    ``int32 [E]`` array (traced inside a program: padded with ``jnp``; on the host: with numpy)."""
    traced = isinstance(ids, jax.core.Tracer)
    xp = jnp if traced else np
    arr = (ids if traced else np.asarray(ids)).astype(xp.int32).reshape(-1)
    if arr.shape[0] > slots:
        raise ValueError(f"{arr.shape[0]} EOS ids do not fit the program's {slots} EOS slots "
                         f"(make_generate_fn(eos_slots=))")
    return xp.concatenate([arr, xp.full((slots - arr.shape[0],), -1, xp.int32)])


@struct.dataclass
class GenerationOutput:
    """What a generation program returns (a pytree of device arrays; :class:`GenerationResult` is its host copy).

    Attributes:
      tokens: ``int32 [B, max_new_tokens]``; row ``i``'s output is ``tokens[i, :lengths[i]]``, later slots
        hold the pad id (:func:`output_pad_id`).
      lengths: ``int32 [B]`` output length (up to and including the first EOS, at most ``max_new_tokens``).
      nfe: ``int32 [B]`` forward passes row ``i`` took part in (docs/decoding.md accounting).
      total_nfe: ``int32 []`` batched forward passes the program ran.
    """

    tokens: jax.Array
    lengths: jax.Array
    nfe: jax.Array
    total_nfe: jax.Array


@dataclasses.dataclass
class GenerationResult:
    """Output of :func:`generate`.

    Attributes:
      tokens: ``int32 [B, max_new_tokens]``; row ``i``'s output is ``tokens[i, :lengths[i]]`` (up to
        and including its first EOS); later slots hold ``config.pad_token_id`` (0 when unset).
      lengths: ``int32 [B]``.
      nfe: ``int32 [B]`` forward passes that row ``i`` took part in (docs/decoding.md accounting; equal
        to what the row gives when generated alone).
      total_nfe: batched forward passes the program ran (``>= nfe.max()``).
      mode: the mode that ran (the resolved one for ``mode="auto"``).
    """

    tokens: np.ndarray
    lengths: np.ndarray
    nfe: np.ndarray
    total_nfe: int
    mode: str

    @property
    def tpf(self) -> np.ndarray:
        """Tokens per forward per row: ``lengths / nfe`` (``inf`` where ``nfe == 0``)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.lengths / self.nfe

    def sequences(self) -> list[np.ndarray]:
        """Each row's output ``tokens[i, :lengths[i]]``."""
        return [self.tokens[i, :n] for i, n in enumerate(self.lengths)]


# ---------------------------------------------------------------------------------------------------
# the program: one pure function per (graphdef, plan)


def program(graphdef, plan: core.Plan) -> Callable:
    """The pure generation program of ``plan``: ``fn(params, lora, prompts [B, P], lens [B], key, knobs, eos [E])
    -> GenerationOutput`` (``lora``: the draft LoRA or None; unused unless ``plan.use_lora``); the mode's
    registered cycle in :func:`jaxdlm.generation.modes.run`."""
    from flax import nnx

    def run_plan(params, lora, prompts_BxP, lens_B, key, knobs, eos_E) -> GenerationOutput:
        module = nnx.merge(graphdef, params)
        dtype = jax.tree.leaves(params)[0].dtype
        return GenerationOutput(*run(module, plan, dtype, prompts_BxP, lens_B, key, knobs, eos_E, lora=lora))

    return run_plan


@functools.lru_cache(maxsize=64)
def _jitted(graphdef, plan: core.Plan) -> Callable:
    """``jax.jit`` of :func:`program`, one per static plan (what :func:`generate` runs)."""
    return jax.jit(program(graphdef, plan))


# ---------------------------------------------------------------------------------------------------
# argument checks shared by generate() and make_generate_fn()


def _check_sizes(max_new_tokens, block_length):
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive integer")
    if not isinstance(block_length, (int, np.integer)) or block_length < 1:
        raise ValueError(f"block_length={block_length!r} must be an integer >= 1")


def resolve_mode(model, mode: str, batch: int, max_new_tokens: int, block_length: int) -> Mode:
    """The registered mode that runs (``"auto"`` resolved by :func:`auto_mode`), checked against the model (a
    :class:`~jaxdlm.Model` or its config) and the block length."""
    if mode == "auto":
        mode = auto_mode(model, batch, max_new_tokens, block_length)
    record = get_mode(mode)
    record.check(getattr(model, "config", model), block_length)
    return record


def build_plan(model, mode: str, options: DecodeOptions, *, batch: int, longest: int, prompt_length: int,
               max_new_tokens: int, block_length: int | None, cache_length=None, stream=None, impl=None,
               layers: str = "auto", static_overrides: dict | None = None) -> core.Plan:
    """The static plan of one program: the mode resolved and checked, the options' static part, the cache size.

    ``generate`` and ``make_generate_fn`` both build their plan here.  ``options`` must be checked
    (:meth:`DecodeOptions.check`).  ``block_length`` None: the model's training block (``config.block_size``).
    ``static_overrides``: fields of :class:`~jaxdlm.generation.options.StaticChoices` to force (the legacy
    ``sample`` / ``use_top_k`` / ``use_top_p`` flags of ``make_generate_fn``).
    """
    c = model.config
    block_length = c.block_size if block_length is None else block_length
    _check_sizes(max_new_tokens, block_length)
    record = resolve_mode(model, mode, batch, max_new_tokens, block_length)
    options.check_mode(record, block_length)
    static = dataclasses.replace(options.static(record, block_length), **(static_overrides or {}))
    if longest + max_new_tokens > c.max_position_embeddings:
        raise ValueError(f"prompt length {longest} + max_new_tokens={max_new_tokens} exceeds the model's "
                         f"max_position_embeddings={c.max_position_embeddings}")
    block = int(block_length) if record.uses_block else 1  # no role: one program for every block_length
    sampler = Sampler(greedy=not static.sample, use_top_k=static.sample and static.use_top_k,
                      use_top_p=static.sample and static.use_top_p, mask_id=c.mask_token_id)
    return core.Plan(mode=record.name, max_new=int(max_new_tokens), block=block,
                     cache_len=cache_slots(record, longest, prompt_length, int(max_new_tokens), block, cache_length),
                     sampler=sampler, mask_id=c.mask_token_id, pad_id=output_pad_id(c), fixed_steps=static.fixed_steps,
                     spec_sampling=static.spec_sampling, use_lora=bool(static.use_lora and model.lora is not None),
                     stream=stream, impl=impl, layers=resolve_layers(layers))


def _prompt_rows(prompts, vocab_size: int) -> list[np.ndarray]:
    if isinstance(prompts, (np.ndarray, jax.Array)) or (hasattr(prompts, "shape") and hasattr(prompts, "dtype")):
        arr = np.asarray(prompts)
        if arr.ndim == 1:
            raise ValueError(f"prompts must be a list of 1-D token sequences or a 2-D array [batch, length], "
                             f"got a 1-D array of shape {arr.shape}; wrap it as [prompt]")
        if arr.ndim != 2:
            raise ValueError(f"prompts must be a 2-D array [batch, length], got shape {arr.shape}")
        rows = list(arr)
    elif isinstance(prompts, (str, bytes)):
        raise ValueError(f"prompts is a string ({prompts[:40]!r}); prompts are token ids: tokenize the text "
                         f"first, e.g. generate(model, [model.tokenizer(text)['input_ids']])")
    else:
        prompts = list(prompts)
        for i, p in enumerate(prompts):
            if isinstance(p, (str, bytes)):
                raise ValueError(f"prompt row {i} is a string ({p[:40]!r}); prompts are token ids: tokenize the "
                                 f"text first, e.g. model.tokenizer(text)['input_ids']")
        rows = [np.asarray(p) for p in prompts]
    if not rows:
        raise ValueError("prompts is empty: pass at least one prompt row")
    out = []
    for i, row in enumerate(rows):
        if row.ndim == 0:
            raise ValueError(f"prompt row {i} is a single value ({row.item()!r}), not a token sequence: prompts "
                             f"is a list of token id lists; wrap one prompt as [prompt]")
        if row.ndim != 1:
            raise ValueError(f"prompt row {i} must be a 1-D token sequence, got shape {row.shape}")
        if row.size == 0:
            raise ValueError(f"prompt row {i} is empty: every row needs at least one token")
        if row.dtype.kind not in "iu":
            raise ValueError(f"prompt row {i} must hold integer token ids, got dtype {row.dtype}")
        lo, hi = int(row.min()), int(row.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"prompt row {i} contains id {lo if lo < 0 else hi}, outside the vocabulary "
                             f"[0, {vocab_size})")
        out.append(row.astype(np.int32))
    return out


def make_generate_fn(model, *, mode: str, batch: int, prompt_length: int, max_new_tokens: int,
                     block_length: int | None = None, options: DecodeOptions | None = None, sample: bool | None = None,
                     use_top_k: bool | None = None, use_top_p: bool | None = None, cache_length: int | None = None,
                     eos_slots: int = MIN_EOS_SLOTS, impl: str | None = None, layers: str = "auto",
                     **decode_kwargs) -> Callable:
    """A pure generation function with the static choices fixed, for use inside your own JAX code.

    Args (static: each combination is one program):
      model: a :class:`jaxdlm.Model` (its graphdef, config and whether it has a draft LoRA are used; its
        parameters are NOT captured: pass them to the function).
      mode: a registered mode (:data:`jaxdlm.generation.modes.MODES`) or ``"auto"`` (resolved here).
      batch, prompt_length: the prompts' shape ``[batch, prompt_length]`` (right-padded; real lengths are traced).
      max_new_tokens, block_length, cache_length, impl, layers: as in :func:`generate` (``block_length`` None:
        the model's training block, ``config.block_size``).
      options, **decode_kwargs: the decoding settings, as in :func:`generate` (a
        :class:`~jaxdlm.generation.options.DecodeOptions`, fields replaced by keywords).  Their static part
        shapes the program: ``temperature > 0`` compiles sampling, ``top_k`` / ``top_p`` given compile their
        filters, ``threshold=None`` compiles diffusion's fixed schedule (``steps_per_block``); their values are
        the function's defaults for the traced knobs.
      sample, use_top_k, use_top_p: force those static choices (``sample=True`` with a zero temperature makes
        the traced temperature default 1.0).
      eos_slots: how many EOS ids the traced EOS array holds.

    Returns ``fn(params, lora, prompts, prompt_lengths, key, **knobs) -> GenerationOutput``:

      params: the model's parameter pytree (``model.params``, sharded or not); lora: the draft LoRA (or None).
      prompts: ``int32 [batch, prompt_length]``; prompt_lengths: ``int32 [batch]`` (1..prompt_length);
      key: a PRNG key.  ``knobs``: any of ``temperature, top_k, top_p, threshold, policy, margin,
      entropy_bound, max_thinking_tokens, end_think_token_id, eos_token_id``, as Python numbers or traced
      scalars (``eos_token_id``: an id or an ``int32 [E]`` array of ids, ``E <= eos_slots``; ``policy``: a name
      or a traced ``int32`` index into :data:`jaxdlm.generation.policies.REGISTRY`); unset ones take the
      options' values.  A knob the program was not compiled for raises (``threshold=None`` on a threshold
      program, ``top_k`` without the filter, a positive temperature on a greedy program).  Under ``jax.jit``,
      pass the knobs the same way on every call (a Python float and a float32 array are different argument
      types and compile two programs).  Traced values are not checked: out-of-range knobs give unspecified
      (but finite, well-formed) output.

    ``fn`` is pure (no host callback, no numpy on traced values): it runs under ``jax.jit``, ``lax.scan``,
    ``jax.vmap`` (e.g. over keys) and ``jax.set_mesh``, and runs the program :func:`generate` runs for the same
    settings, so it gives exactly its tokens, lengths and nfe (``key = jax.random.PRNGKey(seed)``).
    """
    c = model.config
    if batch < 1 or prompt_length < 1:
        raise ValueError(f"batch={batch} and prompt_length={prompt_length} must be >= 1")
    opts = DecodeOptions.build(options, **decode_kwargs)
    if sample and float(opts.temperature) == 0:
        opts = dataclasses.replace(opts, temperature=1.0)
    opts.check(c)
    overrides = {k: v for k, v in dict(sample=sample, use_top_k=use_top_k, use_top_p=use_top_p).items()
                 if v is not None}
    plan = build_plan(model, mode, opts, batch=batch, longest=prompt_length, prompt_length=prompt_length,
                      max_new_tokens=max_new_tokens, block_length=block_length, cache_length=cache_length,
                      impl=impl, layers=layers, static_overrides=overrides)
    run_plan = program(model.graphdef, plan)
    default_eos = opts.eos_ids(c)

    def fn(params, lora, prompts, prompt_lengths, key, **knobs) -> GenerationOutput:
        if tuple(prompts.shape) != (batch, prompt_length):
            raise ValueError(f"prompts has shape {tuple(prompts.shape)}; this function was made for "
                             f"[batch={batch}, prompt_length={prompt_length}]")
        _check_call_knobs(plan, knobs)
        values = {**opts.knob_values(), **{k: v for k, v in knobs.items() if k != "eos_token_id"}}
        eos = padded_eos(knobs.get("eos_token_id", default_eos), eos_slots)
        return run_plan(params, lora, jnp.asarray(prompts, jnp.int32), jnp.asarray(prompt_lengths, jnp.int32), key,
                        Knobs.make(**values), eos)

    fn.plan = plan
    fn.options = opts
    return fn


def _check_call_knobs(plan: core.Plan, knobs: dict) -> None:
    """The knobs of one call of :func:`make_generate_fn`'s function: known names, and none that the compiled
    program would silently ignore (checked on Python values; traced values pass)."""
    unknown = sorted(set(knobs) - set(TRACED))
    if unknown:
        raise TypeError(f"unknown knob(s) {unknown}; the function takes {list(TRACED)}")
    concrete = {k: v for k, v in knobs.items() if not isinstance(v, jax.core.Tracer)}
    if "threshold" in concrete:
        if concrete["threshold"] is None and plan.fixed_steps is None:
            raise ValueError("threshold=None selects diffusion's fixed schedule, a static choice: make the function "
                             "with make_generate_fn(..., threshold=None) instead")
        if concrete["threshold"] is not None and plan.fixed_steps is not None:
            raise ValueError(f"threshold={concrete['threshold']!r} has no effect: this function runs the fixed "
                             f"schedule (made with threshold=None)")
    t = concrete.get("temperature")
    if t is not None and isinstance(t, (int, float, np.number)) and (float(t) > 0) == plan.sampler.greedy:
        made = "greedy (temperature 0)" if plan.sampler.greedy else "for sampling (temperature > 0)"
        raise ValueError(f"temperature={t!r} does not match this function, which was made {made}: make it with "
                         f"make_generate_fn(..., temperature={'0.0' if not plan.sampler.greedy else t})")
    for name, on in (("top_k", plan.sampler.use_top_k), ("top_p", plan.sampler.use_top_p)):
        if knobs.get(name) is not None and not on:
            raise ValueError(f"{name}={knobs[name]!r} has no effect: this function was made without the {name} "
                             f"filter (make it with a temperature > 0 and {name}= set)")


def _padded_prompts(model, rows: list[np.ndarray], p_len: int):
    """Right-padded ``int32 [B, p_len]`` prompts and ``[B]`` lengths on the device (rows over the mesh's batch axes
    for a sharded model, where they divide)."""
    padded = np.zeros((len(rows), p_len), np.int32)
    for i, r in enumerate(rows):
        padded[i, :len(r)] = r
    # device_put, not jnp.asarray: the latter compiles a copy program per new host-array shape (jax 0.10)
    prompts, lens = jax.device_put(padded), jax.device_put(np.asarray([len(r) for r in rows], np.int32))
    if model.mesh is not None:
        from jaxdlm import sharding as sh

        if len(rows) % sh.batch_size_divisor(model.mesh) == 0:
            prompts = jax.device_put(prompts, sh.batch_sharding(model.mesh, 2))
            lens = jax.device_put(lens, sh.batch_sharding(model.mesh, 1))
    return prompts, lens


def generate(model, prompts, *, mode: str = "auto", max_new_tokens: int = 128, block_length: int | None = None,
             options: DecodeOptions | None = None, stream_callback: Callable | None = None,
             cache_length: int | None = None, impl: str | None = None, layers: str = "auto",
             **decode_kwargs) -> GenerationResult:
    """Generates up to ``max_new_tokens`` tokens after each prompt, in one jitted program.

    Args:
      model: a :class:`jaxdlm.Model` (its ``lora``, when present, is the linear-spec draft LoRA).
      prompts: a list of 1-D token sequences (ragged; right-padded internally and masked per row) or a
        2-D array ``[B, L]`` (every row ``L`` tokens long).
      mode: a registered mode, ``"ar"``, ``"diffusion"``, ``"linear_spec"``, ``"quadratic_spec"``
        (:data:`jaxdlm.generation.modes.MODES`), or ``"auto"`` (see :func:`auto_mode`).
      max_new_tokens: output cap per row (every mode; an EOS beyond it is not emitted).
      block_length: diffusion / draft block length ``N`` (quadratic: ``2 <= N <= 64``); default: the model's
        training block, ``config.block_size``.  AR has no block.
      options, **decode_kwargs: the decoding settings: a :class:`~jaxdlm.generation.options.DecodeOptions`
        and / or its fields as keywords (keywords replace the object's fields): ``temperature`` (0 = greedy),
        ``top_k``, ``top_p``, ``seed``, ``threshold`` (None = diffusion's fixed schedule of
        ``steps_per_block`` steps), ``policy`` (diffusion commit policy: ``"confidence"``, ``"margin"``,
        ``"entropy"``, ``"leftmost"``, :mod:`jaxdlm.generation.policies`) with its knob (``threshold``,
        ``margin`` or ``entropy_bound``), ``spec_sampling`` (``"exact"`` or ``"rejection"``), ``use_lora``,
        ``max_thinking_tokens`` + ``end_think_token_id`` (thinking budget), ``eos_token_id`` (default
        ``config.eos_token_ids``; ``()`` = none).  See :class:`DecodeOptions` for each.  The threshold, the
        policy and its knob, temperature, top-k / top-p values, the thinking budget, EOS ids and seed are
        traced: changing them never recompiles.
      stream_callback: optional host function ``f(tokens int32 [B, N], counts int32 [B])`` called from
        inside the program after every emission; ``tokens[i, :counts[i]]`` are row ``i``'s newly
        final tokens.  A new function object recompiles the program.
      cache_length: KV cache slots per row (default and minimum: :func:`cache_slots`).
      impl: attention backend (default ``JAXDLM_ATTENTION``).
      layers: the forwards' layer loop: ``"auto"`` (default: ``"unrolled"``, straight-line code, on a GPU /
        TPU; ``"scan"`` on a CPU, see :func:`jaxdlm.model.resolve_layers`), ``"unrolled"`` or ``"scan"``; every
        choice gives the same tokens.

    Returns a :class:`GenerationResult` (host numpy arrays).  ``nfe`` as in docs/decoding.md: AR counts
    one per emitted token (the prefill is the first token's forward); diffusion does not count the
    prefill and counts every denoise and commit pass; linear spec counts the prefill plus two per
    cycle; quadratic spec the prefill plus one per cycle.  The program is the one :func:`make_generate_fn`
    builds for the same settings (one :func:`build_plan`).
    """
    c = model.config
    opts = DecodeOptions.build(options, **decode_kwargs).check(c)
    rows = _prompt_rows(prompts, c.vocab_size)
    longest = max(len(r) for r in rows)
    p_len = bucket_length(longest)
    plan = build_plan(model, mode, opts, batch=len(rows), longest=longest, prompt_length=p_len,
                      max_new_tokens=max_new_tokens, block_length=block_length, cache_length=cache_length,
                      stream=stream_callback, impl=impl, layers=layers)
    prompts_BxP, lens_B = _padded_prompts(model, rows, p_len)
    ids = opts.eos_ids(c)
    with model.mesh_context():
        out = _jitted(model.graphdef, plan)(model.params, model.lora, prompts_BxP, lens_B,
                                            jax.random.PRNGKey(opts.seed), opts.knobs(),
                                            jax.device_put(padded_eos(ids, eos_slots_for(len(ids)))))
    out = jax.device_get(out)
    return GenerationResult(tokens=np.asarray(out.tokens), lengths=np.asarray(out.lengths), nfe=np.asarray(out.nfe),
                            total_nfe=int(out.total_nfe), mode=plan.mode)


def ar_generate(model, prompts, **kw) -> GenerationResult:
    """:func:`generate` with ``mode="ar"``."""
    return generate(model, prompts, mode="ar", **kw)


def diffusion_generate(model, prompts, **kw) -> GenerationResult:
    """:func:`generate` with ``mode="diffusion"``."""
    return generate(model, prompts, mode="diffusion", **kw)


def linear_spec_generate(model, prompts, **kw) -> GenerationResult:
    """:func:`generate` with ``mode="linear_spec"``."""
    return generate(model, prompts, mode="linear_spec", **kw)


def quadratic_spec_generate(model, prompts, **kw) -> GenerationResult:
    """:func:`generate` with ``mode="quadratic_spec"``."""
    return generate(model, prompts, mode="quadratic_spec", **kw)
