"""``jaxdlm.generate`` and ``jaxdlm.make_generate_fn``: one implementation of every decoding mode.

:func:`make_generate_fn` fixes the static choices (mode, batch, prompt length, ``max_new_tokens``, block length,
cache size, greedy or sampling, ...) and returns a PURE function of the parameters, the prompts, a PRNG key and
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
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxdlm.generation import core
from jaxdlm.generation.ar import ar_program
from jaxdlm.generation.diffusion import diffusion_program
from jaxdlm.generation.knobs import POLICIES, POLICY_KNOB_DEFAULTS, Knobs
from jaxdlm.generation.sampling import Sampler
from jaxdlm.generation.speculative import linear_program, quadratic_program
from jaxdlm.model import resolve_layers

MODES = ("ar", "diffusion", "linear_spec", "quadratic_spec", "auto")
SPEC_SAMPLING = ("exact", "rejection")
PROGRAMS = {"ar": ar_program, "diffusion": diffusion_program, "linear_spec": linear_program,
            "quadratic_spec": quadratic_program}
MAX_QUADRATIC_BLOCK = 64  # B(B+1) = 4160 tokens per forward at most
# diffusion policy -> the generate() argument of its knob ("confidence" / "leftmost" read threshold)
POLICY_KNOBS = {"margin": "margin", "entropy": "entropy_bound"}
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


def auto_mode(model, batch: int, max_new_tokens: int, block_length: int) -> str:
    """The ``mode="auto"`` rule.

    * ``"ar"`` when the model has no MASK token (a plain AR checkpoint), when ``batch >= 16``
      (compute-bound: the extra draft tokens of self-speculation are no longer free), or when
      ``max_new_tokens <= block_length`` (too short for drafting to pay off);
    * ``"linear_spec"`` otherwise (it uses the draft LoRA when the model has one).
    """
    if model.config.mask_token_id is None or batch >= AUTO_AR_MIN_BATCH or max_new_tokens <= block_length:
        return "ar"
    return "linear_spec"


def widest_write(mode: str, block: int) -> int:
    """Most tokens one forward writes after a row's cache length: 1 (AR), ``N`` (diffusion, linear spec),
    ``N + N*N`` (quadratic spec: the masks' K/V go to scratch slots too)."""
    return {"ar": 1, "quadratic_spec": block + block * block}.get(mode, block)


def cache_slots(mode: str, longest: int, p_len: int, max_new: int, block: int, requested: int | None) -> int:
    """KV cache slots per row: ``requested`` (checked) or the default.

    A row's cache grows to at most ``longest + max_new`` committed tokens and every forward writes up to
    :func:`widest_write` tokens after it (scratch for the passes that do not commit them), so that many
    slots are needed; the default also holds the whole bucketed prompt (``p_len``) and a block of margin,
    rounded up to a multiple of :data:`CACHE_ROUND`.
    """
    widest = widest_write(mode, 1 if mode == "ar" else block)
    needed = max(p_len, longest + max_new + widest)
    if requested is None:
        return -(-(needed + (1 if mode == "ar" else block)) // CACHE_ROUND) * CACHE_ROUND
    if int(requested) < needed:
        raise ValueError(f"cache_length={requested} is too small: prompt length {longest} + max_new_tokens="
                         f"{max_new} + {widest} slots for the widest {mode} pass (block_length={block}; and at "
                         f"least the bucketed prompt length {p_len}) need {needed}")
    return int(requested)


def output_pad_id(config) -> int:
    """The id that fills ``tokens[i, lengths[i]:]``: ``config.pad_token_id`` (0 when unset), but never the MASK
    id (a MASK id in the output would read as an undecoded position): then 0, or 1 when MASK is 0."""
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    if pad == config.mask_token_id:
        pad = 0 if config.mask_token_id != 0 else 1
    return int(pad)


def eos_ids(config, eos_token_id) -> tuple[int, ...]:
    """The EOS ids of a call: ``config.eos_token_ids`` for None, else the id or ids given (``()`` = none)."""
    if eos_token_id is None:
        return tuple(config.eos_token_ids or ())
    if isinstance(eos_token_id, (int, np.integer)):
        return (int(eos_token_id),)
    return tuple(int(e) for e in eos_token_id)


def eos_array(ids: Sequence[int], slots: int | None = None) -> np.ndarray:
    """``int32 [E]`` EOS ids padded with -1; ``E`` = ``slots`` or the next power of two >= ``len(ids)``, at least
    :data:`MIN_EOS_SLOTS` (so other EOS ids do not recompile)."""
    e = slots or max(MIN_EOS_SLOTS, 1 << max(0, math.ceil(math.log2(max(len(ids), 1)))))
    if len(ids) > e:
        raise ValueError(f"{len(ids)} EOS ids do not fit the program's {e} EOS slots (make_generate_fn(eos_slots=))")
    arr = np.full((e,), -1, np.int32)
    arr[:len(ids)] = ids
    return arr


@struct.dataclass
class GenerationOutput:
    """What a generation program returns (a pytree of device arrays; :class:`GenerationResult` is its host copy).

    Attributes:
      tokens: ``int32 [R, max_new_tokens]``; row ``i``'s output is ``tokens[i, :lengths[i]]``, later slots
        hold the pad id (:func:`output_pad_id`).
      lengths: ``int32 [R]`` output length (up to and including the first EOS, at most ``max_new_tokens``).
      nfe: ``int32 [R]`` forward passes row ``i`` took part in (docs/decoding.md accounting).
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
    """The pure generation program of ``plan``: ``fn(params, lora, prompts [R, P], lens [R], key, knobs, eos [E])
    -> GenerationOutput`` (``lora``: the draft LoRA or None; unused unless ``plan.use_lora``)."""
    from flax import nnx

    def run(params, lora, prompts_RxP, lens_R, key, knobs: Knobs, eos_E) -> GenerationOutput:
        module = nnx.merge(graphdef, params)
        dtype = jax.tree.leaves(params)[0].dtype
        out = PROGRAMS[plan.mode](module, plan, dtype, prompts_RxP, lens_R, key, knobs, eos_E,
                                  lora=lora if plan.use_lora else None)
        return GenerationOutput(*out)

    return run


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


def _check_knob_values(config, threshold, temperature, top_k, top_p, max_thinking_tokens, end_think_token_id):
    if threshold is not None and not (0.0 <= float(threshold) <= 1.0):
        raise ValueError(f"threshold={threshold!r} must lie in [0, 1] (or be None for the fixed schedule)")
    if temperature is None or float(temperature) < 0:
        raise ValueError(f"temperature={temperature!r} must be >= 0 (0 = greedy)")
    if top_p is not None and not (0.0 < float(top_p) <= 1.0):
        raise ValueError(f"top_p={top_p!r} must lie in (0, 1]")
    if top_k is not None and (not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise ValueError(f"top_k={top_k!r} must be an integer >= 1 (or None)")
    if (max_thinking_tokens is None) != (end_think_token_id is None):
        raise ValueError(f"max_thinking_tokens={max_thinking_tokens!r} and end_think_token_id="
                         f"{end_think_token_id!r} must be given together")
    if max_thinking_tokens is not None and max_thinking_tokens < 0:
        raise ValueError(f"max_thinking_tokens={max_thinking_tokens!r} must be >= 0")
    if end_think_token_id is not None and not 0 <= end_think_token_id < config.vocab_size:
        raise ValueError(f"end_think_token_id={end_think_token_id!r} is outside the vocabulary "
                         f"[0, {config.vocab_size})")


def _resolve_mode(model, mode: str, batch: int, max_new_tokens: int, block_length: int, policy: str) -> str:
    """The mode that runs (``"auto"`` resolved), checked against the model, the policy and the block length."""
    c = model.config
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not a generation mode; expected one of {MODES}")
    if mode == "auto":
        mode = auto_mode(model, batch, max_new_tokens, block_length)
    if mode != "ar" and c.mask_token_id is None:
        raise ValueError(f"mode={mode!r} needs config.mask_token_id (this model has none); use mode='ar'")
    if policy != "confidence" and mode != "diffusion":
        raise ValueError(f"policy={policy!r} is a diffusion commit policy; mode={mode!r} has none (use "
                         f"mode='diffusion', or leave policy='confidence')")
    if mode == "quadratic_spec" and not 2 <= block_length <= MAX_QUADRATIC_BLOCK:
        raise ValueError(f"block_length={block_length} does not fit quadratic_spec's B(B+1) layout: it needs "
                         f"2 <= B <= {MAX_QUADRATIC_BLOCK} (one seed + at least one draft, at most "
                         f"{MAX_QUADRATIC_BLOCK * (MAX_QUADRATIC_BLOCK + 1)} tokens per forward)")
    if mode == "linear_spec" and block_length < 2:
        raise ValueError(f"block_length={block_length} leaves linear_spec no draft token; use block_length >= 2")
    return mode


def _fixed_steps(mode: str, fixed: bool, steps_per_block, block_length: int) -> int | None:
    """Denoise steps per block of diffusion's fixed schedule (``fixed``: threshold None), else None; the default
    is the reference's ``N-1`` (one masked token per step)."""
    if mode != "diffusion" or not fixed:
        return None
    steps = max(1, block_length - 1) if steps_per_block is None else int(steps_per_block)
    if block_length > 1 and not 1 <= steps <= block_length - 1:
        raise ValueError(f"steps_per_block={steps_per_block!r} must lie in [1, block_length-1={block_length - 1}]")
    return steps


def _plan(model, mode: str, *, longest: int, prompt_length: int, max_new_tokens: int, block_length: int,
          fixed_steps, sample: bool, use_top_k: bool, use_top_p: bool, spec_sampling: str, use_lora: bool,
          cache_length, stream, impl, layers) -> core.Plan:
    """The static plan of one program (after the checks)."""
    c = model.config
    if spec_sampling not in SPEC_SAMPLING:
        raise ValueError(f"spec_sampling={spec_sampling!r} is not known; expected one of {SPEC_SAMPLING}")
    if longest + max_new_tokens > c.max_position_embeddings:
        raise ValueError(f"prompt length {longest} + max_new_tokens={max_new_tokens} exceeds the model's "
                         f"max_position_embeddings={c.max_position_embeddings}")
    cache_len = cache_slots(mode, longest, prompt_length, int(max_new_tokens), int(block_length), cache_length)
    sampler = Sampler(greedy=not sample, use_top_k=sample and use_top_k, use_top_p=sample and use_top_p,
                      mask_id=c.mask_token_id)
    block = 1 if mode == "ar" else int(block_length)  # no role in AR: one program for every block_length
    return core.Plan(mode=mode, max_new=int(max_new_tokens), block=block, cache_len=cache_len, sampler=sampler,
                     mask_id=c.mask_token_id, pad_id=output_pad_id(c), fixed_steps=fixed_steps,
                     spec_sampling=spec_sampling, use_lora=bool(use_lora and model.lora is not None),
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


def check_policy(policy, threshold, steps_per_block, margin, entropy_bound) -> dict:
    """Checks the diffusion policy and its knobs; returns the traced knob values ``{margin, entropy_bound}``."""
    if not isinstance(policy, str) or policy not in POLICIES:
        raise ValueError(f"policy={policy!r} is not a diffusion commit policy; expected one of {POLICIES}")
    given = {"margin": margin, "entropy_bound": entropy_bound}
    for name, value in given.items():
        if value is not None and POLICY_KNOBS.get(policy) != name:
            owner = next(p for p, k in POLICY_KNOBS.items() if k == name)
            raise ValueError(f"{name}={value!r} is the knob of policy={owner!r}; policy={policy!r} has no use "
                             f"for it (leave {name}=None or pass policy={owner!r})")
    if policy != "confidence" and (threshold is None or steps_per_block is not None):
        what = "threshold=None" if threshold is None else f"steps_per_block={steps_per_block!r}"
        knob = POLICY_KNOBS.get(policy, "threshold")
        raise ValueError(f"{what} selects the fixed schedule, which ranks by confidence: only policy='confidence' "
                         f"has one (policy={policy!r} commits by its {knob}= instead)")
    values = dict(POLICY_KNOB_DEFAULTS)
    values.update({k: float(v) for k, v in given.items() if v is not None})
    if not 0.0 <= values["margin"] <= 1.0:
        raise ValueError(f"margin={margin!r} must lie in [0, 1] (top-1 minus top-2 probability)")
    if not values["entropy_bound"] >= 0.0:
        raise ValueError(f"entropy_bound={entropy_bound!r} must be >= 0 (nats; summed entropy of one pass's "
                         f"commits)")
    return values


# ---------------------------------------------------------------------------------------------------
# the two entry points


def make_generate_fn(model, *, mode: str, batch: int, prompt_length: int, max_new_tokens: int, block_length: int = 32,
                     steps_per_block: int | None = None, sample: bool = False, use_top_k: bool = False,
                     use_top_p: bool = False, spec_sampling: str = "exact", use_lora: bool = True,
                     cache_length: int | None = None, eos_slots: int = MIN_EOS_SLOTS, impl: str | None = None,
                     layers: str = "auto") -> Callable:
    """A pure generation function with the static choices fixed, for use inside your own JAX code.

    Args (static: each combination is one program):
      model: a :class:`jaxdlm.Model` (its graphdef, config and whether it has a draft LoRA are used; its
        parameters are NOT captured: pass them to the function).
      mode: ``"ar" | "diffusion" | "linear_spec" | "quadratic_spec"`` (or ``"auto"``, resolved here).
      batch, prompt_length: the prompts' shape ``[batch, prompt_length]`` (right-padded; real lengths are traced).
      max_new_tokens, block_length, cache_length, spec_sampling, use_lora, impl, layers: as in :func:`generate`.
      steps_per_block: diffusion with the fixed schedule of this many denoise steps per block (the traced
        ``threshold`` is then unused); None: the threshold rule / policy.
      sample: False = greedy (``temperature`` is unused); True = sampling at the traced ``temperature``.
      use_top_k, use_top_p: compile the (traced) top-k / top-p filters in (sampling only).
      eos_slots: how many EOS ids the traced EOS array holds.

    Returns ``fn(params, lora, prompts, prompt_lengths, key, *, threshold=0.9, temperature=1.0, top_k=None,
    top_p=None, eos_token_id=None, policy="confidence", margin=None, entropy_bound=None, max_thinking_tokens=None,
    end_think_token_id=None) -> GenerationOutput``:

      params: the model's parameter pytree (``model.params``, sharded or not); lora: the draft LoRA (or None).
      prompts: ``int32 [batch, prompt_length]``; prompt_lengths: ``int32 [batch]`` (1..prompt_length);
      key: a PRNG key.  Keyword knobs may be Python numbers or traced scalars (``eos_token_id``: an id or an
      ``int32 [E]`` array of ids, ``E <= eos_slots``, padded here with -1, which matches no token; ``policy``: a
      name, or a traced ``int32`` index into ``jaxdlm.generation.knobs.POLICIES``).  Under ``jax.jit``, pass
      the knobs the same way on every call (e.g. always ``jnp.float32``): a Python float and a float32 array
      are different argument types and compile two programs.  Nothing is checked on traced values: out-of-range knobs give
      unspecified (but finite, well-formed) output.

    ``fn`` is pure (no host callback, no numpy on traced values): it runs under ``jax.jit``, ``lax.scan``,
    ``jax.vmap`` (e.g. over keys) and ``jax.set_mesh``, and gives exactly :func:`generate`'s tokens, lengths and
    nfe for the same prompts, knobs and seed (``key = jax.random.PRNGKey(seed)``).
    """
    c = model.config
    _check_sizes(max_new_tokens, block_length)
    if batch < 1 or prompt_length < 1:
        raise ValueError(f"batch={batch} and prompt_length={prompt_length} must be >= 1")
    mode = _resolve_mode(model, mode, batch, max_new_tokens, block_length, "confidence")
    if steps_per_block is not None and mode != "diffusion":
        raise ValueError(f"steps_per_block={steps_per_block} is diffusion's fixed schedule; mode={mode!r} has none")
    plan = _plan(model, mode, longest=prompt_length, prompt_length=prompt_length, max_new_tokens=max_new_tokens,
                 block_length=block_length, fixed_steps=_fixed_steps(mode, steps_per_block is not None,
                                                                     steps_per_block, block_length),
                 sample=sample, use_top_k=use_top_k, use_top_p=use_top_p, spec_sampling=spec_sampling,
                 use_lora=use_lora, cache_length=cache_length, stream=None, impl=impl, layers=layers)
    run = program(model.graphdef, plan)
    default_eos = eos_ids(c, None)

    def fn(params, lora, prompts, prompt_lengths, key, *, threshold=0.9, temperature=1.0, top_k=None, top_p=None,
           eos_token_id=None, policy="confidence", margin=None, entropy_bound=None, max_thinking_tokens=None,
           end_think_token_id=None) -> GenerationOutput:
        if tuple(prompts.shape) != (batch, prompt_length):
            raise ValueError(f"prompts has shape {tuple(prompts.shape)}; this function was made for "
                             f"[batch={batch}, prompt_length={prompt_length}]")
        eos = jnp.asarray(default_eos if eos_token_id is None else eos_token_id, jnp.int32).reshape(-1)
        if eos.shape[0] > eos_slots:
            raise ValueError(f"{eos.shape[0]} EOS ids do not fit this function's eos_slots={eos_slots}")
        eos = jnp.concatenate([eos, jnp.full((eos_slots - eos.shape[0],), -1, jnp.int32)])  # -1: never a token
        knobs = Knobs.make(temperature=temperature if sample else 0.0, top_k=top_k, top_p=top_p, threshold=threshold,
                           policy=policy, margin=margin, entropy_bound=entropy_bound,
                           max_thinking_tokens=max_thinking_tokens, end_think_token_id=end_think_token_id)
        return run(params, lora, jnp.asarray(prompts, jnp.int32), jnp.asarray(prompt_lengths, jnp.int32), key,
                   knobs, eos)

    fn.plan = plan
    return fn


def _padded_prompts(model, rows: list[np.ndarray], p_len: int):
    """Right-padded ``int32 [R, p_len]`` prompts and ``[R]`` lengths on the device (rows over the mesh's batch axes
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


def generate(model, prompts, *, mode: str = "auto", max_new_tokens: int = 128, block_length: int = 32,
             threshold: float | None = 0.9, steps_per_block: int | None = None, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, eos_token_id: int | Sequence[int] | None = None,
             seed: int = 0, spec_sampling: str = "exact", use_lora: bool = True,
             max_thinking_tokens: int | None = None, end_think_token_id: int | None = None,
             stream_callback: Callable | None = None, cache_length: int | None = None,
             impl: str | None = None, layers: str = "auto", policy: str = "confidence",
             margin: float | None = None, entropy_bound: float | None = None) -> GenerationResult:
    """Generates up to ``max_new_tokens`` tokens after each prompt, in one jitted program.

    Args:
      model: a :class:`jaxdlm.Model` (its ``lora``, when present, is the linear-spec draft LoRA).
      prompts: a list of 1-D token sequences (ragged; right-padded internally and masked per row) or a
        2-D array ``[B, L]`` (every row ``L`` tokens long).
      mode: ``"ar"``, ``"diffusion"``, ``"linear_spec"``, ``"quadratic_spec"`` or ``"auto"`` (see
        :func:`auto_mode`).
      max_new_tokens: output cap per row (every mode; an EOS beyond it is not emitted).
      block_length: diffusion / draft block length ``B`` (quadratic: ``2 <= B <= 64``).
      threshold: diffusion confidence threshold in ``[0, 1]``; ``None`` = fixed schedule of
        ``steps_per_block`` denoise steps per block, default ``B-1``: one masked token per step, the
        reference's schedule (fewer steps commit ``(B-1) / steps`` tokens per step).
      temperature: 0 = greedy; > 0 = Gumbel-max sampling (with ``top_k`` / ``top_p`` filters).
      eos_token_id: an id or ids that end a row (default: ``model.config.eos_token_ids``; ``()`` = none).
      seed: PRNG seed for sampling (reproducible: same seed, same output).
      spec_sampling: T > 0 acceptance rule of the self-speculative modes: ``"exact"`` (exact match with
        the verifier's own sample, the reference) or ``"rejection"`` (speculative rejection sampling).
      use_lora: use ``model.lora`` in linear-spec draft passes (never elsewhere).
      max_thinking_tokens, end_think_token_id: thinking budget; once a row has emitted
        ``max_thinking_tokens`` tokens without ``end_think_token_id``, its next seed token (the next
        token the model is conditioned on) is replaced by ``end_think_token_id`` and that is emitted.
      stream_callback: optional host function ``f(tokens int32 [B, N], counts int32 [B])`` called from
        inside the program after every emission; ``tokens[i, :counts[i]]`` are row ``i``'s newly
        final tokens.  A new function object recompiles the program.
      cache_length: KV cache slots per row (default and minimum: :func:`cache_slots`).
      impl: attention backend (default ``JAXDLM_ATTENTION``).
      layers: the forwards' layer loop: ``"auto"`` (default: ``"unrolled"``, straight-line code, on a GPU /
        TPU; ``"scan"`` on a CPU, see :func:`jaxdlm.model.resolve_layers`), ``"unrolled"`` or ``"scan"``; every
        choice gives the same tokens.
      policy: diffusion commit policy (:mod:`jaxdlm.generation.diffusion`): ``"confidence"`` (default:
        the most confident masked position + every one with probability ``>= threshold``), ``"margin"``
        (top-1 minus top-2 probability ``>= margin``, + the largest margin), ``"entropy"`` (the
        lowest-entropy masked positions while their summed entropy is ``<= entropy_bound`` nats, at
        least one) or ``"leftmost"`` (the leftmost masked position + the contiguous run after it with
        probability ``>= threshold``).  A traced id: switching policy does not recompile.  ``threshold``
        is read by ``"confidence"`` and ``"leftmost"`` only, and only ``"confidence"`` has the fixed
        schedule.  Other modes accept only ``"confidence"`` (they have no commit policy).
      margin: the ``"margin"`` policy's cut in ``[0, 1]`` (default 0.8: a 0.9 / 0.1 split's margin, so it
        commits at least what ``threshold=0.9`` commits).  Traced.
      entropy_bound: the ``"entropy"`` policy's bound in nats, ``>= 0`` (default 0.3, about the entropy
        of one position at probability 0.9: 0.33 nats for a 0.9 / 0.1 split).  Traced.

    Returns a :class:`GenerationResult` (host numpy arrays).  ``nfe`` as in docs/decoding.md: AR counts
    one per emitted token (the prefill is the first token's forward); diffusion does not count the
    prefill and counts every denoise and commit pass; linear spec counts the prefill plus two per
    cycle; quadratic spec the prefill plus one per cycle.  The same program as :func:`make_generate_fn`'s.
    """
    c = model.config
    _check_sizes(max_new_tokens, block_length)
    _check_knob_values(c, threshold, temperature, top_k, top_p, max_thinking_tokens, end_think_token_id)
    knob_values = check_policy(policy, threshold, steps_per_block, margin, entropy_bound)
    rows = _prompt_rows(prompts, c.vocab_size)
    mode = _resolve_mode(model, mode, len(rows), max_new_tokens, block_length, policy)
    longest = max(len(r) for r in rows)
    sample = float(temperature) > 0
    plan = _plan(model, mode, longest=longest, prompt_length=bucket_length(longest), max_new_tokens=max_new_tokens,
                 block_length=block_length,
                 fixed_steps=_fixed_steps(mode, threshold is None, steps_per_block, block_length), sample=sample,
                 use_top_k=top_k is not None, use_top_p=top_p is not None and float(top_p) < 1,
                 spec_sampling=spec_sampling, use_lora=use_lora, cache_length=cache_length, stream=stream_callback,
                 impl=impl, layers=layers)
    prompts_RxP, lens_R = _padded_prompts(model, rows, bucket_length(longest))
    knobs = Knobs.make(temperature=temperature, top_k=top_k, top_p=top_p, threshold=threshold, policy=policy,
                       margin=knob_values["margin"], entropy_bound=knob_values["entropy_bound"],
                       max_thinking_tokens=max_thinking_tokens, end_think_token_id=end_think_token_id)
    with model.mesh_context():
        out = _jitted(model.graphdef, plan)(model.params, model.lora, prompts_RxP, lens_R, jax.random.PRNGKey(seed),
                                            knobs, jax.device_put(eos_array(eos_ids(c, eos_token_id))))
    out = jax.device_get(out)
    return GenerationResult(tokens=np.asarray(out.tokens), lengths=np.asarray(out.lengths), nfe=np.asarray(out.nfe),
                            total_nfe=int(out.total_nfe), mode=mode)


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
