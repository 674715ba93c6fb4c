"""Weight-only quantization: int8, int4 and fp8 weights of every linear layer, dequantized inside the matmul.

At batch 1 a forward reads every weight once, so bytes per weight set the speed limit (docs/reference_numbers.md,
the batch-1 bandwidth limit).  A quantized model stores each linear weight (``q_proj`` ... ``down_proj``, and
the output head on request) in 8 or 4 bits with a float scale beside it; activations, norms, the embedding
gather, the KV cache and the draft LoRA stay in the compute dtype (bfloat16).

==========  ===========================  ==============================================  ====================
scheme      storage                      scale ``[..., G, out]``                         bytes per weight
==========  ===========================  ==============================================  ====================
``int8``    ``int8``, symmetric, +-127   per output channel (``G = 1``)                  1
``int4``    ``int4``, symmetric, +-7     per group of ``gs`` inputs (``G = in/gs``)      0.5 (+ 1/64 scales)
``fp8``     ``float8_e4m3fn``, +-448     per output channel (``G = 1``)                  1
==========  ===========================  ==============================================  ====================

``gs`` is :attr:`Quantization.group_size`, :data:`GROUP_SIZE` = 128 unless given (tiny test models use 16 or 32).

**Representation.**  A quantized weight keeps its path and ``[in, out]`` layout (``layers/q_proj`` ``[L, H, F]``,
int8) and gains a sibling leaf ``layers/q_proj_scale`` ``[L, G, F]`` in the compute dtype:
``w ~= q.reshape(G, in/G, out) * scale[:, None, :]``.  Both are ordinary parameters created with their logical
axes (the scale's output axis is the weight's; its group axis is the weight's input axis for int4 and
unsharded for ``G = 1``), so :mod:`jaxdlm.sharding` and :mod:`jaxdlm.checkpoint` treat them like any other.
:class:`Quantization` (scheme, whether the head is quantized, int4 group size) is static: it lives in the module graph
(``Transformer.quant``, ``Model.quant``) and in the checkpoint's ``jaxdlm.json``.

**The matmul** (:func:`matmul`, the one function every linear of the forward calls):

* per output channel (int8, fp8): ``(x @ q.astype(x.dtype)) * scale``, accumulated in float32.  The weight
  operand is a bare convert of the stored weight - the pattern XLA's GPU GEMM fusion takes into the
  GEMM's operand read - and the scale multiplies the ``[..., out]`` result (an epilogue).
* groups (int4), two forms (:func:`int4_form`, the ``JAXDLM_INT4_MATMUL`` environment variable):

  - ``"dequantize"`` (default): ``x @ dequantize(q, scale)``: the weight reshaped to ``[G, in/G, out]``, converted
    and multiplied by ``scale[:, None, :]`` on the operand side - the convert-and-scale pattern XLA's GPU GEMM
    fusion takes into the GEMM's operand read (as the per-channel form's bare convert);
  - ``"grouped"``: ``x`` reshaped to ``[..., G, in/G]`` and multiplied group by group with the converted weight
    (a batched matmul over ``G`` with a bare convert on the operand); the scale multiplies the float32 partial
    sums ``[..., G, out]``, which are then summed.  It writes and reads ``T * G * out * 4`` extra bytes: 12.5% of
    the int4 weight bytes at one token with groups of 128, four times them at a 32-token block.

  Which form a GPU runs faster is for ``experiments/bench_generate.py --quantize int4`` to say
  (``experiments/gpu_session.sh quant`` times both); not measured yet.

No float copy of a weight is kept: the stored arrays are the quantized ones.  Whether XLA also avoids a
transient float copy per step (fusing the convert into the GEMM) is a property of the backend; on a CPU it
does not (it converts, then multiplies); on a GPU it is what ``experiments/bench_generate.py --quantize``
measures (t1 against bf16 and against the HBM floor of the quantized bytes).

**Quantizing** (:func:`quantize`) runs on the host in numpy, in blocks of output columns (a few
:data:`CHUNK_BYTES` of float32 scratch each, :data:`WORKERS` threads).  The converter,
``jaxdlm.load(path, quantize=...)`` and :func:`quantize_model` call it on the weight in the compute dtype, so
all three give the same bits.  Scales
are rounded *up* to the compute dtype and the weight is then divided by the stored scale, so the rounding of
the scale never clips a weight and the error bound of each scheme holds for the stored pair:

* int8 / int4: ``|w - q * s| <= s / 2``, ``s >= amax / qmax`` (``amax``: the channel's or group's max ``|w|``);
* fp8 (e4m3, 3 mantissa bits): ``|w / s - q| <= max(|w / s| * 2**-4, 2**-10)`` (relative for normal numbers,
  absolute below e4m3's smallest normal 2**-6).
"""

