"""Model configuration: a frozen, hashable dataclass built from a Hugging Face ``config.json``.

Supported ``model_type`` values: ``nemotron_labs_diffusion`` (NLD), ``ministral3``, ``mistral``,
``llama`` and ``qwen3``.  The config is static data: it is hashable so that it can be passed as a
static argument to ``jax.jit``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

SUPPORTED_MODEL_TYPES = ("nemotron_labs_diffusion", "ministral3", "mistral", "llama", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "llama3", "yarn")

# model types whose checkpoints use the NLD key layout (``encoder.*`` and ``diffusion_head``).
NLD_MODEL_TYPES = ("nemotron_labs_diffusion",)


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters with Hugging Face transformers' semantics.

    ``rope_type`` is ``"default"``, ``"llama3"`` or ``"yarn"``.  ``llama4_scaling_beta`` enables the
    Llama-4 query scale ``1 + beta * log(1 + floor(pos / original_max_position_embeddings))`` applied
    to queries after RoPE (Ministral-3 / NLD); ``None`` disables it.
    """

    rope_type: str = "default"
    theta: float = 10000.0
    factor: float | None = None
    original_max_position_embeddings: int | None = None
    # yarn
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True
    # llama3
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    # Ministral-3 / NLD query scaling
    llama4_scaling_beta: float | None = None

    def __post_init__(self):
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"rope_type={self.rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        if self.theta <= 0:
            raise ValueError(f"rope_theta={self.theta} must be > 0")
        if self.rope_type in ("yarn", "llama3"):
            if self.factor is None or self.factor <= 0:
                raise ValueError(f"rope '{self.rope_type}' needs factor > 0, got factor={self.factor}")
            if self.original_max_position_embeddings is None:
                raise ValueError(f"rope '{self.rope_type}' needs original_max_position_embeddings")
        if self.rope_type == "llama3" and (self.low_freq_factor is None or self.high_freq_factor is None):
            raise ValueError("rope 'llama3' needs low_freq_factor and high_freq_factor")
        if self.llama4_scaling_beta is not None and self.original_max_position_embeddings is None:
            raise ValueError("llama_4_scaling_beta needs original_max_position_embeddings")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only transformer (Ministral-3 / Mistral / Llama / Qwen3 / NLD).

    ``head_dim`` is explicit (it need not equal ``hidden_size // num_heads``).  ``mask_token_id`` is
    the diffusion MASK token and ``block_size`` the diffusion block length; both are ``None`` for a
    plain AR model until a user sets them (``dataclasses.replace``).
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    qk_norm: bool = False
    rope: RopeConfig = RopeConfig()
    max_position_embeddings: int = 4096
    sliding_window: int | None = None
    mask_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    block_size: int = 32
    torch_dtype: str | None = None

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type={self.model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads={self.num_heads} is not divisible by num_key_value_heads="
                f"{self.num_kv_heads}; grouped-query attention needs heads % kv_heads == 0"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.rms_norm_eps <= 0:
            raise ValueError(f"rms_norm_eps={self.rms_norm_eps} must be > 0")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"sliding_window={self.sliding_window} must be a positive integer or None")
        if self.mask_token_id is not None and not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(f"mask_token_id={self.mask_token_id} is outside the vocabulary [0, {self.vocab_size})")
        for t in self.eos_token_ids:
            if not 0 <= t < self.vocab_size:
                raise ValueError(f"eos_token_id={t} is outside the vocabulary [0, {self.vocab_size})")

    # ------------------------------------------------------------------ derived
    @property
    def num_groups(self) -> int:
        """Query heads per kv head."""
        return self.num_heads // self.num_kv_heads

    @property
    def is_nld(self) -> bool:
        """True when checkpoints use the NLD key layout (``encoder.*``, ``diffusion_head``)."""
        return self.model_type in NLD_MODEL_TYPES

    @property
    def eos_token_id(self) -> int | None:
        """The first EOS id (``None`` when the config names none)."""
        return self.eos_token_ids[0] if self.eos_token_ids else None

    def num_params(self) -> int:
        """Number of parameters (LoRA excluded)."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * d * (2 * self.num_heads + 2 * self.num_kv_heads) + (2 * d if self.qk_norm else 0)
        layer = attn + 3 * h * i + 2 * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + self.num_layers * layer + h + head

    # ------------------------------------------------------------------ parsing
    @classmethod
    def from_hf(cls, config: str | os.PathLike | Mapping[str, Any]) -> "ModelConfig":
        """Builds a config from a Hugging Face ``config.json`` (a path to the file or its folder, or a dict).

        Raises ``ValueError`` naming the field for an unsupported ``model_type``, a missing required
        field or inconsistent values.
        """
        config = _read_hf_config(config)
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type={model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )

        def req(name):
            if config.get(name) is None:
                raise ValueError(f"config.json (model_type={model_type!r}) is missing required field {name!r}")
            return config[name]

        _refuse_unsupported_layers(config)
        hidden = int(req("hidden_size"))
        heads = int(req("num_attention_heads"))
        kv_heads = config.get("num_key_value_heads")
        rope = _parse_rope(config, model_type)
        eos_ids = _eos_ids(config.get("eos_token_id"))
        sliding = _sliding_window(config, model_type)
        mask_id = config.get("mask_token_id")
        if mask_id is None and model_type in NLD_MODEL_TYPES:
            raise ValueError("config.json (nemotron_labs_diffusion) is missing required field 'mask_token_id'")
        return cls(
            model_type=model_type,
            vocab_size=int(req("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(req("intermediate_size")),
            num_layers=int(req("num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=heads if kv_heads is None else int(kv_heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-5 if model_type != "qwen3" else 1e-6)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            qk_norm=model_type == "qwen3",
            rope=rope,
            max_position_embeddings=int(config.get("max_position_embeddings", 4096)),
            sliding_window=None if sliding is None else int(sliding),
            mask_token_id=None if mask_id is None else int(mask_id),
            eos_token_ids=eos_ids,
            bos_token_id=config.get("bos_token_id"),
            pad_token_id=config.get("pad_token_id"),
            block_size=int(config.get("block_size") or config.get("block_length") or 32),
            torch_dtype=config.get("dtype") or config.get("torch_dtype"),
        )

    def to_dict(self) -> dict:
        """A JSON-serialisable dict (round-trips through :meth:`from_dict`)."""
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        d["rope"] = RopeConfig(**d.get("rope", {}))
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {unknown}; known: {sorted(fields)}")
        return cls(**d)


def _read_hf_config(config: str | os.PathLike | Mapping[str, Any]) -> dict:
    """The ``config.json`` dict: ``config`` itself, or read from the file or the folder holding it."""
    if isinstance(config, Mapping):
        return dict(config)
    path = os.fspath(config)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"config file not found: {path} (expected a Hugging Face config.json)")
    with open(path, encoding="utf-8") as f:
        try:
            return dict(json.load(f))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None


def _refuse_unsupported_layers(config: Mapping[str, Any]) -> None:
    """Biases and activations other than SiLU are not part of jaxdlm's layer."""
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise ValueError(f"{flag}=true is not supported (jaxdlm models have no biases); set it to false")
    act = config.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"hidden_act={act!r} is not supported; supported: 'silu'")


