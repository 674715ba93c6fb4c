"""Hugging Face safetensors checkpoint -> jaxdlm checkpoint (Orbax), streamed one tensor at a time.

Everything about the input is checked before anything is written: config, weight files (index,
shards, headers), tensor names, shapes and dtypes, and the optional draft LoRA adapter.  Then each
parameter of the jaxdlm tree (``jaxdlm.hf.tensor_specs`` gives the name map, transposes and layer
stacking) is built on its own, from one tensor read at a time, and handed to the checkpoint writer,
which writes it (in a background thread) and drops it.  Peak host memory is therefore about the
largest stacked parameter (e.g. ``layers.gate_proj``: ``[L, H, I]``) plus one source tensor, plus
at most :data:`OVERLAP_BYTES` for building the next parameter while the previous one is written;
never the whole model.  Source files are read with ``readinto`` (see :mod:`.safetensors_io`), not
memory-mapped, so the page cache does not count as resident memory.

With ``quantize`` (:mod:`jaxdlm.quant`) each linear weight is quantized layer by layer as it is read: a
quantized parameter is built from one float layer at a time, so the largest array alive is the int8 / int4 /
fp8 stack plus one float layer, smaller than the float stack a plain conversion holds.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from convert_weights.safetensors_io import FLOAT_DTYPES, TensorEntry, read_header, read_into

__version__ = "1.0"

DTYPES = ("keep", "bfloat16", "float32")
QUANTIZE = ("int8", "int4", "fp8")  # jaxdlm.quant.SCHEMES (the command line lists them without importing jax)
# memory beyond the largest parameter that may hold the next parameter while the previous one is written
OVERLAP_BYTES = 600 * 1000**2
LORA_SUBFOLDER = "linear_spec_lora"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# buffers some older exports carry that are not parameters
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
_LORA_KEY = re.compile(r"^(?:.*\.)?layers\.(\d+)\.self_attn\.o_proj\.lora_([AB])(?:\.[A-Za-z0-9_]+)?\.weight$")


class ConversionError(ValueError):
    """Bad input; the message names the problem and the fix (one line)."""


@dataclasses.dataclass
class Group:
    """One leaf of the jaxdlm parameter tree and the source tensors it is built from."""

    path: tuple[str, ...]
    specs: list          # jaxdlm.hf.TensorSpec, ordered by layer
    shape: tuple[int, ...]
    quant: object = None  # a jaxdlm.quant.Quantization when this weight is stored quantized

    @property
    def stacked(self) -> bool:
        return self.specs[0].layer is not None

    def output_bytes(self, dtype: np.dtype) -> int:
        """Bytes of the arrays this parameter is written as (a quantized weight and its scale)."""
        if self.quant is None:
            return math.prod(self.shape) * dtype.itemsize
        return (math.prod(self.shape) * self.quant.storage_dtype.itemsize
                + math.prod(self.quant.scale_shape(self.shape)) * dtype.itemsize)


# ------------------------------------------------------------------------------------------- inputs


def _check_paths(hf: Path, out: Path, overwrite: bool) -> None:
    if not hf.exists():
        raise ConversionError(f"HF_DIR {hf} does not exist; pass the folder that holds config.json and *.safetensors")
    if not hf.is_dir():
        raise ConversionError(f"HF_DIR {hf} is not a folder; pass the folder that holds config.json and *.safetensors")
    hf_real, out_real = hf.resolve(), Path(os.path.abspath(out)).resolve()
    if out_real == hf_real or hf_real in out_real.parents:
        raise ConversionError(f"OUT_DIR {out} is inside HF_DIR {hf} (or the same folder); choose an OUT_DIR outside it")
    if out_real in hf_real.parents:
        raise ConversionError(f"HF_DIR {hf} is inside OUT_DIR {out}; choose an OUT_DIR that does not contain the input")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise ConversionError(f"OUT_DIR {out} already exists; pass --overwrite to replace it, or choose another path")


def _load_config(hf: Path):
    from jaxdlm.config import ModelConfig

    path = hf / "config.json"
    if not path.is_file():
        raise ConversionError(f"no config.json in HF_DIR {hf}; pass a Hugging Face model folder "
                              "(config.json + *.safetensors)")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path} is not valid JSON ({e}); re-download it") from None
    if not isinstance(raw, dict):
        raise ConversionError(f"{path} holds a JSON {type(raw).__name__}, not an object; re-download it")
    try:
        return ModelConfig.from_hf(raw)
    except ValueError as e:
        raise ConversionError(f"{path}: {e}") from None


def _refuse_pickles(folder: Path, what: str) -> None:
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ConversionError(
            f"{what} {folder} holds only PyTorch pickle weights ({', '.join(pickles[:3])}) and no *.safetensors; "
            "pickles can run arbitrary code, so they are never loaded: re-save them as safetensors "
            "(save_pretrained(..., safe_serialization=True)) on a trusted machine")


def find_tensors(hf: Path) -> dict[str, TensorEntry]:
    """Every tensor of the checkpoint in ``hf`` (single file or sharded with an index), headers validated."""
    index = hf / "model.safetensors.index.json"
    if index.is_file():
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            raise ConversionError(f"{index} is corrupted (no valid 'weight_map'); re-download it") from None
        shards: dict[str, str] = {}
        for key, shard in weight_map.items():
            shards.setdefault(shard, key)
        for shard, key in shards.items():
            if not (hf / shard).is_file():
                raise ConversionError(f"{index.name} names shard {shard} (holding {key}) but HF_DIR {hf} has no such "
                                      "file; download the missing shard")
        files = sorted(shards)
    elif (hf / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        files = sorted(p.name for p in hf.glob("*.safetensors"))
        if not files:
            _refuse_pickles(hf, "HF_DIR")
            raise ConversionError(f"no *.safetensors weights in HF_DIR {hf}; expected model.safetensors or shards "
                                  "listed in model.safetensors.index.json")
    entries: dict[str, TensorEntry] = {}
    for name in files:
        for key, entry in read_header(os.fspath(hf / name)).items():
            if key in entries:
                raise ConversionError(f"tensor {key} appears in both {Path(entries[key].file).name} and {name}; "
                                      "keep one copy of the checkpoint in HF_DIR")
            entries[key] = entry
    if index.is_file():
        for key, shard in weight_map.items():
            if key not in entries or Path(entries[key].file).name != shard:
                raise ConversionError(f"{index.name} says tensor {key} is in {shard}, but that file does not hold it; "
                                      "re-download the checkpoint")
    return entries


def plan(config, entries: dict[str, TensorEntry]) -> list[Group]:
    """Checks names / shapes / dtypes against ``jaxdlm.hf.tensor_specs`` and groups tensors by parameter."""
    from jaxdlm.hf import optional_keys, tensor_specs
    from jaxdlm.model import param_layout

    specs = list(tensor_specs(config))
    wanted = {s.hf_key for s in specs}
    missing = [s.hf_key for s in specs if s.hf_key not in entries]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ConversionError(f"missing tensor {missing[0]}{more} (model_type={config.model_type}, "
                              f"{config.num_layers} layers); check that the checkpoint matches its config.json")
    optional = optional_keys(config)
    unexpected = sorted(k for k in entries if k not in wanted and k not in optional and not _IGNORED.search(k))
    if unexpected:
        more = f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""
        raise ConversionError(f"unexpected tensor {unexpected[0]}{more} for model_type={config.model_type} "
                              f"({'encoder.*' if config.is_nld else 'model.*'} layout); check that config.json "
                              "matches the weights")
    layout = param_layout(config)
    groups: dict[tuple[str, ...], Group] = {}
    for s in specs:
        e = entries[s.hf_key]
        if e.shape != s.hf_shape:
            raise ConversionError(f"tensor {s.hf_key} has shape {list(e.shape)}, expected {list(s.hf_shape)} from "
                                  "config.json; check that the checkpoint matches its config")
        if e.dtype not in FLOAT_DTYPES:
            raise ConversionError(f"tensor {s.hf_key} has dtype {e.dtype}, expected BF16, F16 or F32 weights; "
                                  "re-export the checkpoint in a floating dtype")
        groups.setdefault(s.path, Group(s.path, [], layout[s.path].shape)).specs.append(s)
    return list(groups.values())


def output_dtype(dtype: str, groups: list[Group], entries: dict[str, TensorEntry]) -> np.dtype:
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    if dtype != "keep":
        return np.dtype(FLOAT_DTYPES["BF16"] if dtype == "bfloat16" else np.float32)
    found = sorted({entries[s.hf_key].dtype for g in groups for s in g.specs})
    if len(found) > 1:
        raise ConversionError(f"the checkpoint mixes dtypes {', '.join(found)}, so --dtype keep is ambiguous; "
                              "pass --dtype bfloat16 or --dtype float32")
    return np.dtype(FLOAT_DTYPES[found[0]])


# ------------------------------------------------------------------------------------------- LoRA


def read_lora(lora_dir: Path, config, dtype: np.dtype):
    """PEFT draft adapter (o_proj only) -> a :class:`jaxdlm.lora.OProjLoRA` of numpy arrays.

    PEFT stores ``lora_A`` ``[r, in]`` and ``lora_B`` ``[out, r]`` (``delta W = scale * B @ A`` in the
    PyTorch ``[out, in]`` layout); jaxdlm uses ``y = x @ W`` so ``a = A.T`` and ``b = B.T``.
    ``scale = lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``).
    """
    from jaxdlm.lora import OProjLoRA

    weights = _adapter_files(lora_dir)
    r, scale = _adapter_config(lora_dir / "adapter_config.json")
    target = OProjLoRA.abstract(config, r, dtype)
    found = _adapter_tensors(weights, config, target)
    a, b = np.empty(target.a.shape, dtype), np.empty(target.b.shape, dtype)
    for layer in range(config.num_layers):
        np.copyto(a[layer], read_into(found[(layer, "A")]).T, casting="unsafe")
        np.copyto(b[layer], read_into(found[(layer, "B")]).T, casting="unsafe")
    return OProjLoRA(a, b, np.asarray(scale, np.float32))


def _adapter_files(lora_dir: Path) -> Path:
    """The adapter's weight file, after checking that the folder holds a PEFT adapter (config + safetensors)."""
    if not lora_dir.is_dir():
        raise ConversionError(f"LoRA folder {lora_dir} does not exist; pass a PEFT adapter folder "
                              "(adapter_config.json + adapter_model.safetensors)")
    weights = lora_dir / "adapter_model.safetensors"
    if not weights.is_file():
        _refuse_pickles(lora_dir, "LoRA folder")
    for p in (lora_dir / "adapter_config.json", weights):
        if not p.is_file():
            raise ConversionError(f"LoRA folder {lora_dir} has no {p.name}; a PEFT adapter needs adapter_config.json "
                                  "and adapter_model.safetensors")
    return weights