from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

SCHEMES = ("int8", "int4", "fp8")
GROUP_SIZE = 128  # int4: inputs per scale
SCALE_SUFFIX = "_scale"
# the linear weights of a layer (all quantized); the output head is optional
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# compute dtypes a quantized model may have at the command line and in jaxdlm.load / convert_weights
COMPUTE_DTYPES = ("bfloat16",)

_STORAGE = {"int8": np.dtype(np.int8), "int4": np.dtype(ml_dtypes.int4), "fp8": np.dtype(ml_dtypes.float8_e4m3fn)}
_QMAX = {"int8": 127.0, "int4": 7.0, "fp8": 448.0}
INT4_FORMS = ("dequantize", "grouped")  # how matmul applies int4 group scales (int4_form)
CHUNK_BYTES = 16 * 1024 * 1024  # float32 scratch per quantization step (a block of output columns)
WORKERS = min(8, os.cpu_count() or 1)  # threads quantizing blocks at once (numpy releases the GIL)


@dataclasses.dataclass(frozen=True)
class Quantization:
    """A weight-only quantization scheme (static, hashable).

    Attributes:
      scheme: ``"int8"``, ``"int4"`` or ``"fp8"`` (module docstring).
      head: also quantize the output head ``[H, V]`` (needs an untied head).
      group_size: int4 only: inputs per scale (default :data:`GROUP_SIZE`; an even number, e.g. 16 or 32 for
        tiny test models); ``None`` for the per-channel schemes.
    """

    scheme: str
    head: bool = False
    group_size: int | None = None

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(f"quantize={self.scheme!r} is not a quantization scheme; expected one of "
                             f"{', '.join(SCHEMES)}")
        if not isinstance(self.head, bool):
            raise ValueError(f"Quantization head={self.head!r} must be True or False")
        if self.scheme != "int4":
            if self.group_size is not None:
                raise ValueError(f"group_size={self.group_size!r} applies to int4 only; {self.scheme} has one scale "
                                 "per output channel: leave group_size unset")
            return
        size = GROUP_SIZE if self.group_size is None else self.group_size
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 2 or size % 2:
            raise ValueError(f"int4 group_size={size!r} must be an even number of inputs >= 2 (default {GROUP_SIZE})")
        object.__setattr__(self, "group_size", int(size))

    @property
    def storage_dtype(self) -> np.dtype:
        """The dtype of the quantized weights (``int8``, ``int4`` or ``float8_e4m3fn``)."""
        return _STORAGE[self.scheme]

    @property
    def qmax(self) -> float:
        """The largest stored magnitude: 127, 7 or 448."""
        return _QMAX[self.scheme]

    def describe(self) -> str:
        """E.g. ``"int8"``, ``"int4 (groups of 128) with the head"``."""
        groups = f" (groups of {self.group_size})" if self.group_size is not None else ""
        return self.scheme + groups + (" with the head" if self.head else "")

    def to_dict(self) -> dict:
        """The ``quantization`` entry of ``jaxdlm.json``."""
        return {"scheme": self.scheme, "head": self.head, "group_size": self.group_size}

    @classmethod
    def from_dict(cls, d: dict | None) -> "Quantization | None":
        """The inverse of :meth:`to_dict` (``None`` -> ``None``)."""
        return None if d is None else cls(d["scheme"], bool(d.get("head", False)), d.get("group_size"))

    def weight_paths(self) -> tuple[tuple[str, ...], ...]:
        """Paths of the quantized weights (in the pure-dict parameter tree)."""
        paths = tuple(("layers", name) for name in LINEARS)
        return paths + ((("head",),) if self.head else ())

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """``[..., in, out]`` weight -> ``[..., G, out]`` scale."""
        *lead, k, n = shape
        return (*lead, 1 if self.group_size is None else k // self.group_size, n)

    def scale_axes(self, axes: tuple[str | None, ...]) -> tuple[str | None, ...]:
        """Logical axes of a scale from its weight's ``(..., in, out)``: the output axis is the weight's; the
        group axis follows the input axis (int4) or is unsharded (one group)."""
        *lead, k, n = axes
        return (*lead, k if self.group_size is not None else None, n)

    def check(self, config) -> None:
        """``ValueError`` when a model of ``config`` cannot be quantized with this scheme."""
        if self.head and config.tie_word_embeddings:
            raise ValueError("the output head is tied to the embedding (tie_word_embeddings), which stays in the "
                             "compute dtype for the gather: quantize without the head")
        if self.group_size is None:
            return
        c = config
        inputs = {"hidden_size": c.hidden_size, "num_heads * head_dim (o_proj)": c.num_heads * c.head_dim,
                  "intermediate_size (down_proj)": c.intermediate_size}
        for name, size in inputs.items():
            if size % self.group_size:
                raise ValueError(f"int4 quantizes groups of {self.group_size} along each weight's input dimension, "
                                 f"and {name} = {size} is not a multiple of {self.group_size}: use int8 or fp8")


def as_quantization(quantize: Any, head: bool | None = None) -> Quantization | None:
    """``None``, a scheme name (``"int8"``, ``"int4"``, ``"fp8"``) or a :class:`Quantization` -> a
    :class:`Quantization` or ``None``; ``head`` (when given) sets whether the head is quantized."""
    if quantize is None:
        if head:
            raise ValueError("quantizing the head needs a scheme: pass quantize='int8', 'int4' or 'fp8'")
        return None
    if isinstance(quantize, Quantization):
        return quantize if head is None else dataclasses.replace(quantize, head=head)
    if not isinstance(quantize, str):
        raise ValueError(f"quantize={quantize!r} must be one of {', '.join(SCHEMES)} or a Quantization")
    return Quantization(quantize, bool(head))


def check_compute_dtype(dtype, quant: Quantization) -> None:
    """``ValueError`` unless ``dtype`` is a compute dtype for quantized weights (bfloat16)."""
    name = np.dtype(dtype).name
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"{quant.scheme} weights are dequantized into {' or '.join(COMPUTE_DTYPES)} activations "
                         f"(weight-only quantization); dtype {name} asks for full precision: drop the dtype or the "
                         "quantization")


