"""jaxdlm checkpoints: Orbax arrays + config + tokenizer files in one folder.

Layout of a checkpoint folder::

    jaxdlm.json        metadata: format version, ModelConfig, dtype, source, array manifest, LoRA flag,
                       quantization (scheme and head flag, or null)
    params/gNN/        Orbax PyTree checkpoints, each holding a few parameter arrays (a sub-tree of
                       the pure-dict parameter tree, [in, out] layout, layers stacked on axis 0)
    lora/              Orbax PyTree checkpoint of the draft LoRA (optional; entries a, b, scale: the fields
                       of jaxdlm.lora.OProjLoRA)
    config.json        the original Hugging Face config (converted checkpoints only)
    tokenizer.json ... tokenizer files (optional; loaded with transformers.AutoTokenizer)

Parameters are written in groups of at most about :data:`GROUP_BYTES` (a larger array forms its own
group), so writing never needs more host memory than one group: the converter builds one stacked
parameter at a time and hands it to :class:`CheckpointWriter`.  :func:`load` restores every array
straight into its target dtype (and optional sharding) through ``jax.ShapeDtypeStruct`` targets.

Writes are atomic (:func:`atomic_output`): everything goes into a temporary sibling folder that is
renamed at the end; on failure the target is untouched and the temporary folder is removed.

Every public function here takes a relative or ``~`` path: :func:`resolve_path` makes it absolute once, at the
entry (Orbax accepts absolute paths only).  :func:`load` also reads a training run folder (``jaxdlm train``'s
``run.out_dir``: ``model_config.json`` + ``checkpoints/``) through :func:`jaxdlm.training.load_trained`.

Quantized checkpoints (:mod:`jaxdlm.quant`) hold int8 / int4 / fp8 weights and their ``*_scale`` arrays as
ordinary parameters.  int4 arrays are packed two to a byte at this boundary only (Orbax stores ``int4`` one
byte per element, docs/model.md section 9); the manifest entry says so (``stored_as``) and loading unpacks on the device.  They are written as
format version 2; float checkpoints stay version 1, readable by older jaxdlm.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

FORMAT_NAME = "jaxdlm-checkpoint"
FORMAT_VERSION = 2  # the newest this code reads and writes (quantized checkpoints); float ones are written as 1
FLOAT_FORMAT_VERSION = 1
METADATA_FILE = "jaxdlm.json"
GROUP_BYTES = 256 * 1024 * 1024

# Files copied next to the weights so that ``transformers.AutoTokenizer`` can load them.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "tekken.json", "vocab.json", "merges.txt", "chat_template.jinja",
    "chat_template.json", "generation_config.json",
)
_TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


# ------------------------------------------------------------------------------------------- helpers


def resolve_path(path: str | os.PathLike) -> Path:
    """``path`` as an absolute path, ``~`` expanded (relative to the current directory); nothing is read."""
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


RUN_CONFIG_FILE = "model_config.json"  # written by jaxdlm.training.run into each run folder


def is_run_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a training run folder (``model_config.json`` and ``checkpoints/``, no ``jaxdlm.json``)."""
    root = resolve_path(path)
    return ((root / RUN_CONFIG_FILE).is_file() and (root / "checkpoints").is_dir()
            and not (root / METADATA_FILE).exists())


def _join(path: tuple[str, ...]) -> str:
    return "/".join(path)


