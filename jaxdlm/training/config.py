"""Experiment configuration files (TOML or JSON) for ``jaxdlm train CONFIG``.

Every value is checked before any compute starts; a bad one raises ``ValueError`` naming the field
(``section.field``), the value, and what is allowed.  Layout (every section but ``data`` is optional)::

    [model]
    config = "tiny.json"      # ModelConfig.to_dict() JSON, or a Hugging Face config.json (file or folder)
    init = "random"           # "random", or a finished/partial run folder to start from (its latest params)
    seed = 0                  # init seed for "random"
    overrides = {mask_token_id = 3, block_size = 16}   # dataclasses.replace on the ModelConfig
    remat = "none"            # per-layer rematerialisation: "none", "full" (keep layer inputs) or "dots"

    [data]
    train = "train.npy"       # tokens: 1-D stream (packed here) or 2-D [N, L] rows; chat: a .jsonl file
    eval = "eval.npy"         # optional, same format
    format = "tokens"         # "tokens" or "chat" (SFT: {"messages": [...]} per line; needs tokenizer)
    tokenizer = "tok_dir"     # transformers folder or tokenizer.json (chat format only)
    seq_len = 256             # multiple of the model's block_size
    seed = 0                  # shuffling seed

    [objective]               # jaxdlm.training.losses.LossConfig fields
    objective = "joint"       # "joint" or "ar"
    alpha = 0.3
    normalization = "pretrain"    # or "sft"
    schedule = "uniform"          # or "position"
    bidirectional = false

    [optim]                   # jaxdlm.training.step.OptimConfig fields, plus:
    batch_size = 8            # sequences per micro-batch
    accum = 1                 # micro-batches per optimizer step
    compute_dtype = "float32" # or "bfloat16" (float32 master params either way)

    [lora]                    # draft-adapter training (base frozen), off by default
    enabled = false
    rank = 16
    alpha = 32.0
    target = "soft"           # or "hard"

    [adapter]                 # adapter fine-tuning (LoRA / QLoRA-style; base frozen), off by default
    enabled = false
    rank = 16
    alpha = 32.0
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    base_dtype = "bfloat16"   # the frozen base: "float32", "bfloat16", "int8" or "int4" (jaxdlm.quant)

    [mesh]                    # how the devices of every process together are laid out (jaxdlm.sharding)
    data = 1                  # data-parallel replicas
    fsdp = 0                  # parameter (and batch) sharding; 0: every device left over (the default)
    tensor = 1                # Megatron-style tensor parallelism

    [run]
    out_dir = "runs/x"
    eval_every = 100          # 0: only at the end
    eval_batches = 8
    checkpoint_every = 100    # 0: only at the end
    keep = 2
    log_every = 10
    seed = 0                  # noise RNG seed
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from typing import Any, Mapping

from jaxdlm.model import REMAT_POLICIES
from jaxdlm.training.losses import LossConfig
from jaxdlm.training.step import OptimConfig

FORMATS = ("tokens", "chat")
COMPUTE_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class ModelSection:
    config: Any = None
    init: str = "random"
    seed: int = 0
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    remat: str = "none"


@dataclasses.dataclass(frozen=True)
class DataSection:
    train: str = ""
    eval: str | None = None
    format: str = "tokens"
    tokenizer: str | None = None
    seq_len: int = 256
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class LoraSection:
    enabled: bool = False
    rank: int = 16
    alpha: float = 32.0
    target: str = "soft"


@dataclasses.dataclass(frozen=True)
class AdapterSection:
    """``[adapter]``: an adapter (:mod:`jaxdlm.adapter`) trains on the frozen base, which is kept in ``base_dtype``
    (``"int8"`` / ``"int4"``: quantized by :mod:`jaxdlm.quant`, computing in bfloat16)."""

    enabled: bool = False
    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    base_dtype: str = "bfloat16"

    def adapter_config(self):
        """The :class:`~jaxdlm.adapter.AdapterConfig` of this section."""
        from jaxdlm.adapter import AdapterConfig

        return AdapterConfig(self.rank, self.alpha, tuple(self.targets))


@dataclasses.dataclass(frozen=True)
class MeshSection:
    """Mesh axis sizes; ``fsdp = 0`` takes every device the other axes leave (without ``[mesh]``: all of them)."""

    data: int = 1
    fsdp: int = 0
    tensor: int = 1

    def sizes(self, num_devices: int) -> dict[str, int]:
        """``{"data", "fsdp", "tensor"}`` sizes for ``num_devices`` devices (``fsdp = 0`` resolved); raises
        ``ValueError`` naming the sizes when they do not multiply to ``num_devices``."""
        fixed = self.data * self.tensor * max(self.fsdp, 1)
        fsdp = self.fsdp or num_devices // (self.data * self.tensor)
        if (self.fsdp and fixed != num_devices) or (not self.fsdp and num_devices % (self.data * self.tensor)):
            raise ValueError(f"[mesh] data={self.data}, fsdp={self.fsdp}, tensor={self.tensor} does not fit the "
                             f"{num_devices} devices of this run; make data x fsdp x tensor = {num_devices} "
                             "(fsdp = 0 takes every device left over)")
        return {"data": self.data, "fsdp": fsdp, "tensor": self.tensor}


@dataclasses.dataclass(frozen=True)
class RunSection:
    out_dir: str = "runs/default"
    eval_every: int = 100
    eval_batches: int = 8
    checkpoint_every: int = 100
    keep: int = 2
    log_every: int = 10
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: ModelSection
    data: DataSection
    objective: LossConfig
    optim: OptimConfig
    batch_size: int
    accum: int
    compute_dtype: str
    lora: LoraSection
    run: RunSection
    base_dir: str = "."
    mesh: MeshSection = MeshSection()
    adapter: AdapterSection = AdapterSection()

    def path(self, p: str | None) -> str | None:
        """``p`` resolved relative to the config file's folder (``~`` expanded)."""
        if p is None:
            return None
        p = os.path.expanduser(p)
        return p if os.path.isabs(p) else os.path.normpath(os.path.join(self.base_dir, p))

    def to_dict(self) -> dict:
        d = {}
        for name in ("model", "data", "objective", "lora", "run", "mesh", "adapter"):
            d[name] = dataclasses.asdict(getattr(self, name))
        d["model"]["overrides"] = dict(self.model.overrides)
        d["adapter"]["targets"] = list(self.adapter.targets)
        d["optim"] = dict(dataclasses.asdict(self.optim), batch_size=self.batch_size, accum=self.accum,
                          compute_dtype=self.compute_dtype)
        return d


