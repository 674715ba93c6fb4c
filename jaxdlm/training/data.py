"""Training data: packing token streams into block-aligned sequences, and an SFT chat format.

Batches are ``{"tokens": int32 [..., L], "loss_mask": bool [..., L]}`` (see :mod:`jaxdlm.training.losses`
for what ``loss_mask`` means).  ``L`` is always a multiple of the block size so that diffusion blocks
align to position 0.

:class:`Dataset` yields batch ``s`` as a pure function of ``(seed, s)`` (a fresh seeded permutation per
epoch), so the data position of a run is just the number of optimizer steps taken.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import numpy as np


SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<mask>")  # ids 0..3 of the study's tokenizers (bytes or BPE)


def tokenizer_from_file(path: str):
    """A ``transformers`` fast tokenizer from a ``tokenizers`` JSON file with :data:`SPECIAL_TOKENS` (the study's
    data preparation writes such files)."""
    from transformers import PreTrainedTokenizerFast

    pad, bos, eos, mask = SPECIAL_TOKENS
    return PreTrainedTokenizerFast(tokenizer_file=str(path), bos_token=bos, eos_token=eos, pad_token=pad,
                                   mask_token=mask)


def check_seq_len(seq_len: int, block_size: int) -> None:
    """Raises ``ValueError`` unless ``seq_len`` is a positive multiple of ``block_size``."""
    if not isinstance(seq_len, (int, np.integer)) or seq_len < 1 or seq_len % block_size:
        raise ValueError(f"seq_len={seq_len!r} must be a positive multiple of block_size={block_size}")


def pack(docs: Iterable[Sequence[int]], seq_len: int, block_size: int, *, eos_id: int | None = None,
         bos_id: int | None = None, pad_id: int = 0, drop_remainder: bool = True) -> dict:
    """Concatenates documents (each followed by ``eos_id``, preceded by ``bos_id`` when given) and cuts the
    stream into rows of ``seq_len`` tokens.

    Returns ``{"tokens": int32 [N, seq_len], "loss_mask": bool [N, seq_len]}``; with
    ``drop_remainder=False`` the last partial row is padded with ``pad_id`` (``loss_mask`` False there).
    """
    check_seq_len(seq_len, block_size)
    parts = []
    for doc in docs:
        d = list(doc)
        if bos_id is not None:
            d = [bos_id] + d
        if eos_id is not None:
            d = d + [eos_id]
        parts.append(np.asarray(d, np.int64))
    stream = np.concatenate(parts) if parts else np.zeros((0,), np.int64)
    return pack_stream(stream, seq_len, block_size, pad_id=pad_id, drop_remainder=drop_remainder)


def pack_stream(stream, seq_len: int, block_size: int, *, pad_id: int = 0, drop_remainder: bool = True) -> dict:
    """Cuts a 1-D token stream into ``[N, seq_len]`` rows (see :func:`pack`)."""
    stream = np.asarray(stream).reshape(-1)
    tokens = stream_rows(stream, seq_len, block_size).astype(np.int32)
    n_full = len(tokens)
    mask = np.ones(tokens.shape, bool)
    rest = len(stream) - n_full * seq_len
    if rest and not drop_remainder:
        row = np.full((1, seq_len), pad_id, np.int32)
        row[0, :rest] = stream[n_full * seq_len:]
        mrow = np.zeros((1, seq_len), bool)
        mrow[0, :rest] = True
        tokens, mask = np.concatenate([tokens, row]), np.concatenate([mask, mrow])
    return {"tokens": tokens, "loss_mask": mask}


def stream_rows(stream, seq_len: int, block_size: int) -> np.ndarray:
    """The full ``[N, seq_len]`` rows of a 1-D token ``stream`` as a view (no copy: a memory-mapped stream stays
    on disk); the last partial row is dropped."""
    check_seq_len(seq_len, block_size)
    n_full = len(stream) // seq_len
    return stream[: n_full * seq_len].reshape(n_full, seq_len)


# ------------------------------------------------------------------------------------------- SFT


def _simple_chat(messages, add_generation_prompt: bool) -> str:
    """ChatML text used when the tokenizer has no chat template."""
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    if add_generation_prompt:
        text += "<|im_start|>assistant\n"
    return text


def _encode(tokenizer, text: str) -> list[int]:
    if hasattr(tokenizer, "encode") and not hasattr(tokenizer, "apply_chat_template"):
        enc = tokenizer.encode(text)  # a `tokenizers.Tokenizer`
        return list(getattr(enc, "ids", enc))
    return list(tokenizer.encode(text, add_special_tokens=False))


def _template_ids(tokenizer, messages, add_generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    if hasattr(out, "keys"):  # transformers >= 5 returns a BatchEncoding
        out = out["input_ids"]
    out = list(out)
    if out and not isinstance(out[0], (int, np.integer)):
        raise ValueError("apply_chat_template did not return a flat list of token ids")
    return [int(i) for i in out]


def chat_tokens(tokenizer, messages: Sequence[dict]) -> tuple[list[int], list[bool]]:
    """Token ids of a conversation whose LAST message is the assistant answer, and the answer mask.

    Uses ``tokenizer.apply_chat_template`` when the tokenizer has a chat template (the prompt is the
    template of ``messages[:-1]`` with ``add_generation_prompt=True``; the answer is the rest of the full
    template), else a plain ChatML text.  Accepts a transformers tokenizer or a ``tokenizers.Tokenizer``.
    """
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError("an SFT example must end with an assistant message, got roles "
                         f"{[m.get('role') for m in messages]}")
    if getattr(tokenizer, "chat_template", None):
        prompt = _template_ids(tokenizer, list(messages[:-1]), add_generation_prompt=True)
        full = _template_ids(tokenizer, list(messages), add_generation_prompt=False)
        if full[: len(prompt)] != prompt:
            raise ValueError("the chat template's rendering of the prompt is not a prefix of the full conversation; "
                             "cannot separate the answer tokens")
    else:
        prompt = _encode(tokenizer, _simple_chat(messages[:-1], True))
        full = prompt + _encode(tokenizer, f"{messages[-1]['content']}<|im_end|>\n")
    return full, [False] * len(prompt) + [True] * (len(full) - len(prompt))


def sft_batch(examples: Sequence[tuple[Sequence[int], Sequence[bool]]], seq_len: int, block_size: int, *,
              pad_id: int) -> dict:
    """Pads/truncates ``(tokens, answer_mask)`` examples to ``seq_len``: ``{"tokens", "loss_mask"}`` ``[N, L]``.

    ``loss_mask`` is the answer mask (False on prompt and padding): only answer tokens are masked and
    carry AR loss.
    """
    check_seq_len(seq_len, block_size)
    n = len(examples)
    tokens = np.full((n, seq_len), pad_id, np.int32)
    mask = np.zeros((n, seq_len), bool)
    for i, (t, m) in enumerate(examples):
        if len(t) != len(m):
            raise ValueError(f"example {i}: {len(t)} tokens but {len(m)} mask entries")
        k = min(len(t), seq_len)
        tokens[i, :k] = np.asarray(t[:k])
        mask[i, :k] = np.asarray(m[:k], bool)
    return {"tokens": tokens, "loss_mask": mask}


# ---------------------------------------------------------------------------------------- dataset


@dataclasses.dataclass
class Dataset:
    """Packed rows ``tokens [N, L]`` (any integer dtype; a ``np.memmap`` stays on disk) and ``loss_mask [N, L]``
    (``None``: every token carries loss) served in seeded, epoch-wise shuffled batches.

    Only the rows a batch asks for are read (``rows_read`` counts them), so a memory-mapped corpus larger than
    RAM trains and each process of a multi-process run touches only its own rows.  With ``vocab_size`` the rows
    served are checked to hold ids in ``[0, vocab_size)`` (``name`` says which data in the error).
    """

    tokens: np.ndarray
    loss_mask: np.ndarray | None = None
    seed: int = 0
    vocab_size: int | None = None
    name: str = "data"
    rows_read: int = dataclasses.field(default=0, init=False)

    def __post_init__(self):
        if self.tokens.ndim != 2 or (self.loss_mask is not None and self.tokens.shape != self.loss_mask.shape):
            mask_shape = None if self.loss_mask is None else self.loss_mask.shape
            raise ValueError(f"tokens {self.tokens.shape} and loss_mask {mask_shape} must be equal [N, L]")
        if len(self.tokens) == 0:
            raise ValueError("the dataset is empty (fewer tokens than one sequence?)")

    @classmethod
    def from_dict(cls, d: dict, seed: int = 0) -> "Dataset":
        return cls(np.asarray(d["tokens"], np.int32), np.asarray(d["loss_mask"], bool), seed)

    def __len__(self) -> int:
        return len(self.tokens)

    def indices(self, start: int, count: int) -> np.ndarray:
        """Row indices of global samples ``start .. start+count-1`` (epoch ``e`` uses permutation ``(seed, e)``)."""
        n = len(self)
        g = np.arange(start, start + count)
        out = np.empty(count, np.int64)
        for e in np.unique(g // n):
            perm = np.random.default_rng([self.seed, int(e)]).permutation(n)
            sel = g // n == e
            out[sel] = perm[g[sel] % n]
        return out

    def rows(self, idx_S: np.ndarray) -> dict:
        """The rows ``idx_S`` (index array of any shape ``S``) and nothing else: ``{"tokens": int32 [*S, L],
        "loss_mask": bool [*S, L]}``."""
        flat = np.asarray(idx_S).reshape(-1)
        tokens = np.asarray(self.tokens[flat], np.int32)
        self.rows_read += len(flat)
        if self.vocab_size is not None and tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            bad = int(tokens.min()) if tokens.min() < 0 else int(tokens.max())
            raise ValueError(f"{self.name}: token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        mask = np.ones(tokens.shape, bool) if self.loss_mask is None else np.asarray(self.loss_mask[flat], bool)
        shape = np.shape(idx_S) + (self.tokens.shape[1],)
        return {"tokens": tokens.reshape(shape), "loss_mask": mask.reshape(shape)}

    def batch(self, step: int, batch_size: int, accum: int = 1, part: slice = slice(None)) -> dict:
        """The batch of optimizer step ``step``: ``[accum, batch_size, L]`` arrays, or only the rows ``part`` of
        each micro-batch (``[accum, len(part), L]``: one process's share; the other rows are not read)."""
        idx_AxB = self.indices(step * batch_size * accum, batch_size * accum).reshape(accum, batch_size)
        return self.rows(idx_AxB[:, part])

    def eval_batches(self, batch_size: int, max_batches: int | None = None, part: slice = slice(None)):
        """Consecutive (unshuffled) ``[batch_size, L]`` batches, or their rows ``part``; the last partial batch
        is dropped."""
        nb = len(self) // batch_size
        if max_batches is not None:
            nb = min(nb, max_batches)
        for i in range(nb):
            yield self.rows(np.arange(i * batch_size, (i + 1) * batch_size)[part])