def _adapter_config(cfg_path: Path) -> tuple[int, float]:
    """``(rank, scale)`` from a PEFT ``adapter_config.json``; refuses what jaxdlm's o_proj LoRA cannot hold."""
    try:
        with open(cfg_path, encoding="utf-8") as f:
            ac = json.load(f)
        r, alpha = int(ac["r"]), float(ac["lora_alpha"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, UnicodeDecodeError):
        raise ConversionError(f"{cfg_path} is not a PEFT LoRA config (needs r and lora_alpha); re-export "
                              "the adapter") from None
    if r <= 0:
        raise ConversionError(f"{cfg_path}: r={r} must be a positive rank")
    targets = ac.get("target_modules")
    targets = [targets] if isinstance(targets, str) else list(targets or [])
    if not targets or any(not t.endswith("o_proj") for t in targets):
        raise ConversionError(f"{cfg_path}: target_modules={targets} but jaxdlm's draft LoRA applies to o_proj only; "
                              "pass an adapter trained on o_proj (the linear_spec_lora of NLD instruct models)")
    for field in ("rank_pattern", "alpha_pattern"):
        if ac.get(field):
            raise ConversionError(f"{cfg_path}: {field}={ac[field]} (per-layer ranks) is not supported; use one "
                                  "rank and alpha for every layer")
    if ac.get("use_dora"):
        raise ConversionError(f"{cfg_path}: use_dora=true is not supported; pass a plain LoRA adapter")
    return r, alpha / math.sqrt(r) if ac.get("use_rslora") else alpha / r


def _adapter_tensors(weights: Path, config, target) -> dict[tuple[int, str], TensorEntry]:
    """``(layer, "A" | "B") -> tensor`` for every layer, each checked against the shapes of ``target`` (the
    abstract :class:`~jaxdlm.lora.OProjLoRA`, transposed per layer) and a floating dtype."""
    n_layers, r = config.num_layers, target.rank
    want = {"A": target.a.shape[:0:-1], "B": target.b.shape[:0:-1]}  # PEFT's [r, in] and [out, r]
    found: dict[tuple[int, str], TensorEntry] = {}
    for key, e in read_header(os.fspath(weights)).items():
        m = _LORA_KEY.match(key)
        if m is None:
            raise ConversionError(f"unexpected tensor {key} in {weights.name}; the draft LoRA must hold only "
                                  "layers.N.self_attn.o_proj.lora_A / lora_B weights (target o_proj only)")
        layer, which = int(m.group(1)), m.group(2)
        if layer >= n_layers:
            raise ConversionError(f"{weights.name} has a LoRA for layer {layer} but the model has {n_layers} layers "
                                  f"(0..{n_layers - 1}); pass the adapter made for this model")
        if e.dtype not in FLOAT_DTYPES:
            raise ConversionError(f"tensor {key} has dtype {e.dtype}, expected BF16, F16 or F32; re-export the adapter")
        if e.shape != want[which]:
            raise ConversionError(f"tensor {key} has shape {list(e.shape)}, expected {list(want[which])} (rank r={r} "
                                  f"from adapter_config.json, o_proj {want['A'][1]} -> {want['B'][0]}); pass the "
                                  "adapter made for this model")
        found[(layer, which)] = e
    for layer in range(n_layers):
        for which in "AB":
            if (layer, which) not in found:
                have = len({k[0] for k in found})
                raise ConversionError(f"{weights.name} has no o_proj lora_{which} for layer {layer} (LoRA for {have} "
                                      f"layers, the model has {n_layers}); pass the adapter made for this model")
    return found


# ------------------------------------------------------------------------------------------- building


def build(group: Group, entries: dict[str, TensorEntry], dtype: np.dtype,
          advance: Callable[[int], None]) -> list[tuple[tuple[str, ...], np.ndarray]]:
    """The jaxdlm arrays of one parameter, ``[(path, array)]``: source tensors read one at a time, transposed,
    cast, stacked; a quantized weight (``group.quant``) is read into one float layer at a time and quantized
    from it (:func:`jaxdlm.quant.quantize`), giving the weight and its scale."""
    scratch = {}
    if group.quant is None:
        out = np.empty(group.shape, dtype)
        for spec in group.specs:
            _read(entries[spec.hf_key], spec, out[spec.layer] if group.stacked else out, scratch, advance)
        return [(group.path, out)]
    from jaxdlm.quant import quantized_leaves

    layer = np.empty(group.shape[1:] if group.stacked else group.shape, dtype)
    outs = None
    for spec in group.specs:
        _read(entries[spec.hf_key], spec, layer, scratch, advance)
        pieces = list(quantized_leaves(group.path, layer, group.quant, dtype))
        if outs is None:
            lead = (len(group.specs),) if group.stacked else ()
            outs = [(path, np.empty(lead + a.shape, a.dtype)) for path, a in pieces]
        for (_, out), (_, piece) in zip(outs, pieces):
            out[spec.layer if group.stacked else ...] = piece
    return outs


def _read(e: TensorEntry, spec, dst: np.ndarray, scratch: dict, advance: Callable[[int], None]) -> None:
    """Reads source tensor ``e`` into ``dst`` (transposed and cast as ``spec`` says), through a scratch buffer kept
    in ``scratch`` unless it can be read straight into place."""
    if not spec.transpose and FLOAT_DTYPES[e.dtype] == dst.dtype:
        read_into(e, dst)  # straight into place
    else:
        if scratch.get("buf") is None or scratch["buf"].nbytes < e.nbytes:
            scratch["buf"] = np.empty(e.nbytes, np.uint8)
        src = read_into(e, scratch["buf"])
        _copy(dst, src.T if spec.transpose else src)
    advance(e.nbytes)


def _copy(dst: np.ndarray, src: np.ndarray, tile: int = 256) -> None:
    """``dst[...] = src`` (with cast) in square tiles, so a transposed source stays cache friendly.

    Same dtype: copied as unsigned integers of the same width (numpy's fast path; bf16 is an
    extension dtype).  A plain ``copyto`` of a transposed [131072, 3072] source is about 6x slower.
    """
    if dst.dtype == src.dtype:
        bits = np.dtype(f"u{dst.dtype.itemsize}")
        dst, src = dst.view(bits), src.view(bits)
    if dst.ndim != 2:
        np.copyto(dst, src, casting="unsafe")
        return
    rows, cols = dst.shape
    for i in range(0, rows, tile):
        for j in range(0, cols, tile):
            np.copyto(dst[i:i + tile, j:j + tile], src[i:i + tile, j:j + tile], casting="unsafe")


def working_bytes(group: Group, entries: dict[str, TensorEntry], dtype: np.dtype) -> int:
    """Host memory :func:`build` needs for ``group``: the output plus its scratch buffer (if any), plus for a
    quantized weight one float layer and the quantizer's float32 scratch."""
    from jaxdlm.quant import CHUNK_BYTES, WORKERS

    scratch = max((entries[s.hf_key].nbytes for s in group.specs
                   if s.transpose or FLOAT_DTYPES[entries[s.hf_key].dtype] != dtype), default=0)
    if group.quant is not None:
        layer = math.prod(group.shape[1:] if group.stacked else group.shape) * dtype.itemsize
        scratch += layer + 3 * CHUNK_BYTES * WORKERS
    return group.output_bytes(dtype) + scratch


def write_groups(writer, groups: list[Group], entries: dict[str, TensorEntry], dtype: np.dtype,
                 advance: Callable[[int], None], *, overlap_bytes: int = 0) -> None:
    """Builds each parameter and hands it to ``writer``, writing in a background thread.

    The next parameter is built while earlier ones are still being written only while the memory of
    everything alive stays within ``max(largest working set, largest output + overlap_bytes)``; with
    ``overlap_bytes=0`` the largest parameter is always alone.
    """
    import threading
    from concurrent.futures import ThreadPoolExecutor

    sizes = [working_bytes(g, entries, dtype) for g in groups]
    largest_out = max(g.output_bytes(dtype) for g in groups)
    budget = max(max(sizes), largest_out + overlap_bytes)
    failed = threading.Event()

    def write(arrays):
        if failed.is_set():  # an earlier write failed: skip the rest
            return
        try:
            for path, array in arrays:
                writer.add(path, array)
        except BaseException:
            failed.set()
            raise

    inflight: list = []  # (future, bytes) in submission order
    with ThreadPoolExecutor(1, thread_name_prefix="convert-write") as pool:
        try:
            for group, size in zip(groups, sizes):
                while inflight and (failed.is_set() or inflight[0][0].done() or not overlap_bytes
                                    or sum(n for _, n in inflight) + size > budget):
                    inflight.pop(0)[0].result()  # re-raises a failed write
                arrays = build(group, entries, dtype, advance)
                # the writer keeps no reference once written; ``size`` is released when the future is done
                inflight.append((pool.submit(write, arrays), group.output_bytes(dtype)))
                del arrays
            while inflight:
                inflight.pop(0)[0].result()
            pool.submit(writer.flush).result()
        except BaseException:
            failed.set()
            for future, _ in inflight:
                future.cancel()
            raise


# ------------------------------------------------------------------------------------------- main entry


def convert(hf_dir, out_dir, *, dtype: str = "keep", lora=None, overwrite: bool = False,
            progress: bool | None = None, log: Callable[[str], None] | None = print,
            overlap_bytes: int = OVERLAP_BYTES, quantize: str | None = None, quantize_head: bool = False) -> dict:
    """Converts the Hugging Face checkpoint folder ``hf_dir`` into a jaxdlm checkpoint at ``out_dir``.

    Args:
      dtype: ``"keep"`` (the checkpoint's dtype; refused when it mixes dtypes), ``"bfloat16"`` or ``"float32"``.
      quantize: ``"int8"``, ``"int4"`` or ``"fp8"`` (or a :class:`jaxdlm.quant.Quantization`, e.g. with an int4
        ``group_size``): store every linear weight quantized (:mod:`jaxdlm.quant`);
        the other arrays and the scales are then bfloat16 (``"keep"`` stores bfloat16 too, and ``log`` says so when
        the checkpoint is not bfloat16; ``"float32"`` is refused); ``quantize_head`` quantizes the output head too.
      hf_dir, out_dir, lora: folders; relative and ``~`` paths are made absolute first.
      lora: a PEFT draft-LoRA folder; ``None`` uses ``hf_dir/linear_spec_lora`` when present.
      overwrite: replace an existing jaxdlm checkpoint at ``out_dir``.
      progress: tqdm bar over bytes; ``None`` shows it when stderr is a terminal.
      log: receives one-line status messages (``None``: silent).
      overlap_bytes: memory allowed beyond the largest parameter for building the next parameter
        while the previous one is written (0: strictly one at a time).

    Returns the metadata written to ``jaxdlm.json`` plus ``seconds`` and ``bytes_read``.
    Raises :class:`ConversionError` (a ``ValueError``) on bad input; ``out_dir`` is then not created
    (or left untouched with ``overwrite``).
    """
    from tqdm import tqdm

    from jaxdlm.checkpoint import CheckpointWriter, atomic_output, copy_tokenizer_files, resolve_path

    say = log or (lambda msg: None)
    t0 = time.perf_counter()
    hf, out = resolve_path(hf_dir), resolve_path(out_dir)
    quant, config, entries, groups, out_dtype = _checked_plan(hf, out, dtype, quantize, quantize_head, overwrite, say)
    lora_dir = _lora_dir(hf, lora, say)
    lora_params = read_lora(lora_dir, config, out_dtype) if lora_dir is not None else None

    total = sum(entries[s.hf_key].nbytes for g in groups for s in g.specs)
    show = sys.stderr.isatty() if progress is None else progress
    # small parameters first so that the writer batches them; each big one then forms its own group
    groups.sort(key=lambda g: math.prod(g.shape))
    with atomic_output(out, overwrite=overwrite) as tmp, \
            tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="converting",
                 disable=not show, file=sys.stderr, dynamic_ncols=True) as bar:
        writer = CheckpointWriter(tmp)
        write_groups(writer, groups, entries, out_dtype, bar.update, overlap_bytes=overlap_bytes)
        if lora_params is not None:
            writer.write_lora(lora_params)
        shutil.copyfile(hf / "config.json", tmp / "config.json")
        copied = copy_tokenizer_files(hf, tmp)
        meta = writer.finish(config, dtype=out_dtype.name, source=str(hf.resolve()), quant=quant, extra={
            "converter": f"convert_weights {__version__}",
            "lora_source": None if lora_dir is None else str(lora_dir.resolve()),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "source_files": sorted({Path(e.file).name for e in entries.values()}),
            "tokenizer_files": copied,
        })
    seconds = time.perf_counter() - t0
    say(f"converted {sum(len(g.specs) for g in groups)} tensors ({total / 1e9:.2f} GB, {config.model_type}, "
        f"{config.num_layers} layers) to {out} as {out_dtype.name}" + _summary_tail(quant, seconds, lora_params, copied))
    return {**meta, "seconds": seconds, "bytes_read": total}