_SECTIONS = ("model", "data", "objective", "optim", "lora", "run", "mesh", "adapter")


def default_sections() -> dict:
    """Every field of every section at its default, as :meth:`TrainConfig.to_dict` writes it (JSON values): what a
    run folder saved before a field existed ran with (``_check_same_config`` on resume)."""
    sections = {"model": ModelSection(), "data": DataSection(), "objective": LossConfig(), "optim": OptimConfig(),
                "lora": LoraSection(), "run": RunSection(), "mesh": MeshSection(), "adapter": AdapterSection()}
    return json.loads(json.dumps({k: dataclasses.asdict(v) for k, v in sections.items()}, default=str))
_OPTIM_EXTRA = {"batch_size": int, "accum": int, "compute_dtype": str}


def _expected_type(field: dataclasses.Field):
    t = field.type if not isinstance(field.type, str) else field.type
    s = str(t)
    if s.startswith("int") or s == "<class 'int'>":
        return (int,)
    if s.startswith("float"):
        return (int, float)
    if s.startswith("bool"):
        return (bool,)
    if s.startswith("str"):
        return (str,)
    return None


def _build(cls, section: str, values: Mapping[str, Any], extra: Mapping[str, type] | None = None):
    if not isinstance(values, Mapping):
        raise ValueError(f"[{section}] must be a table/object, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    extra = extra or {}
    kwargs, rest = {}, {}
    for key, value in values.items():
        if key in extra:
            rest[key] = value
            continue
        if key not in fields:
            allowed = sorted(set(fields) | set(extra))
            raise ValueError(f"{section}.{key} is not a known field; allowed fields: {allowed}")
        types = _expected_type(fields[key])
        optional = "None" in str(fields[key].type)
        if types is not None and not (value is None and optional):
            ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
            if not ok:
                names = "/".join(t.__name__ for t in types) + (" or null" if optional else "")
                raise ValueError(f"{section}.{key}={value!r} has the wrong type; expected {names}")
        kwargs[key] = value
    try:
        obj = cls(**kwargs)
    except ValueError as e:
        raise ValueError(f"[{section}] {e}") from None
    return obj, rest


def load_config(path: str | os.PathLike) -> TrainConfig:
    """Reads a ``.toml`` or ``.json`` config file and validates it (see :func:`parse_config`)."""
    path = os.path.expanduser(os.fspath(path))
    if not os.path.isfile(path):
        raise ValueError(f"config file not found: {path}")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        if path.endswith(".json"):
            data = json.loads(raw)
        else:
            data = tomllib.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"{path} could not be parsed: {e}") from None
    return parse_config(data, base_dir=os.path.dirname(os.path.abspath(path)))