def _eos_ids(eos) -> tuple[int, ...]:
    """``eos_token_id`` (absent, one id or a list) as a tuple of ids."""
    if eos is None:
        return ()
    if isinstance(eos, (list, tuple)):
        return tuple(int(e) for e in eos)
    return (int(eos),)


def _sliding_window(config: Mapping[str, Any], model_type: str) -> int | None:
    """The one global sliding window (Qwen3 only with ``use_sliding_window``); per-layer windows are refused."""
    sliding = config.get("sliding_window")
    if model_type == "qwen3" and not config.get("use_sliding_window", False):
        sliding = None
    layer_types = config.get("layer_types")
    if layer_types and any(t != "full_attention" for t in layer_types) and sliding is not None:
        raise ValueError(
            f"layer_types={sorted(set(layer_types))} (per-layer sliding windows) is not supported; "
            "only full attention in every layer, optionally with one global sliding_window"
        )
    return sliding


def _parse_rope(config: Mapping[str, Any], model_type: str) -> RopeConfig:
    """Reads ``rope_parameters`` (transformers >= 5) or the older ``rope_scaling`` + ``rope_theta``."""
    params = config.get("rope_parameters")
    if params is None:
        params = dict(config.get("rope_scaling") or {})
    else:
        params = dict(params)
    theta = params.get("rope_theta", config.get("rope_theta"))
    if theta is None:
        theta = 1e6 if model_type in ("ministral3", "nemotron_labs_diffusion", "qwen3") else 10000.0
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope_type={rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"partial_rotary_factor={params['partial_rotary_factor']} is not supported; use 1.0")

    def opt_float(name):
        v = params.get(name)
        return None if v is None else float(v)

    orig = params.get("original_max_position_embeddings")
    return RopeConfig(
        rope_type=rope_type,
        theta=float(theta),
        factor=opt_float("factor"),
        original_max_position_embeddings=None if orig is None else int(orig),
        beta_fast=opt_float("beta_fast"),
        beta_slow=opt_float("beta_slow"),
        mscale=opt_float("mscale"),
        mscale_all_dim=opt_float("mscale_all_dim"),
        attention_factor=opt_float("attention_factor"),
        truncate=bool(params.get("truncate", True)),
        low_freq_factor=opt_float("low_freq_factor"),
        high_freq_factor=opt_float("high_freq_factor"),
        llama4_scaling_beta=opt_float("llama_4_scaling_beta"),
    )