def _checked_plan(hf: Path, out: Path, dtype: str, quantize, quantize_head: bool, overwrite: bool,
                  say: Callable[[str], None]):
    """Every check that needs no writing, then the plan: ``(quant, config, entries, groups, out_dtype)``."""
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    quant = _quantization(quantize, quantize_head, dtype)
    _check_paths(hf, out, overwrite)
    _refuse_quantized(hf)
    config = _load_config(hf)
    entries = find_tensors(hf)
    groups = plan(config, entries)
    if quant is not None and dtype == "keep":
        dtype = _quantized_dtype(quant, groups, entries, say)
    out_dtype = output_dtype(dtype, groups, entries)
    if quant is not None:
        _plan_quantized(quant, config, groups, out_dtype)
    return quant, config, entries, groups, out_dtype


def _summary_tail(quant, seconds: float, lora_params, copied) -> str:
    """The end of the converter's one-line summary: quantization, time, draft LoRA, tokenizer files."""
    return ((f" with {quant.describe()} weights" if quant is not None else "") + f" in {seconds:.1f} s"
            + (f"; draft LoRA rank {lora_params.rank}, scale {float(lora_params.scale):g}" if lora_params is not None
               else "")
            + (f"; tokenizer files: {', '.join(copied)}" if copied else "; no tokenizer files"))