def parse_config(data: Mapping[str, Any], base_dir: str = ".") -> TrainConfig:
    """Validates a config dict: every field by name, type and range (no file is read except existence checks).
    Relative paths in it are relative to ``base_dir`` (itself made absolute here, so that run folders and the
    ``base_run`` recorded in their checkpoints are absolute)."""
    base_dir = os.path.abspath(os.path.expanduser(base_dir))
    if not isinstance(data, Mapping):
        raise ValueError("the config must be a table/object of sections")
    unknown = sorted(set(data) - set(_SECTIONS))
    if unknown:
        raise ValueError(f"unknown config sections {unknown}; allowed sections: {list(_SECTIONS)}")
    model, _ = _build(ModelSection, "model", data.get("model", {}))
    dsec, _ = _build(DataSection, "data", data.get("data", {}))
    objective, _ = _build(LossConfig, "objective", data.get("objective", {}))
    optim, extra = _build(OptimConfig, "optim", data.get("optim", {}), _OPTIM_EXTRA)
    lora, _ = _build(LoraSection, "lora", data.get("lora", {}))
    run, _ = _build(RunSection, "run", data.get("run", {}))
    mesh, _ = _build(MeshSection, "mesh", data.get("mesh", {}))
    adapter = _check_adapter(data.get("adapter", {}), lora)
    batch_size, accum, compute_dtype = _optim_extras(extra)
    _check_sections(model, dsec, lora, run)
    _check_mesh(mesh, batch_size)
    if adapter.enabled and adapter.base_dtype == "float32" and compute_dtype == "bfloat16":
        raise ValueError("optim.compute_dtype='bfloat16' with adapter.base_dtype='float32': an adapter run computes "
                         "in its frozen base's dtype; set adapter.base_dtype = 'bfloat16' (or compute_dtype float32)")
    cfg = TrainConfig(model=model, data=dsec, objective=objective, optim=optim, batch_size=batch_size,
                      accum=accum, compute_dtype=compute_dtype, lora=lora, run=run, base_dir=base_dir, mesh=mesh,
                      adapter=adapter)
    _check_files_and_model(cfg)
    return cfg


def _optim_extras(extra: Mapping[str, Any]) -> tuple[int, int, str]:
    """``(batch_size, accum, compute_dtype)``: the [optim] entries that are not :class:`OptimConfig` fields."""
    batch_size = extra.get("batch_size", 8)
    accum = extra.get("accum", 1)
    compute_dtype = extra.get("compute_dtype", "float32")
    for name, v in (("batch_size", batch_size), ("accum", accum)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"optim.{name}={v!r} must be a positive integer")
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"optim.compute_dtype={compute_dtype!r} is not supported; allowed: {list(COMPUTE_DTYPES)}")
    return batch_size, accum, compute_dtype


