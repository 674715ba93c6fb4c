"""Training speed: model FLOPs per token, device peaks, and the tokens/s and MFU of ``log.jsonl`` (docs/training.md,
section "Speed in the log").

Model FLOPs count the useful work of one optimizer step's forward and backward passes, read from the config
(:func:`train_flops_per_token`): the matmuls of every layer and of the output head over every token of the
forward (``2L`` of them for the joint objective's ``[x_t | x_0]`` layout, ``L`` for the AR objective) and
attention (``QK^T`` and ``PV``) over the query-key pairs the mask allows, times 3 for forward plus backward.
An adapter step (:func:`adapter_flops_per_token`) takes no gradient of the frozen base's weights: its matmuls
count twice (forward, input gradient), the adapter's and attention three times.
Recomputation (``remat``, the chunked cross-entropy) and the masked-out part of attention scores are not model
FLOPs, so MFU does not rise by doing them.
"""

from __future__ import annotations

import time

#: Dense bf16 peak TFLOP/s per device, by a substring of ``jax.Device.device_kind`` (first match wins).  An H100
#: SXM reports "NVIDIA H100 80GB HBM3"; the PCIe and NVL boards have other names and other peaks, so they are not
#: matched.
PEAK_BF16_TFLOPS = (
    ("H100 80GB HBM3", 989.0),
    ("H100 SXM", 989.0),
    ("H200", 989.0),
)


def peak_tflops(device_kind: str, override: float | None = None) -> float | None:
    """Dense bf16 peak TFLOP/s of one device of ``device_kind`` (:data:`PEAK_BF16_TFLOPS`), ``override`` when
    given (``jaxdlm train --peak-tflops``), else ``None`` (a CPU, an unknown GPU)."""
    if override is not None:
        if not override > 0:
            raise ValueError(f"--peak-tflops {override} must be > 0 (dense bf16 TFLOP/s of one device)")
        return float(override)
    return next((peak for name, peak in PEAK_BF16_TFLOPS if name in device_kind), None)