def _quantization(quantize, head: bool, dtype: str):
    """The :class:`jaxdlm.quant.Quantization` asked for (``quantize``: a scheme name or a ``Quantization``, e.g. one
    with an int4 ``group_size``; or None), checked against ``--dtype``."""
    if quantize is None:
        if head:
            raise ConversionError("--quantize-head needs --quantize int8, int4 or fp8")
        return None
    from jaxdlm.quant import COMPUTE_DTYPES, Quantization, as_quantization

    if not isinstance(quantize, Quantization) and quantize not in QUANTIZE:
        raise ConversionError(f"--quantize {quantize!r} is not a quantization scheme; choose one of "
                              f"{', '.join(QUANTIZE)}")
    quant = as_quantization(quantize, True if head else None)
    if dtype not in ("keep",) + COMPUTE_DTYPES:
        raise ConversionError(f"--quantize {quant.scheme} stores weight-only quantized weights beside "
                              f"{'/'.join(COMPUTE_DTYPES)} arrays, and --dtype {dtype} asks for full precision: drop "
                              f"--dtype {dtype} (or --quantize)")
    return quant


def _quantized_dtype(quant, groups: list[Group], entries: dict[str, TensorEntry], say: Callable[[str], None]) -> str:
    """``--dtype`` for ``--quantize`` with ``--dtype keep``: the compute dtype of quantized weights (bfloat16); said
    in one line when the checkpoint holds other dtypes (a float32 checkpoint is rounded to bfloat16 first)."""
    from jaxdlm.quant import COMPUTE_DTYPES

    found = sorted({FLOAT_DTYPES[entries[s.hf_key].dtype].name for g in groups for s in g.specs})
    target = COMPUTE_DTYPES[0]
    if found != [target]:
        say(f"--quantize {quant.scheme}: the checkpoint is {' + '.join(found)}; storing its other arrays and the "
            f"scales in {target} (the compute dtype of quantized weights), as --dtype {target} would")
    return target