def _fields(lora) -> dict[str, Any]:
    """Field name -> value of an :class:`~jaxdlm.lora.OProjLoRA` (its entries on disk)."""
    return {f.name: getattr(lora, f.name) for f in dataclasses.fields(lora)}


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _leaves(tree: dict, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """``(path, leaf)`` pairs of a nested dict, in sorted key order."""
    for key in sorted(tree, key=str):
        value = tree[key]
        if isinstance(value, dict):
            yield from _leaves(value, prefix + (str(key),))
        else:
            yield prefix + (str(key),), value


def _supported_kwargs(fn, **kwargs) -> dict:
    """The subset of ``kwargs`` that ``fn`` accepts (Orbax options differ across versions)."""
    params = inspect.signature(fn).parameters
    return {k: v for k, v in kwargs.items() if k in params}


def _quiet_absl():
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
    except ImportError:  # pragma: no cover
        pass


def _orbax_save(directory: Path, tree: dict) -> None:
    """Saves a nested dict of numpy arrays as one Orbax PyTree checkpoint, without copying them.

    Orbax's default numpy handler deep-copies every host array before writing, and compression adds
    another buffer; both would double the peak memory of a conversion, so both are off here.
    """
    import jax
    import orbax.checkpoint as ocp
    from orbax.checkpoint import type_handlers as th

    numpy_handler = th.NumpyHandler(**_supported_kwargs(th.NumpyHandler, deepcopy_host_arrays=False))
    registry = th.create_type_handler_registry((np.ndarray, numpy_handler), (jax.Array, th.ArrayHandler()))
    handler = ocp.PyTreeCheckpointHandler(**_supported_kwargs(
        ocp.PyTreeCheckpointHandler, use_compression=False, type_handler_registry=registry))
    checkpointer = ocp.Checkpointer(handler)
    try:
        checkpointer.save(os.fspath(directory), args=ocp.args.PyTreeSave(tree))
    finally:
        checkpointer.close()


def _orbax_restore(directory: Path, target: dict) -> dict:
    """Restores an Orbax PyTree checkpoint into ``target`` (nested dict of ``jax.ShapeDtypeStruct``; a leaf
    without a sharding is restored as a host numpy array)."""
    import jax
    import orbax.checkpoint as ocp

    restore_args = jax.tree.map(
        lambda x: ocp.RestoreArgs(restore_type=np.ndarray, dtype=x.dtype) if x.sharding is None else
        ocp.ArrayRestoreArgs(dtype=x.dtype, sharding=x.sharding, global_shape=x.shape), target)
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
    try:
        return checkpointer.restore(os.fspath(directory),
                                    args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args))
    finally:
        checkpointer.close()


def _pack_int4(array: np.ndarray) -> np.ndarray:
    """int4 ``[..., k, n]`` (k even) -> uint8 ``[..., k/2, n]``: row ``2i`` in the low nibble, ``2i+1`` in the high."""
    if array.ndim < 2 or array.shape[-2] % 2:
        raise ValueError(f"an int4 array is packed in pairs along axis -2; shape {array.shape} has no even axis -2")
    u = array.astype(np.int8).view(np.uint8) & np.uint8(0x0F)
    return u[..., 0::2, :] | (u[..., 1::2, :] << np.uint8(4))


def _unpack_int4(packed, sharding=None):
    """uint8 ``[..., k/2, n]`` (:func:`_pack_int4`) -> int4 ``[..., k, n]`` on the device, in ``sharding``."""
    import jax
    import jax.numpy as jnp

    def unpack(p):
        b = jax.lax.bitcast_convert_type(p, jnp.int8)
        lo, hi = jnp.right_shift(jnp.left_shift(b, 4), 4), jnp.right_shift(b, 4)  # arithmetic: sign-extends
        *lead, k2, n = p.shape
        return jnp.stack([lo, hi], axis=-2).reshape(*lead, 2 * k2, n).astype(jnp.int4)

    return jax.jit(unpack, out_shardings=sharding)(packed)


def _is_int4(dtype) -> bool:
    import ml_dtypes

    return np.dtype(dtype) == np.dtype(ml_dtypes.int4)


# ------------------------------------------------------------------------------------------- writing