def attended_pairs(kind: str, length: int, block_size: int) -> int:
    """Query-key pairs one sequence's attention computes under the mask of ``kind`` (sliding windows not counted).

    ``kind``: ``"two_stream"`` (``L`` noisy queries in blocks of ``n``: each sees its own block and the clean
    tokens of earlier blocks; ``L`` clean queries: causal over the clean tokens), ``"two_stream_bidirectional"``
    (each noisy query sees all ``L`` noisy tokens) or ``"causal"`` (the AR objective).
    """
    L, n = length, block_size
    causal = L * (L + 1) // 2
    if kind == "causal":
        return causal
    if kind == "two_stream":
        if L % n:
            raise ValueError(f"length={L} is not a multiple of block_size={n}")
        m = L // n
        return n * n * (m + m * (m - 1) // 2) + causal
    if kind == "two_stream_bidirectional":
        return L * L + causal
    raise ValueError(f"kind={kind!r}: expected 'two_stream', 'two_stream_bidirectional' or 'causal'")


def _projections(mcfg) -> dict[str, tuple[int, int]]:
    """``{target: (in, out)}`` of each decoder layer's seven projections (the adapter's targets)."""
    h, i = mcfg.hidden_size, mcfg.intermediate_size
    f, g = mcfg.num_heads * mcfg.head_dim, mcfg.num_kv_heads * mcfg.head_dim
    return {"q_proj": (h, f), "k_proj": (h, g), "v_proj": (h, g), "o_proj": (f, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def _forward_flops(mcfg, loss_cfg, seq_len: int) -> tuple[float, float, int]:
    """``(matmul, attention, streams)``: forward model FLOPs per sequence token of the weight matmuls (every
    layer's projections and the head, over the ``streams`` tokens per sequence token) and of attention
    (``QK^T``, ``PV`` over the pairs the mask allows)."""
    c = mcfg
    layer_matmul = sum(k * n for k, n in _projections(c).values())  # weights per layer: q, k, v, o; gate, up, down
    if loss_cfg.objective == "ar":
        streams, kind = 1, "causal"
    else:
        streams, kind = 2, "two_stream_bidirectional" if loss_cfg.bidirectional else "two_stream"
    matmul = streams * 2 * (c.num_layers * layer_matmul + c.hidden_size * c.vocab_size)
    attn = 2 * 2 * c.num_heads * c.head_dim * c.num_layers * attended_pairs(kind, seq_len, c.block_size) / seq_len
    return matmul, attn, streams


def _windowed(mcfg, seq_len: int) -> bool:
    """Whether a sliding window cuts this sequence's attention (the pair counts above do not model it; both
    streams share positions ``0..L-1``, so a window of ``L`` or more cuts nothing)."""
    return mcfg.sliding_window is not None and mcfg.sliding_window < seq_len


def train_flops_per_token(mcfg, loss_cfg, seq_len: int) -> float | None:
    """Model FLOPs of one training forward + backward per token of a ``seq_len``-token sequence (formula:
    docs/training.md).  ``mcfg``: a :class:`~jaxdlm.config.ModelConfig`; ``loss_cfg``: a
    :class:`~jaxdlm.training.losses.LossConfig` (its objective decides the layout).  ``None`` where a sliding
    window shorter than the sequence cuts attention (not counted: ``mfu`` is then null)."""
    if _windowed(mcfg, seq_len):
        return None
    matmul, attn, _ = _forward_flops(mcfg, loss_cfg, seq_len)
    return 3.0 * (matmul + attn)


def adapter_flops_per_token(mcfg, loss_cfg, seq_len: int, adapter) -> float | None:
    """Model FLOPs of one adapter step (:mod:`jaxdlm.training.adapter`) per sequence token (formula:
    docs/training.md): the frozen base's matmuls forward and input-gradient backward (2x; no weight gradient),
    the adapter's ``x @ A`` and ``(x A) @ B`` 3x (forward, input and factor gradients), attention 3x as in
    :func:`train_flops_per_token` (``None`` under a sliding window, as there).  ``adapter``: an
    :class:`~jaxdlm.adapter.AdapterConfig`."""
    if _windowed(mcfg, seq_len):
        return None
    matmul, attn, streams = _forward_flops(mcfg, loss_cfg, seq_len)
    dims = _projections(mcfg)
    per_layer = sum(adapter.rank * (dims[t][0] + dims[t][1]) for t in adapter.targets)  # A [in, r], B [r, out]
    lora = streams * 2 * mcfg.num_layers * per_layer
    return 2.0 * matmul + 3.0 * (lora + attn)


class Meter:
    """Tokens/s and MFU over the steps between two reads (:meth:`read`); :meth:`restart` drops the time since the
    last read (evaluations, checkpoints, compilation).  ``tokens_per_step``: sequence tokens per optimizer step
    (all processes); ``flops_per_token``: :func:`train_flops_per_token` or ``None``; ``peak_flops``: FLOP/s of all
    devices together or ``None`` (then ``mfu`` is ``None``)."""

    def __init__(self, tokens_per_step: int, flops_per_token: float | None, peak_flops: float | None, step: int):
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.restart(step)

    def restart(self, step: int) -> None:
        """Starts a new interval at ``step`` (the steps up to it are done) now."""
        self._t0, self._step0 = time.perf_counter(), step

    def read(self, step: int) -> dict:
        """``{"tokens_per_s", "mfu"}`` of the steps after the last mark up to ``step`` (all done by now: call it
        after waiting for them); starts the next interval.  ``None`` values where a figure is unknown."""
        now = time.perf_counter()
        steps, seconds = step - self._step0, now - self._t0
        self._t0, self._step0 = now, step
        tps = steps * self.tokens_per_step / seconds if steps > 0 and seconds > 0 else None
        known = tps is not None and self.flops_per_token is not None and self.peak_flops is not None
        return {"tokens_per_s": tps, "mfu": tps * self.flops_per_token / self.peak_flops if known else None}
