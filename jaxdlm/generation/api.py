"""``jaxdlm.generate``: argument checks, prompt bucketing, mode dispatch, and the one jitted program.

Each call runs ONE jitted program (prefill + a ``lax.while_loop``; no host round trip per step).  Its
static key is the model's graphdef and a :class:`~jaxdlm.generation.core.Plan` (mode, batch shape,
bucketed prompt length, ``max_new_tokens``, block length, cache size, greedy or not, ...); the
threshold, temperature, top-k / top-p values, EOS ids and seed are traced, so changing them does not
recompile.  Prompt lengths are bucketed (:func:`bucket_length`), so prompts in the same bucket share
one compiled program.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdlm.generation import core
from jaxdlm.generation.ar import ar_program
from jaxdlm.generation.diffusion import diffusion_program
from jaxdlm.generation.sampling import Sampler
from jaxdlm.generation.speculative import linear_program, quadratic_program

MODES = ("ar", "diffusion", "linear_spec", "quadratic_spec", "auto")
SPEC_SAMPLING = ("exact", "rejection")
PROGRAMS = {"ar": ar_program, "diffusion": diffusion_program, "linear_spec": linear_program,
            "quadratic_spec": quadratic_program}
MAX_QUADRATIC_BLOCK = 64  # B(B+1) = 4160 tokens per forward at most

# auto mode: AR for short outputs or large batches, linear self-speculation otherwise
AUTO_AR_MIN_BATCH = 16


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


@dataclasses.dataclass
class GenerationResult:
    """Output of :func:`generate`.

    Attributes:
      tokens: ``int32 [B, max_new_tokens]``; row ``i``'s output is ``tokens[i, :lengths[i]]`` (up to
        and including its first EOS); later slots hold ``config.pad_token_id`` (0 when unset).
      lengths: ``int32 [B]``.
      nfe: ``int32 [B]`` forward passes that row ``i`` took part in (SPEC.md section 5 accounting; equal
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


@functools.partial(jax.jit, static_argnames=("graphdef", "plan"))
def _run(graphdef, plan: core.Plan, params, lora, prompts, lens, key, knobs, eos):
    from flax import nnx

    core.TRACE_COUNTS[plan.mode] += 1
    module = nnx.merge(graphdef, params)
    dtype = jax.tree.leaves(params)[0].dtype
    return PROGRAMS[plan.mode](module, plan, dtype, prompts, lens, key, knobs, eos, lora=lora)


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


def generate(model, prompts, *, mode: str = "auto", max_new_tokens: int = 128, block_length: int = 32,
             threshold: float | None = 0.9, steps_per_block: int | None = None, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, eos_token_id: int | Sequence[int] | None = None,
             seed: int = 0, spec_sampling: str = "exact", use_lora: bool = True,
             max_thinking_tokens: int | None = None, end_think_token_id: int | None = None,
             stream_callback: Callable | None = None, cache_length: int | None = None,
             impl: str | None = None) -> GenerationResult:
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
      cache_length: KV cache slots per row (default: bucketed prompt + ``max_new_tokens`` + 2 blocks).
      impl: attention backend (default ``JAXDLM_ATTENTION``).

    Returns a :class:`GenerationResult` (host numpy arrays).  ``nfe`` per SPEC.md section 5: AR counts
    one per emitted token (the prefill is the first token's forward); diffusion does not count the
    prefill and counts every denoise and commit pass; linear spec counts the prefill plus two per
    cycle; quadratic spec the prefill plus one per cycle.
    """
    c = model.config
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not a generation mode; expected one of {MODES}")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive integer")
    if not isinstance(block_length, (int, np.integer)) or block_length < 1:
        raise ValueError(f"block_length={block_length!r} must be an integer >= 1")
    if threshold is not None and not (0.0 <= float(threshold) <= 1.0):
        raise ValueError(f"threshold={threshold!r} must lie in [0, 1] (or be None for the fixed schedule)")
    if temperature is None or float(temperature) < 0:
        raise ValueError(f"temperature={temperature!r} must be >= 0 (0 = greedy)")
    if top_p is not None and not (0.0 < float(top_p) <= 1.0):
        raise ValueError(f"top_p={top_p!r} must lie in (0, 1]")
    if top_k is not None and (not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise ValueError(f"top_k={top_k!r} must be an integer >= 1 (or None)")
    if spec_sampling not in SPEC_SAMPLING:
        raise ValueError(f"spec_sampling={spec_sampling!r} is not known; expected one of {SPEC_SAMPLING}")
    if (max_thinking_tokens is None) != (end_think_token_id is None):
        raise ValueError(f"max_thinking_tokens={max_thinking_tokens!r} and end_think_token_id="
                         f"{end_think_token_id!r} must be given together")
    if max_thinking_tokens is not None and max_thinking_tokens < 0:
        raise ValueError(f"max_thinking_tokens={max_thinking_tokens!r} must be >= 0")
    if end_think_token_id is not None and not 0 <= end_think_token_id < c.vocab_size:
        raise ValueError(f"end_think_token_id={end_think_token_id!r} is outside the vocabulary [0, {c.vocab_size})")
    rows = _prompt_rows(prompts, c.vocab_size)
    batch = len(rows)
    if mode == "auto":
        mode = auto_mode(model, batch, max_new_tokens, block_length)
    if mode != "ar" and c.mask_token_id is None:
        raise ValueError(f"mode={mode!r} needs config.mask_token_id (this model has none); use mode='ar'")
    if mode == "quadratic_spec" and not 2 <= block_length <= MAX_QUADRATIC_BLOCK:
        raise ValueError(f"block_length={block_length} does not fit quadratic_spec's B(B+1) layout: it needs "
                         f"2 <= B <= {MAX_QUADRATIC_BLOCK} (one seed + at least one draft, at most "
                         f"{MAX_QUADRATIC_BLOCK * (MAX_QUADRATIC_BLOCK + 1)} tokens per forward)")
    if mode == "linear_spec" and block_length < 2:
        raise ValueError(f"block_length={block_length} leaves linear_spec no draft token; use block_length >= 2")
    if mode == "diffusion" and threshold is None:
        steps = max(1, block_length - 1) if steps_per_block is None else int(steps_per_block)
        if block_length > 1 and not 1 <= steps <= block_length - 1:
            raise ValueError(f"steps_per_block={steps_per_block!r} must lie in [1, block_length-1="
                             f"{block_length - 1}]")
    else:
        steps = None
    longest = max(len(r) for r in rows)
    if longest + max_new_tokens > c.max_position_embeddings:
        raise ValueError(f"prompt length {longest} + max_new_tokens={max_new_tokens} exceeds the model's "
                         f"max_position_embeddings={c.max_position_embeddings}")
    p_len = bucket_length(longest)
    needed = longest + max_new_tokens + block_length
    if cache_length is None:
        cache_len = -(-(p_len + max_new_tokens + 2 * block_length) // 64) * 64
    else:
        cache_len = int(cache_length)
        if block_length > cache_len:
            raise ValueError(f"block_length={block_length} is larger than the cache (cache_length={cache_len})")
        if needed > cache_len:
            raise ValueError(f"prompt length {longest} + max_new_tokens={max_new_tokens} + block_length="
                             f"{block_length} = {needed} exceeds cache_length={cache_len}")
    if eos_token_id is None:
        eos = tuple(c.eos_token_ids or ())
    elif isinstance(eos_token_id, (int, np.integer)):
        eos = (int(eos_token_id),)
    else:
        eos = tuple(int(e) for e in eos_token_id)
    # a fixed-size id list (padded with -1, never matches) so that other EOS ids do not recompile
    eos_arr = np.full((max(4, 1 << max(0, math.ceil(math.log2(max(len(eos), 1))))),), -1, np.int32)
    eos_arr[:len(eos)] = eos
    pad_id = c.pad_token_id if c.pad_token_id is not None else 0  # fills tokens[i, lengths[i]:]
    if pad_id == c.mask_token_id:
        pad_id = 0 if c.mask_token_id != 0 else 1

    sampler = Sampler(greedy=float(temperature) == 0.0, use_top_k=top_k is not None and float(temperature) > 0,
                      use_top_p=top_p is not None and float(top_p) < 1 and float(temperature) > 0,
                      mask_id=c.mask_token_id)
    if mode == "ar":  # the block length plays no role in AR: one program for every block_length
        block_length = 1
        if cache_length is None:
            cache_len = -(-(p_len + max_new_tokens + 2) // 64) * 64
    plan = core.Plan(mode=mode, max_new=int(max_new_tokens), block=int(block_length), cache_len=cache_len,
                     sampler=sampler, mask_id=c.mask_token_id, pad_id=int(pad_id), fixed_steps=steps,
                     spec_sampling=spec_sampling, use_lora=bool(use_lora and model.lora is not None),
                     stream=stream_callback,
                     impl=impl)
    padded = np.zeros((batch, p_len), np.int32)
    for i, r in enumerate(rows):
        padded[i, :len(r)] = r
    lens = np.asarray([len(r) for r in rows], np.int32)
    knobs = dict(temperature=jnp.float32(temperature), top_k=jnp.int32(top_k or 0),
                 top_p=jnp.float32(1.0 if top_p is None else top_p),
                 threshold=jnp.float32(0.0 if threshold is None else threshold),
                 max_thinking=jnp.int32(0 if max_thinking_tokens is None else max_thinking_tokens),
                 end_think=jnp.int32(-1 if end_think_token_id is None else end_think_token_id))
    lora = model.lora if plan.use_lora else None
    prompts_arr, lens_arr = jnp.asarray(padded), jnp.asarray(lens)
    if model.mesh is not None:  # sharded model: batch rows over the mesh's batch axes where they divide
        from jaxdlm import sharding as sh

        if batch % sh.batch_size_divisor(model.mesh) == 0:
            prompts_arr = jax.device_put(prompts_arr, sh.batch_sharding(model.mesh, 2))
            lens_arr = jax.device_put(lens_arr, sh.batch_sharding(model.mesh, 1))
    with model.mesh_context():
        out = _run(model.graphdef, plan, model.params, lora, prompts_arr, lens_arr,
                   jax.random.PRNGKey(seed), knobs, jnp.asarray(eos_arr))
    tokens, lengths, nfe, total = jax.device_get(out)
    return GenerationResult(tokens=np.asarray(tokens), lengths=np.asarray(lengths), nfe=np.asarray(nfe),
                            total_nfe=int(total), mode=mode)


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
