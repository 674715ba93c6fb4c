"""A minimal, strict reader for safetensors files that never maps whole files into memory.

``safetensors.safe_open`` memory-maps the file; every page it touches then counts as resident memory
of the process until the file is closed (a 4 GB shard read tensor by tensor shows a 4 GB peak RSS).
This reader parses the header itself (validating it like the reference implementation, so truncated
or corrupted files are reported before anything is written) and reads one tensor at a time with
``readinto`` into a caller-owned buffer.  Format: 8-byte little-endian header length ``N``, ``N``
bytes of JSON ``{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}``, then the
data (little-endian, C order), offsets relative to byte ``8 + N``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct

import ml_dtypes
import numpy as np

MAX_HEADER_BYTES = 100 * 1024 * 1024

# safetensors dtype name -> item size in bytes (all dtypes the format defines)
ITEM_SIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "F4": 1, "F6_E2M3": 1,
    "F6_E3M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8,
    "U64": 8, "F64": 8, "C64": 8,
}
# dtypes a weight may have (everything else is refused)
FLOAT_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype(ml_dtypes.bfloat16)}


class SafetensorsError(ValueError):
    """A safetensors file that cannot be read (truncated, corrupted, not safetensors)."""


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies: file, dtype name, shape, absolute byte range."""

    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: str) -> dict[str, TensorEntry]:
    """Parses and validates the header of a safetensors file; ``SafetensorsError`` names the defect."""
    fix = "re-download or re-export the file"
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SafetensorsError(f"{path} is truncated or corrupted: {size} bytes, too short for a "
                                       f"safetensors header; {fix}")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise SafetensorsError(f"{path} is truncated or corrupted: header length {n} does not fit the "
                                       f"file size {size}; {fix}")
            raw = f.read(n)
    except OSError as e:
        raise SafetensorsError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise SafetensorsError(f"{path} is corrupted: its header is not valid JSON; {fix}") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path} is corrupted: its header is not a JSON object; {fix}")
    base = 8 + n
    entries: dict[str, TensorEntry] = {}
    ranges = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            ok = (dtype in ITEM_SIZE and all(isinstance(s, int) and s >= 0 for s in shape)
                  and isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end)
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise SafetensorsError(f"{path} is corrupted: bad header entry for tensor {name!r}; {fix}")
        if end - begin != math.prod(shape) * ITEM_SIZE[dtype]:
            raise SafetensorsError(f"{path} is corrupted: tensor {name} has shape {list(shape)} ({dtype}) but "
                                   f"{end - begin} bytes; {fix}")
        entries[name] = TensorEntry(path, dtype, shape, base + begin, base + end)
        ranges.append((begin, end))
    ranges.sort()
    pos = 0
    for begin, end in ranges:
        if begin != pos:
            raise SafetensorsError(f"{path} is corrupted: tensor data overlaps or leaves holes; {fix}")
        pos = end
    if base + pos > size:
        raise SafetensorsError(f"{path} is truncated: its header needs {base + pos} bytes, the file has {size}; {fix}")
    if base + pos < size:
        raise SafetensorsError(f"{path} is corrupted: {size - base - pos} unexpected bytes after the tensor data; {fix}")
    return entries


def read_into(entry: TensorEntry, out: np.ndarray | None = None) -> np.ndarray:
    """Reads one float tensor (``F32`` / ``F16`` / ``BF16``) into ``out`` (or a new array).

    ``out``: a C-contiguous buffer of at least ``entry.nbytes`` bytes (any dtype); the returned array
    is a view of it with the tensor's dtype and shape.
    """
    dtype = FLOAT_DTYPES[entry.dtype]
    if out is None:
        out = np.empty(entry.nbytes, np.uint8)
    flat = out.reshape(-1).view(np.uint8)[: entry.nbytes]
    with open(entry.file, "rb", buffering=0) as f:
        f.seek(entry.start)
        view = memoryview(flat)
        done = 0
        while done < entry.nbytes:
            got = f.readinto(view[done:])
            if not got:
                raise SafetensorsError(f"{entry.file} is truncated: it ended while reading a tensor; "
                                       "re-download or re-export the file")
            done += got
    return flat.view(dtype).reshape(entry.shape)