@contextlib.contextmanager
def atomic_output(out_dir: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yields a fresh temporary sibling folder of ``out_dir``; renames it to ``out_dir`` on success.

    On any exception (KeyboardInterrupt included) the temporary folder is removed and ``out_dir`` is
    left as it was.  An existing ``out_dir`` is replaced only with ``overwrite=True`` and only when it
    is empty or a jaxdlm checkpoint (so a mistyped path cannot wipe an unrelated folder).
    """
    out = resolve_path(out_dir)
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise ValueError(f"OUT_DIR {out} already exists; pass --overwrite (overwrite=True) to replace it, "
                             "or choose another path")
        if not out.is_dir():
            raise ValueError(f"OUT_DIR {out} exists and is not a folder; remove it or choose another path")
        if any(out.iterdir()) and not (out / METADATA_FILE).is_file():
            raise ValueError(f"OUT_DIR {out} exists and is not a jaxdlm checkpoint (no {METADATA_FILE}); refusing "
                             "to replace it even with --overwrite: remove it yourself or choose another path")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should be an ordinary folder
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out, old)
            try:
                os.rename(tmp, out)
            except BaseException:
                os.rename(old, out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class CheckpointWriter:
    """Writes parameter arrays into ``root/params`` in bounded groups and the metadata at the end.

    ``add(path, array)`` takes one leaf of the pure-dict parameter tree (a numpy array, any dtype; int4 is
    packed two to a byte, :func:`_pack_int4`); arrays are buffered until about ``group_bytes`` are pending, then
    written as one Orbax checkpoint.  The writer keeps no reference to an array after its group is written.
    """

    def __init__(self, root: str | os.PathLike, *, group_bytes: int | None = None,
                 on_written: Callable[[int], None] | None = None):
        self.root = Path(root)
        self.group_bytes = GROUP_BYTES if group_bytes is None else group_bytes
        self.on_written = on_written
        self.manifest: dict[str, dict] = {}
        self._entries: dict[tuple[str, ...], dict] = {}
        self._pending: list[tuple[tuple[str, ...], np.ndarray]] = []
        self._pending_bytes = 0
        self._groups = 0
        _quiet_absl()

    def add(self, path: tuple[str, ...], array: np.ndarray) -> None:
        array = np.asarray(array)
        entry = {"shape": list(array.shape), "dtype": str(array.dtype)}
        if _is_int4(array.dtype):
            array = _pack_int4(array)
            entry["stored_as"] = {"dtype": str(array.dtype), "shape": list(array.shape)}
        if self._pending and self._pending_bytes + array.nbytes > self.group_bytes:
            self.flush()
        self._entries[tuple(path)] = entry
        self._pending.append((tuple(path), array))
        self._pending_bytes += array.nbytes
        if self._pending_bytes >= self.group_bytes:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        name = f"g{self._groups:03d}"
        tree: dict = {}
        for path, array in self._pending:
            _set(tree, path, np.ascontiguousarray(array))
            self.manifest[_join(path)] = {"group": name, **self._entries.pop(path)}
        _orbax_save(self.root / "params" / name, tree)
        self._groups += 1
        if self.on_written is not None:
            self.on_written(self._pending_bytes)
        self._pending, self._pending_bytes = [], 0

    def write_lora(self, lora) -> None:
        """The draft LoRA (an :class:`~jaxdlm.lora.OProjLoRA` of host arrays; the scale is stored as float32)."""
        tree = dataclasses.replace(lora, a=np.asarray(lora.a), b=np.asarray(lora.b),
                                   scale=np.asarray(lora.scale, np.float32))
        _orbax_save(self.root / "lora", tree)
        self.lora_manifest = {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in _fields(tree).items()}

    def finish(self, config, *, dtype: str, source: str | None, extra: dict | None = None, quant=None) -> dict:
        """Flushes pending arrays and writes ``jaxdlm.json``; returns the metadata.  ``dtype``: the compute dtype
        (of every float array); ``quant``: the :class:`~jaxdlm.quant.Quantization` of the arrays, or None."""
        self.flush()
        lora = getattr(self, "lora_manifest", None)
        meta = {
            "format": FORMAT_NAME,
            "format_version": FLOAT_FORMAT_VERSION if quant is None else FORMAT_VERSION,
            "config": config.to_dict(),
            "dtype": dtype,
            "quantization": None if quant is None else quant.to_dict(),
            "source": source,
            "has_lora": lora is not None,
            "arrays": self.manifest,
            "lora": lora,
            **(extra or {}),
        }
        with open(self.root / METADATA_FILE, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
        return meta


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copies the tokenizer / chat template / generation config files present in ``src``; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        path = Path(src) / name
        if path.is_file():
            shutil.copyfile(path, Path(dst) / name)
            copied.append(name)
    return copied


def save(model, path: str | os.PathLike, *, overwrite: bool = False, source: str | None = None,
         extra_files: dict[str, str] | None = None, merge_adapter: bool = False) -> Path:
    """Saves a :class:`~jaxdlm.model.Model` (params, LoRA, tokenizer) as a jaxdlm checkpoint folder.

    Arrays are fetched to the host one group at a time.  Atomic: ``path`` appears only when complete.
    ``overwrite=True`` replaces an existing jaxdlm checkpoint.  ``extra_files`` maps file names to text
    written into the folder with the rest (e.g. a model card).  ``path`` may be relative or start with ``~``;
    returns the absolute path.  A quantized model is
    saved with its compute dtype, bfloat16 (``model.astype("bfloat16")`` first otherwise).

    ``merge_adapter=True`` (a model with an adapter, e.g. ``jaxdlm.training.load_trained`` of an adapter run):
    writes the merged weights ``W + (alpha / rank) * A @ B`` (:func:`jaxdlm.model.merge_adapter`) as a plain
    model that ``jaxdlm.load`` reads and that generates like the adapter model.  They are written in the base's
    dtype; a quantized (int8 / int4) base is dequantized first and written as a float bfloat16 checkpoint (quantize
    it again when loading with ``jaxdlm.load(DIR, quantize=...)``).  A model with an adapter is refused without
    ``merge_adapter=True``: the adapter itself lives in its training run folder.
    """
    import jax
    from flax import nnx

    from jaxdlm import __version__

    path = resolve_path(path)
    if merge_adapter:
        from jaxdlm.model import merge_adapter as merge

        model = merge(model)
    elif model.adapter_config is not None:
        raise ValueError(f"the model carries an adapter ({model.adapter_config}); pass merge_adapter=True to write "
                         "the merged weights W + scale * A @ B (the adapter alone lives in its training run folder)")
    quant = model.quant
    if quant is not None and np.dtype(model.dtype).name != "bfloat16":
        raise ValueError(f"a {quant.scheme} checkpoint keeps its other arrays and scales in bfloat16, and this model "
                         f"computes in {np.dtype(model.dtype).name}: save model.astype('bfloat16')")
    pure = nnx.to_pure_dict(model.params)
    with atomic_output(path, overwrite=overwrite) as tmp:
        writer = CheckpointWriter(tmp)
        for leaf_path, leaf in _leaves(pure):
            writer.add(leaf_path, np.asarray(jax.device_get(leaf)))
        if model.lora is not None:
            writer.write_lora(jax.device_get(model.lora))
        if model.tokenizer is not None and hasattr(model.tokenizer, "save_pretrained"):
            model.tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            if os.path.basename(name) != name or name in (METADATA_FILE, "params", "lora"):
                raise ValueError(f"extra_files name {name!r} must be a plain file name other than "
                                 f"{METADATA_FILE}, params and lora")
            (tmp / name).write_text(text, encoding="utf-8")
        writer.finish(model.config, dtype=str(np.dtype(model.dtype)), source=source, quant=quant,
                      extra={"writer": f"jaxdlm.save {__version__}"})
    return path


# ------------------------------------------------------------------------------------------- loading


def read_metadata(path: str | os.PathLike) -> dict:
    """The ``jaxdlm.json`` of a checkpoint folder; ``ValueError`` when ``path`` is not one."""
    root = resolve_path(path)
    meta_path = root / METADATA_FILE
    if not root.exists():
        raise ValueError(f"checkpoint folder {root} does not exist; check the path (a Hugging Face folder must be "
                         f"converted first: python -m convert_weights HF_DIR OUT_DIR)")
    if not root.is_dir():
        raise ValueError(f"{root} is a file, not a checkpoint folder; pass the folder that holds {METADATA_FILE}")
    if is_run_folder(root):
        raise ValueError(f"{root} is a training run folder, not a jaxdlm checkpoint: jaxdlm.load or "
                         f"jaxdlm.training.load_trained reads it (its latest parameters and LoRA); "
                         f"jaxdlm.save(jaxdlm.training.load_trained(RUN), OUT) makes a checkpoint of it")
    if not meta_path.is_file():
        raise ValueError(
            f"{root} is not a jaxdlm checkpoint (no {METADATA_FILE}); convert a Hugging Face folder first: "
            f"python -m convert_weights HF_DIR {root}")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{meta_path} is not valid JSON ({e}); re-create the checkpoint") from None
    if meta.get("format") != FORMAT_NAME:
        raise ValueError(f"{meta_path} has format={meta.get('format')!r}, expected {FORMAT_NAME!r}")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{meta_path} has format_version={version!r}; this jaxdlm reads versions <= "
                         f"{FORMAT_VERSION}: upgrade jaxdlm")
    return meta


def _resolve_sharding(sharding, path: tuple[str, ...]):
    import jax

    if sharding is None:
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if callable(sharding) and not isinstance(sharding, jax.sharding.Sharding):
        return sharding(path)
    return sharding


def load_tokenizer(path: str | os.PathLike):
    """``transformers.AutoTokenizer`` from the local folder, or ``None`` when it holds no tokenizer files."""
    root = resolve_path(path)
    if not any((root / name).is_file() for name in _TOKENIZER_MARKERS):
        return None
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(os.fspath(root), local_files_only=True)
    except Exception as first:  # noqa: BLE001 - e.g. a config.json with a model_type transformers lacks
        if (root / "tokenizer.json").is_file():
            try:
                return transformers.PreTrainedTokenizerFast.from_pretrained(os.fspath(root), local_files_only=True)
            except Exception:  # noqa: BLE001
                pass
        raise ValueError(f"cannot load the tokenizer files in {root} ({type(first).__name__}: {first}); "
                         "fix or remove them, or pass tokenizer=False") from None


def load_arrays(path: str | os.PathLike, names=None, *, dtype=None) -> dict:
    """Restores raw parameter arrays by name (``"embed"``, ``"layers/q_proj"``...; ``None``: all).

    Whole groups are read (a group is at most about :data:`GROUP_BYTES` unless one array is larger);
    returns ``{name: jax.Array}`` on the first device, cast to ``dtype`` when given (quantized weights keep
    their storage dtype).
    """
    import jax

    root = resolve_path(path)
    manifest = read_metadata(root)["arrays"]
    names = sorted(manifest) if names is None else list(names)
    unknown = [n for n in names if n not in manifest]
    if unknown:
        raise ValueError(f"{root} has no array {unknown[0]!r}; it has {sorted(manifest)}")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    out = {}
    for group in sorted({manifest[n]["group"] for n in names}):
        target: dict = {}
        for name, entry in manifest.items():
            if entry["group"] == group:
                cast = dtype is not None and entry["dtype"] not in _QUANTIZED_DTYPES
                _set(target, tuple(name.split("/")), _stored_target(entry, dtype if cast else entry["dtype"], device))
        for leaf_path, value in _leaves(_orbax_restore(root / "params" / group, target)):
            if _join(leaf_path) in names:
                out[_join(leaf_path)] = _unpacked(manifest[_join(leaf_path)], value, device)
    return out


# storage dtypes of quantized weights (jaxdlm.quant), by name as the manifest writes them
_QUANTIZED_DTYPES = ("int8", "int4", "float8_e4m3fn")


def _stored_target(entry: dict, dtype, sharding):
    """The restore target of a manifest entry in ``dtype`` (``sharding`` None: a host numpy array); a packed int4
    entry is restored as its stored uint8 pairs (:func:`_unpacked` then unpacks them)."""
    import jax

    if "stored_as" in entry:
        return jax.ShapeDtypeStruct(tuple(entry["stored_as"]["shape"]), entry["stored_as"]["dtype"], sharding=sharding)
    return jax.ShapeDtypeStruct(tuple(entry["shape"]), dtype, sharding=sharding)


def _unpacked(entry: dict, value, sharding):
    """A restored array as the model holds it: packed int4 pairs unpacked (on the device, in ``sharding``)."""
    return _unpack_int4(value, sharding) if "stored_as" in entry else value


def load(path: str | os.PathLike, *, dtype=None, sharding=None, mesh=None, rules=None, tokenizer: bool = True,
         quantize=None):
    """Loads a jaxdlm checkpoint folder (written by ``convert_weights`` or :func:`save`) as a Model.

    Args:
      path: the checkpoint folder (relative or ``~`` paths too), or a training run folder: its latest parameters
        and LoRA (:func:`jaxdlm.training.load_trained`) and the tokenizer files it holds, if any; ``dtype`` then
        casts after loading, and ``sharding``, ``mesh``, ``rules`` and ``quantize`` are refused (save the run as a
        checkpoint first).
      dtype: restore every floating array as this dtype (e.g. ``jnp.bfloat16``); ``None`` keeps the
        stored dtype.  Orbax casts while reading (``jax.ShapeDtypeStruct`` targets).  The LoRA scale
        stays float32.
      sharding: ``None`` (first device), one ``jax.sharding.Sharding`` for every array, or a function
        ``path tuple -> Sharding`` (e.g. ``("layers", "q_proj")``; the LoRA uses ``("lora", "a")``...).
      mesh: a mesh from :func:`jaxdlm.make_mesh`: restore every array straight into the shardings
        that ``rules`` (default :data:`jaxdlm.sharding.DEFAULT_RULES`) give it - no gather onto one
        device.  Exclusive with ``sharding``.  The model's jitted calls then run under that mesh.
      tokenizer: load the tokenizer files when present (``transformers.AutoTokenizer``).
      quantize: ``"int8"``, ``"int4"``, ``"fp8"`` or a :class:`~jaxdlm.quant.Quantization`: quantize the linear
        weights of a float checkpoint while loading, one restored group at a time on the host (the weight in the
        compute dtype, as the converter's ``--quantize`` does: the same bits).  A quantized model computes in
        bfloat16: ``dtype`` must then be ``None`` (bfloat16) or bfloat16.  A checkpoint that is already
        quantized (``jaxdlm.json``'s ``quantization``) loads as such without this argument.

    Returns a :class:`~jaxdlm.model.Model` (config, params, lora or None, tokenizer or None).
    """
    import jax.numpy as jnp

    from jaxdlm import quant as quant_lib
    from jaxdlm.config import ModelConfig
    from jaxdlm.model import Model

    root = resolve_path(path)
    if is_run_folder(root):
        return _load_run(root, dtype, tokenizer, sharding=sharding, mesh=mesh, rules=rules, quantize=quantize)
    meta = read_metadata(root)
    config = ModelConfig.from_dict(meta["config"])
    stored = quant_lib.Quantization.from_dict(meta.get("quantization"))
    requested = quant_lib.as_quantization(quantize)
    if stored is not None and requested is not None:
        raise ValueError(f"{root} is already quantized ({stored.describe()}); load it without quantize= "
                         "(quantizing its weights again would add a second rounding), or quantize its float original")
    quant = stored or requested
    if quant is not None:  # the LoRA, too, is then restored in the compute dtype
        dtype = dtype if dtype is not None else (meta["dtype"] if stored else quant_lib.COMPUTE_DTYPES[0])
        quant_lib.check_compute_dtype(dtype, quant)
    sharding = _mesh_sharding(config, mesh, sharding, rules, quant)
    abstract = Model.abstract(config, dtype=jnp.dtype(dtype if dtype is not None else meta["dtype"]), quantize=quant)
    params = _restore_params(root, meta["arrays"], abstract.params, sharding, requested)
    lora = _restore_lora(root, meta["lora"], config, dtype, sharding) if meta.get("has_lora") else None
    tok = load_tokenizer(root) if tokenizer else None
    return Model(config, abstract.graphdef, params, lora=lora, tokenizer=tok, mesh=mesh)


def _load_run(root: Path, dtype, tokenizer: bool, **refused):
    """:func:`load` of a training run folder: :func:`jaxdlm.training.load_trained` (latest step, with the run's
    LoRA), cast to ``dtype``, with the folder's tokenizer files when ``tokenizer`` and present.  ``refused``: the
    :func:`load` arguments that load_trained has no counterpart for (each must be None)."""
    given = [name for name, value in refused.items() if value is not None]
    if given:
        raise ValueError(f"{root} is a training run folder, read through jaxdlm.training.load_trained, which takes no "
                         f"{given[0]}=: save it as a checkpoint first (jaxdlm.save(jaxdlm.training.load_trained(RUN), "
                         f"OUT)), then jaxdlm.load(OUT, {given[0]}=...)")
    from jaxdlm.training.run import load_trained

    model = load_trained(root)
    if dtype is not None:
        model = model.astype(dtype)
    if tokenizer:
        model.tokenizer = load_tokenizer(root)
    return model


def read_config(path: str | os.PathLike):
    """The :class:`~jaxdlm.config.ModelConfig` of a checkpoint folder (``jaxdlm.json``) or of a training run
    folder (``model_config.json``), without reading any weights; ``ValueError`` when ``path`` is neither."""
    from jaxdlm.config import ModelConfig

    root = resolve_path(path)
    if is_run_folder(root):
        with open(root / RUN_CONFIG_FILE, encoding="utf-8") as f:
            return ModelConfig.from_dict(json.load(f))
    return ModelConfig.from_dict(read_metadata(root)["config"])


def _mesh_sharding(config, mesh, sharding, rules, quant=None):
    """:func:`load`'s ``sharding`` argument, or with ``mesh`` the function giving each path its sharding
    under ``rules`` (after checking that the mesh divides the model, quantized by ``quant``)."""
    if mesh is None:
        return sharding
    from jaxdlm import sharding as sh

    if sharding is not None:
        raise ValueError("pass either mesh= or sharding= to jaxdlm.load, not both")
    rules = sh.DEFAULT_RULES if rules is None else rules
    from jaxdlm.model import param_layout

    layout = param_layout(config, quant)
    sh.check_divisible(config, mesh, rules, layout=layout)
    return sh.sharding_for_path(layout, mesh, rules)


def _restore_params(root: Path, manifest: dict, params, sharding, quantize=None):
    """Restores every parameter of the abstract ``params`` (an ``nnx.State`` of ``ShapeDtypeStruct``) from
    its group, in its target dtype and sharding; returns ``params`` filled with the arrays.

    ``quantize`` (a :class:`~jaxdlm.quant.Quantization`; ``params`` is then the quantized tree): the checkpoint
    holds float weights where ``params`` has quantized ones and no scales; each such weight is restored to the
    host in the compute dtype (its scale's), quantized there and put into its target sharding.
    """
    import jax
    from flax import nnx

    from jaxdlm import quant as quant_lib

    expected = dict(_leaves(nnx.to_pure_dict(params)))
    on_host = set(quantize.weight_paths()) if quantize is not None else set()
    scales = {quant_lib.scale_path(p) for p in on_host}  # made here, not read
    stored = {p: leaf for p, leaf in expected.items() if p not in scales}
    _check_manifest(root, manifest, stored)
    groups: dict[str, dict] = {}
    for leaf_path, leaf in stored.items():
        entry = manifest[_join(leaf_path)]
        if leaf_path in on_host:
            target = _stored_target(entry, expected[quant_lib.scale_path(leaf_path)].dtype, None)
        else:
            target = _stored_target(entry, leaf.dtype, _resolve_sharding(sharding, leaf_path))
        _set(groups.setdefault(entry["group"], {}), leaf_path, target)
    pure: dict = {}
    for name, target in groups.items():
        for leaf_path, value in _leaves(_orbax_restore(root / "params" / name, target)):
            if leaf_path in on_host:
                scale_dtype = expected[quant_lib.scale_path(leaf_path)].dtype
                for path, array in quant_lib.quantized_leaves(leaf_path, value, quantize, scale_dtype):
                    _set(pure, path, jax.device_put(array, _resolve_sharding(sharding, path)))
            else:
                _set(pure, leaf_path, _unpacked(manifest[_join(leaf_path)], value,
                                                _resolve_sharding(sharding, leaf_path)))
    nnx.replace_by_pure_dict(params, pure)
    return params


def _check_manifest(root: Path, manifest: dict, expected: dict) -> None:
    """``ValueError`` naming the first missing, unexpected or wrongly-shaped parameter of a checkpoint."""
    names = set(map(_join, expected))
    missing = sorted(names - set(manifest))
    if missing:
        raise ValueError(f"{root} lacks parameter {missing[0]} ({len(missing)} missing); re-create the checkpoint")
    extra = sorted(set(manifest) - names)
    if extra:
        raise ValueError(f"{root} holds unexpected parameter {extra[0]}; re-create the checkpoint")
    for leaf_path, leaf in expected.items():
        shape = tuple(manifest[_join(leaf_path)]["shape"])
        if shape != tuple(leaf.shape):
            raise ValueError(f"{root}: parameter {_join(leaf_path)} has shape {shape}, the config needs "
                             f"{tuple(leaf.shape)}; re-create the checkpoint")


def _restore_lora(root: Path, manifest: dict, config, dtype, sharding):
    """The draft :class:`~jaxdlm.lora.OProjLoRA` of ``root/lora``: ``a`` and ``b`` in ``dtype`` (``None``: as
    stored), the scale float32; ``manifest`` is ``jaxdlm.json``'s ``lora`` entry."""
    import jax

    from jaxdlm.lora import OProjLoRA

    abstract = OProjLoRA.abstract(config, manifest["a"]["shape"][-1],
                                  dtype if dtype is not None else manifest["a"]["dtype"])
    targets = {}
    for name, leaf in _fields(abstract).items():
        if tuple(manifest[name]["shape"]) != leaf.shape:
            raise ValueError(f"{root}: LoRA entry {name} has shape {tuple(manifest[name]['shape'])}, the config "
                             f"needs {leaf.shape}; re-create the checkpoint")
        targets[name] = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                             sharding=_resolve_sharding(sharding, ("lora", name)))
    return _orbax_restore(root / "lora", OProjLoRA(**targets))
