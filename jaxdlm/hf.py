"""The map between Hugging Face (PyTorch) tensor names and jaxdlm parameters.

PyTorch ``Linear`` weights are ``[out, in]``; jaxdlm keeps ``[in, out]``, so projections are
transposed.  Per-layer tensors are stacked on a leading layer axis.  NLD checkpoints use
``encoder.*`` and ``diffusion_head.weight``; AR checkpoints use ``model.*`` and ``lm_head.weight``
(absent when the head is tied to the embedding).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdlm.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One Hugging Face tensor: where it goes in the jaxdlm parameter tree and how."""

    hf_key: str
    path: tuple[str, ...]       # path in the pure-dict parameter tree
    hf_shape: tuple[int, ...]   # shape in the safetensors file (from jaxdlm.model.param_layout)
    layer: int | None = None    # index on the stacked layer axis, or None
    transpose: bool = False     # [out, in] -> [in, out]


def _prefix(config: ModelConfig) -> str:
    return "encoder." if config.is_nld else "model."


def _head_key(config: ModelConfig) -> str:
    return "diffusion_head.weight" if config.is_nld else "lm_head.weight"


def tensor_specs(config: ModelConfig) -> Iterator[TensorSpec]:
    """Every tensor a checkpoint of ``config`` must contain, in file order (docs/model.md section 5).

    The name map is written here; each file shape is the jaxdlm parameter's shape
    (:func:`jaxdlm.model.param_layout`) without the layer axis, reversed when transposed.
    """
    from jaxdlm.model import param_layout

    layout = param_layout(config)

    def spec(hf_key: str, path: tuple[str, ...], layer: int | None = None, transpose: bool = False) -> TensorSpec:
        shape = layout[path].shape[0 if layer is None else 1:]
        return TensorSpec(hf_key, path, shape[::-1] if transpose else shape, layer, transpose)

    p = _prefix(config)
    yield spec(f"{p}embed_tokens.weight", ("embed",))
    for n in range(config.num_layers):
        lp = f"{p}layers.{n}."
        yield spec(lp + "input_layernorm.weight", ("layers", "attn_norm", "weight"), n)
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            yield spec(f"{lp}self_attn.{proj}.weight", ("layers", proj), n, transpose=True)
        if config.qk_norm:
            yield spec(lp + "self_attn.q_norm.weight", ("layers", "q_norm", "weight"), n)
            yield spec(lp + "self_attn.k_norm.weight", ("layers", "k_norm", "weight"), n)
        yield spec(lp + "post_attention_layernorm.weight", ("layers", "mlp_norm", "weight"), n)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            yield spec(f"{lp}mlp.{proj}.weight", ("layers", proj), n, transpose=True)
    yield spec(f"{p}norm.weight", ("final_norm", "weight"))
    if not config.tie_word_embeddings:
        yield spec(_head_key(config), ("head",), transpose=True)


def optional_keys(config: ModelConfig) -> set[str]:
    """Tensors a checkpoint may hold that jaxdlm ignores (a tied model may still store its lm_head)."""
    keys = set()
    if config.tie_word_embeddings:
        keys.add(_head_key(config))
    return keys


def params_from_hf(config: ModelConfig, get: Callable[[str], np.ndarray] | Mapping[str, np.ndarray], *,
                   dtype=None) -> dict:
    """Builds the pure-dict parameter tree from Hugging Face tensors.

    ``get`` maps a tensor name to a numpy array (a dict, or a function reading one tensor at a time).
    ``dtype``: cast target (``None`` keeps each tensor's dtype).  Raises ``KeyError`` naming a missing
    tensor and ``ValueError`` naming a tensor whose shape is wrong.
    """
    getter = get.__getitem__ if isinstance(get, Mapping) else get
    stacked: dict[tuple[str, ...], np.ndarray] = {}
    tree: dict = {}
    for spec in tensor_specs(config):
        arr = np.asarray(getter(spec.hf_key))
        if tuple(arr.shape) != spec.hf_shape:
            raise ValueError(f"tensor {spec.hf_key}: expected shape {spec.hf_shape}, got {tuple(arr.shape)}")
        if dtype is not None:
            arr = arr.astype(dtype)
        if spec.transpose:
            arr = arr.T
        if spec.layer is None:
            _set(tree, spec.path, arr)
        else:
            buf = stacked.get(spec.path)
            if buf is None:
                buf = np.empty((config.num_layers,) + arr.shape, arr.dtype)
                stacked[spec.path] = buf
                _set(tree, spec.path, buf)
            buf[spec.layer] = arr
    return tree


def _set(tree: dict, path: tuple[str, ...], value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def model_from_pure_dict(config: ModelConfig, pure: dict, *, lora=None, tokenizer=None):
    """A :class:`~jaxdlm.model.Model` whose parameters are the arrays of ``pure`` (moved to device)."""
    from jaxdlm.model import Model

    leaves = jax.tree.leaves(pure)
    abstract = Model.abstract(config, dtype=leaves[0].dtype if leaves else jnp.float32)
    params = abstract.params
    nnx.replace_by_pure_dict(params, jax.tree.map(jnp.asarray, pure))
    return Model(config, abstract.graphdef, params, lora=lora, tokenizer=tokenizer)
