"""``jaxdlm.generate``: argument checks, prompt bucketing, mode dispatch, and the one jitted program.

Each call runs ONE jitted program (prefill + a ``lax.while_loop``; no host round trip per step).  Its
static key is the model's graphdef and a :class:`~jaxdlm.generation.core.Plan` (mode, batch shape,
bucketed prompt length, ``max_new_tokens``, block length, cache size, greedy or not, ...); the
threshold, the diffusion policy and its knobs, temperature, top-k / top-p values, EOS ids and seed are
traced, so changing them does not recompile.  Prompt lengths are bucketed (:func:`bucket_length`), so
prompts in the same bucket share one compiled program.
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
from jaxdlm.generation.diffusion import POLICIES, diffusion_program
from jaxdlm.generation.sampling import Sampler
from jaxdlm.generation.speculative import linear_program, quadratic_program
from jaxdlm.model import resolve_layers

MODES = ("ar", "diffusion", "linear_spec", "quadratic_spec", "auto")
SPEC_SAMPLING = ("exact", "rejection")
PROGRAMS = {"ar": ar_program, "diffusion": diffusion_program, "linear_spec": linear_program,
            "quadratic_spec": quadratic_program}
MAX_QUADRATIC_BLOCK = 64  # B(B+1) = 4160 tokens per forward at most
# diffusion policy -> (its knob's generate() argument, default): "confidence" / "leftmost" read threshold
POLICY_KNOBS = {"margin": ("margin", 0.8), "entropy": ("entropy_bound", 0.3)}

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


def widest_write(mode: str, block: int) -> int:
    """Most tokens one forward writes after a row's cache length: 1 (AR), ``B`` (diffusion, linear spec),
    ``B + B*B`` (quadratic spec: the masks' K/V go to scratch slots too)."""
    return {"ar": 1, "quadratic_spec": block + block * block}.get(mode, block)


def cache_slots(mode: str, longest: int, p_len: int, max_new: int, block: int, requested: int | None) -> int:
    """KV cache slots per row: ``requested`` (checked) or the default.

    A row's cache grows to at most ``longest + max_new`` committed tokens and every forward writes up to
    :func:`widest_write` tokens after it (scratch for the passes that do not commit them), so that many
    slots are needed; the default also holds the whole bucketed prompt (``p_len``) and a block of margin,
    rounded up to a multiple of 64 (tile sizes of the attention kernels divide it).
    """
    widest = widest_write(mode, 1 if mode == "ar" else block)
    needed = max(p_len, longest + max_new + widest)
    if requested is None:
        return -(-(needed + (1 if mode == "ar" else block)) // 64) * 64
    if int(requested) < needed:
        raise ValueError(f"cache_length={requested} is too small: prompt length {longest} + max_new_tokens="
                         f"{max_new} + {widest} slots for the widest {mode} pass (block_length={block}; and at least the bucketed "
                         f"prompt length {p_len}) need {needed}")
    return int(requested)


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


def check_policy(policy, threshold, steps_per_block, margin, entropy_bound) -> dict:
    """Checks the diffusion policy and its knobs; returns the traced knob values ``{margin, entropy_bound}``."""
    if not isinstance(policy, str) or policy not in POLICIES:
        raise ValueError(f"policy={policy!r} is not a diffusion commit policy; expected one of {POLICIES}")
    given = {"margin": margin, "entropy_bound": entropy_bound}
    for name, value in given.items():
        if value is not None and POLICY_KNOBS.get(policy, (None,))[0] != name:
            owner = next(p for p, (k, _) in POLICY_KNOBS.items() if k == name)
            raise ValueError(f"{name}={value!r} is the knob of policy={owner!r}; policy={policy!r} has no use "
                             f"for it (leave {name}=None or pass policy={owner!r})")
    if policy != "confidence" and (threshold is None or steps_per_block is not None):
        what = "threshold=None" if threshold is None else f"steps_per_block={steps_per_block!r}"
        knob = POLICY_KNOBS.get(policy, ("threshold",))[0]
        raise ValueError(f"{what} selects the fixed schedule, which ranks by confidence: only policy='confidence' "
                         f"has one (policy={policy!r} commits by its {knob}= instead)")
    values = {name: default for name, default in POLICY_KNOBS.values()}
    values.update({k: float(v) for k, v in given.items() if v is not None})
    if not 0.0 <= values["margin"] <= 1.0:
        raise ValueError(f"margin={margin!r} must lie in [0, 1] (top-1 minus top-2 probability)")
    if not values["entropy_bound"] >= 0.0:
        raise ValueError(f"entropy_bound={entropy_bound!r} must be >= 0 (nats; summed entropy of one pass's "
                         f"commits)")
    return values


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
    layers = resolve_layers(layers)
    if spec_sampling not in SPEC_SAMPLING:
        raise ValueError(f"spec_sampling={spec_sampling!r} is not known; expected one of {SPEC_SAMPLING}")
    if (max_thinking_tokens is None) != (end_think_token_id is None):
        raise ValueError(f"max_thinking_tokens={max_thinking_tokens!r} and end_think_token_id="
                         f"{end_think_token_id!r} must be given together")
    if max_thinking_tokens is not None and max_thinking_tokens < 0:
        raise ValueError(f"max_thinking_tokens={max_thinking_tokens!r} must be >= 0")
    if end_think_token_id is not None and not 0 <= end_think_token_id < c.vocab_size:
        raise ValueError(f"end_think_token_id={end_think_token_id!r} is outside the vocabulary [0, {c.vocab_size})")
    knob_values = check_policy(policy, threshold, steps_per_block, margin, entropy_bound)
    rows = _prompt_rows(prompts, c.vocab_size)
    batch = len(rows)
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
    cache_len = cache_slots(mode, longest, p_len, int(max_new_tokens), int(block_length), cache_length)
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
    plan = core.Plan(mode=mode, max_new=int(max_new_tokens), block=int(block_length), cache_len=cache_len,
                     sampler=sampler, mask_id=c.mask_token_id, pad_id=int(pad_id), fixed_steps=steps,
                     spec_sampling=spec_sampling, use_lora=bool(use_lora and model.lora is not None),
                     stream=stream_callback, impl=impl, layers=layers)
    padded = np.zeros((batch, p_len), np.int32)
    for i, r in enumerate(rows):
        padded[i, :len(r)] = r
    lens = np.asarray([len(r) for r in rows], np.int32)
    knobs = dict(temperature=jnp.float32(temperature), top_k=jnp.int32(top_k or 0),
                 top_p=jnp.float32(1.0 if top_p is None else top_p),
                 threshold=jnp.float32(0.0 if threshold is None else threshold),
                 policy=jnp.int32(POLICIES.index(policy)), margin=jnp.float32(knob_values["margin"]),
                 entropy_bound=jnp.float32(knob_values["entropy_bound"]),
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