def _check_sections(model: ModelSection, dsec: DataSection, lora: LoraSection, run: RunSection) -> None:
    """Values and ranges of the [data], [lora], [run] and [model] fields."""
    if dsec.format not in FORMATS:
        raise ValueError(f"data.format={dsec.format!r} is not supported; allowed: {list(FORMATS)}")
    if not dsec.train:
        raise ValueError("data.train is required (a .npy token file or a .jsonl chat file)")
    if not isinstance(dsec.seq_len, int) or dsec.seq_len < 1:
        raise ValueError(f"data.seq_len={dsec.seq_len!r} must be a positive integer")
    if dsec.format == "chat" and not dsec.tokenizer:
        raise ValueError("data.tokenizer is required when data.format='chat'")
    if lora.target not in ("soft", "hard"):
        raise ValueError(f"lora.target={lora.target!r} is not supported; allowed: ['soft', 'hard']")
    if lora.rank < 1:
        raise ValueError(f"lora.rank={lora.rank} must be a positive integer")
    if not lora.alpha > 0:
        raise ValueError(f"lora.alpha={lora.alpha} must be > 0")
    for name in ("eval_every", "checkpoint_every", "log_every"):
        v = getattr(run, name)
        if v < 0:
            raise ValueError(f"run.{name}={v} must be >= 0 (0 disables the periodic action)")
    if run.eval_batches < 1:
        raise ValueError(f"run.eval_batches={run.eval_batches} must be >= 1")
    if run.keep < 1:
        raise ValueError(f"run.keep={run.keep} must be >= 1")
    if model.config is None:
        raise ValueError("model.config is required (a ModelConfig JSON / HF config.json path, or an inline table)")
    if not isinstance(model.overrides, Mapping):
        raise ValueError(f"model.overrides={model.overrides!r} must be a table")
    if model.remat not in REMAT_POLICIES:
        raise ValueError(f"model.remat={model.remat!r} is not supported; allowed: {list(REMAT_POLICIES)}")


def _check_adapter(values: Mapping[str, Any], lora: LoraSection) -> AdapterSection:
    """The ``[adapter]`` section: types by :func:`_build`, ``targets`` a list, ``base_dtype``, then ``rank``,
    ``alpha`` and ``targets`` by :class:`~jaxdlm.adapter.AdapterConfig`, and not together with ``[lora] enabled``."""
    from jaxdlm.adapter import TARGETS
    from jaxdlm.training.adapter import BASE_DTYPES

    values = dict(values) if isinstance(values, Mapping) else values  # (_build names a non-table)
    if isinstance(values, dict) and "targets" in values:
        targets = values["targets"]
        if not isinstance(targets, (list, tuple)):
            raise ValueError(f"adapter.targets={targets!r} must be a list of layer names from {list(TARGETS)}")
        values["targets"] = tuple(targets)
    adapter, _ = _build(AdapterSection, "adapter", values)
    if adapter.base_dtype not in BASE_DTYPES:
        raise ValueError(f"adapter.base_dtype={adapter.base_dtype!r} is not supported; allowed: {list(BASE_DTYPES)}")
    try:
        adapter.adapter_config()
    except ValueError as e:
        raise ValueError(f"adapter.{e}") from None
    if adapter.enabled and lora.enabled:
        raise ValueError("adapter.enabled and lora.enabled are both true: [adapter] fine-tunes the model, [lora] "
                         "trains the draft LoRA of a frozen model; run them one after the other (the draft LoRA "
                         "on a merged adapter model)")
    return adapter