def scale_path(path: tuple[str, ...]) -> tuple[str, ...]:
    """The path of a quantized weight's scale: ``("layers", "q_proj")`` -> ``("layers", "q_proj_scale")``."""
    return path[:-1] + (path[-1] + SCALE_SUFFIX,)


# ------------------------------------------------------------------------------------------- host side


def quantize(w, quant: Quantization, scale_dtype=None) -> tuple[np.ndarray, np.ndarray]:
    """Quantizes ``w [..., in, out]`` (numpy, any float dtype) -> ``(q [..., in, out], scale [..., G, out])``.

    ``q`` has ``quant.storage_dtype``; ``scale`` has ``scale_dtype`` (default: ``w``'s dtype).  Runs on the host
    in blocks of output columns, :data:`WORKERS` at a time (float32 scratch of about 3 x :data:`CHUNK_BYTES` per
    block); the blocks are independent, so the result does not depend on the threads.  Error bounds in the module
    docstring.
    """
    w = np.asarray(w)
    scale_dtype = np.dtype(w.dtype if scale_dtype is None else scale_dtype)
    *lead, k, n = w.shape
    g = 1 if quant.group_size is None else k // quant.group_size
    if quant.group_size is not None and k % quant.group_size:
        raise ValueError(f"int4 quantizes groups of {quant.group_size} inputs, and a weight of shape {w.shape} has "
                         f"{k} inputs, not a multiple of {quant.group_size}: use int8 or fp8")
    q = np.empty(w.shape, quant.storage_dtype)
    scale = np.empty((*lead, g, n), scale_dtype)
    cols = max(1, CHUNK_BYTES // (4 * max(k, 1)))

    def block(job):
        idx, j = job
        q[idx][:, j:j + cols], scale[idx][:, j:j + cols] = _quantize_block(w[idx][:, j:j + cols], g, quant,
                                                                            scale_dtype)

    jobs = [(idx, j) for idx in np.ndindex(*lead) for j in range(0, n, cols)]
    if len(jobs) == 1 or WORKERS == 1:
        for job in jobs:
            block(job)
    else:
        with ThreadPoolExecutor(min(WORKERS, len(jobs))) as pool:
            list(pool.map(block, jobs))
    return q, scale


def _quantize_block(w: np.ndarray, g: int, quant: Quantization, scale_dtype: np.dtype):
    """One ``[in, c]`` block: float32 math, scale rounded up to ``scale_dtype``, then divided by that scale."""
    k, c = w.shape
    wg = w.astype(np.float32).reshape(g, k // g, c)
    amax = np.abs(wg).max(axis=1)                                       # [g, c]
    s = _at_least(np.where(amax > 0, amax / np.float32(quant.qmax), np.float32(1)), scale_dtype)
    x = wg / s.astype(np.float32)[:, None, :]
    if quant.scheme == "fp8":
        q = np.clip(x, -quant.qmax, quant.qmax).astype(quant.storage_dtype)
    else:
        q = np.clip(np.rint(x), -quant.qmax, quant.qmax).astype(np.int8).astype(quant.storage_dtype)
    return q.reshape(k, c), s


def _at_least(s: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Positive float32 ``s`` in ``dtype``, rounded up: the next representable value where a plain cast rounds
    down (one step of the bit pattern, which orders positive IEEE floats)."""
    out = s.astype(dtype)
    low = out.astype(np.float32) < s
    if low.any():
        bits = out.view(np.dtype(f"u{dtype.itemsize}"))
        bits[low] += 1
    return out


# ------------------------------------------------------------------------------------------- forward side


def dequantize(q, scale, dtype=None) -> jax.Array:
    """``q [..., in, out]``, ``scale [..., G, out]`` -> the weight ``[..., in, out]`` in ``dtype`` (default: the
    scale's): ``q.reshape(..., G, in/G, out) * scale[..., :, None, :]``, computed in ``dtype``."""
    dtype = jnp.dtype(scale.dtype if dtype is None else dtype)
    *lead, k, n = q.shape
    g = scale.shape[-2]
    w = jnp.asarray(q).astype(dtype).reshape(*lead, g, k // g, n) * jnp.asarray(scale).astype(dtype)[..., :, None, :]
    return w.reshape(*lead, k, n)


def int4_form() -> str:
    """How :func:`matmul` applies int4 group scales (read when a program is traced): the ``JAXDLM_INT4_MATMUL``
    environment variable when set, else ``"dequantize"`` (module docstring, *the matmul*)."""
    form = os.environ.get("JAXDLM_INT4_MATMUL", "").strip().lower() or INT4_FORMS[0]
    if form not in INT4_FORMS:
        raise ValueError(f"JAXDLM_INT4_MATMUL={form!r} is not an int4 matmul form; expected one of {INT4_FORMS}")
    return form


def matmul(x, w, scale=None, *, out_dtype=None) -> jax.Array:
    """``x [..., in] @ w [in, out]`` -> ``[..., out]`` in ``out_dtype`` (default ``x.dtype``): the one matmul of
    every linear layer.

    ``scale is None``: a float weight, cast to ``x.dtype`` (a no-op when they agree).  ``scale [1, out]``: the
    per-channel form ``(x @ q.astype(x.dtype)) * scale`` with float32 accumulation.  ``scale [G, out]``, ``G > 1``
    (int4): :func:`int4_form` ``"dequantize"``: ``x @ dequantize(q, scale, x.dtype)``; ``"grouped"``: per-group
    float32 partial products ``[..., G, out]`` scaled and summed.  Why each form: module docstring.
    """
    if scale is None:
        return jnp.matmul(x, w.astype(x.dtype), preferred_element_type=out_dtype)
    if scale.shape[-2] == 1:
        y = jnp.matmul(x, w.astype(x.dtype), preferred_element_type=jnp.float32)
        return (y * scale[0].astype(jnp.float32)).astype(out_dtype or x.dtype)
    if int4_form() == "dequantize":
        return jnp.matmul(x, dequantize(w, scale, x.dtype), preferred_element_type=out_dtype)
    (k, n), g = w.shape, scale.shape[-2]
    # XLA's CPU backend has no bf16 x bf16 -> f32 batched dot: float32 operands there, the same products and sums
    dtype = jnp.float32 if jax.default_backend() == "cpu" else x.dtype
    x_GxK = x.reshape(*x.shape[:-1], g, k // g).astype(dtype)
    w_GxKxN = w.reshape(g, k // g, n).astype(dtype)
    y = jnp.einsum("...gk,gkn->...gn", x_GxK, w_GxKxN, preferred_element_type=jnp.float32)
    return (y * scale.astype(jnp.float32)).sum(-2).astype(out_dtype or x.dtype)


# ------------------------------------------------------------------------------------------- models


def weight_bytes(params) -> int:
    """Bytes of a parameter tree as a GPU / TPU holds it: int4 packed two to a byte, every other dtype at its
    item size.  (``jax.Array.nbytes`` counts an int4 element as one byte.)"""
    return sum(x.size // 2 if x.dtype == _STORAGE["int4"] else x.size * x.dtype.itemsize
               for x in jax.tree.leaves(params))


def quantized_leaves(path: tuple[str, ...], w, quant: Quantization, scale_dtype) -> Iterator[tuple[tuple, np.ndarray]]:
    """``(path, q)`` and ``(scale path, scale)`` of one float weight (host numpy)."""
    q, s = quantize(np.asarray(jax.device_get(w)), quant, scale_dtype)
    yield path, q
    yield scale_path(path), s