def _refuse_quantized(hf: Path) -> None:
    """A folder that is already quantized (a jaxdlm checkpoint, or a Hugging Face config with a
    ``quantization_config``) cannot be quantized again."""
    from jaxdlm.checkpoint import METADATA_FILE

    if (hf / METADATA_FILE).is_file():
        try:
            meta = json.loads((hf / METADATA_FILE).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            meta = {}
        quant = meta.get("quantization") if isinstance(meta, dict) else None
        what = f"{quant['scheme']} quantized, " if isinstance(quant, dict) and "scheme" in quant else ""
        raise ConversionError(f"HF_DIR {hf} is a jaxdlm checkpoint ({what}it has {METADATA_FILE}), not a Hugging Face "
                              "folder; load it with jaxdlm.load, or convert the original Hugging Face folder")
    try:
        quant_cfg = json.loads((hf / "config.json").read_text(encoding="utf-8")).get("quantization_config")
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return  # reported by _load_config
    if quant_cfg:
        method = quant_cfg.get("quant_method", "?") if isinstance(quant_cfg, dict) else "?"
        raise ConversionError(f"HF_DIR {hf} holds an already quantized checkpoint (config.json quantization_config, "
                              f"quant_method {method}); convert the bfloat16 original instead")


def _plan_quantized(quant, config, groups: list[Group], out_dtype: np.dtype) -> None:
    """Marks the groups of the quantized weights, after checking the config and the output dtype."""
    from jaxdlm.quant import COMPUTE_DTYPES

    if out_dtype.name not in COMPUTE_DTYPES:
        raise ConversionError(f"the checkpoint is {out_dtype.name}, and --quantize {quant.scheme} keeps the other "
                              f"arrays and the scales in {'/'.join(COMPUTE_DTYPES)}: add --dtype bfloat16")
    try:
        quant.check(config)
    except ValueError as e:
        raise ConversionError(f"--quantize {quant.scheme}: {e}") from None
    paths = set(quant.weight_paths())
    for g in groups:
        if g.path in paths:
            g.quant = quant


def _lora_dir(hf: Path, lora, say: Callable[[str], None]) -> Path | None:
    """The draft-LoRA folder to convert: ``lora`` when given, else ``hf/linear_spec_lora`` when present
    (and said so), else None."""
    if lora is not None:
        return Path(lora)
    if (hf / LORA_SUBFOLDER).is_dir():
        say(f"found draft LoRA adapter {hf / LORA_SUBFOLDER} (auto-detected); converting it too")
        return hf / LORA_SUBFOLDER
    return None