def _check_mesh(mesh: MeshSection, batch_size: int) -> None:
    """Axis sizes are positive (``fsdp`` may be 0) and the fixed batch axes divide ``optim.batch_size``."""
    for name in ("data", "fsdp", "tensor"):
        v = getattr(mesh, name)
        if v < (0 if name == "fsdp" else 1):
            raise ValueError(f"mesh.{name}={v} must be a positive integer" + (" (or 0: every device left over)"
                                                                              if name == "fsdp" else ""))
    rows = mesh.data * max(mesh.fsdp, 1)
    if batch_size % rows:
        raise ValueError(f"optim.batch_size={batch_size} is not a multiple of mesh.data x mesh.fsdp = {rows}: "
                         "every batch row shard needs the same number of rows")


def _check_files_and_model(cfg: TrainConfig) -> None:
    """The files the config names exist, the initial model is a run folder where it must be, and the model
    config (read, no arrays) suits the data and the objective."""
    model, dsec, lora = cfg.model, cfg.data, cfg.lora
    for name, p in (("data.train", dsec.train), ("data.eval", dsec.eval), ("data.tokenizer", dsec.tokenizer)):
        if p is not None and not os.path.exists(cfg.path(p)):
            raise ValueError(f"{name}={p!r}: file not found ({cfg.path(p)})")
    if isinstance(model.config, str) and not os.path.exists(cfg.path(model.config)):
        raise ValueError(f"model.config={model.config!r}: file not found ({cfg.path(model.config)})")
    if lora.enabled and model.init == "random":
        raise ValueError("lora.enabled=true needs model.init = a trained run folder (the frozen base model), "
                         "not 'random'")
    if model.init != "random" and not os.path.isdir(cfg.path(model.init)):
        raise ValueError(f"model.init={model.init!r} must be 'random' or an existing run folder" +
                         (" or jaxdlm checkpoint folder" if cfg.adapter.enabled else ""))
    mcfg = model_config(cfg)
    if dsec.seq_len % mcfg.block_size:
        raise ValueError(f"data.seq_len={dsec.seq_len} must be a multiple of the model's block_size="
                         f"{mcfg.block_size}")
    if cfg.adapter.enabled and cfg.adapter.base_dtype == "int4":
        from jaxdlm.quant import Quantization

        try:
            Quantization("int4").check(mcfg)
        except ValueError as e:
            raise ValueError(f"adapter.base_dtype='int4': {e}") from None
    if (cfg.objective.objective == "joint" or lora.enabled) and mcfg.mask_token_id is None:
        raise ValueError("model mask_token_id is None but the joint objective / draft LoRA needs one; "
                         "set model.overrides.mask_token_id")


def model_config(cfg: TrainConfig):
    """The run's :class:`~jaxdlm.config.ModelConfig` (file or inline table, then ``model.overrides``)."""
    from jaxdlm.config import ModelConfig

    src = cfg.model.config
    if isinstance(src, str):
        p = cfg.path(src)
        f = os.path.join(p, "config.json") if os.path.isdir(p) else p
        with open(f, encoding="utf-8") as fh:
            try:
                src = json.load(fh)
            except json.JSONDecodeError as e:
                raise ValueError(f"model.config={cfg.model.config!r} is not valid JSON: {e}") from None
    if not isinstance(src, Mapping):
        raise ValueError(f"model.config must be a path or a table, got {type(src).__name__}")
    try:
        mc = ModelConfig.from_dict(src) if "num_layers" in src else ModelConfig.from_hf(src)
    except (TypeError, ValueError) as e:
        raise ValueError(f"model.config: {e}") from None
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    bad = sorted(set(cfg.model.overrides) - fields)
    if bad:
        raise ValueError(f"model.overrides has unknown fields {bad}; allowed: {sorted(fields)}")
    try:
        over = dict(cfg.model.overrides)
        if "eos_token_ids" in over:
            over["eos_token_ids"] = tuple(over["eos_token_ids"])
        return dataclasses.replace(mc, **over)
    except (TypeError, ValueError) as e:
        raise ValueError(f"model.overrides: {e}") from None
