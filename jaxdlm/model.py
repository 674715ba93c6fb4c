"""The decoder (Ministral-3 / Mistral / Llama / Qwen3 / NLD) as Flax NNX modules, a pure forward and the
user-facing :class:`Model`.

* :class:`RMSNorm`, :class:`Block` (one decoder layer) and :class:`Transformer` (embedding, stacked
  layers, final norm, output head) are the modules.  Every parameter is created with its logical axes
  (``out_sharding`` metadata, e.g. ``("layers", "embed", "heads")`` for ``q_proj``); :func:`param_layout`
  reads shapes and axes from an abstract model, and :mod:`jaxdlm.sharding` and :mod:`jaxdlm.hf` derive
  their tables from it.
* :meth:`Transformer.__call__` is the general forward (mask metadata given directly); :func:`forward`
  covers the common kinds (below); :class:`Model` bundles config, parameters, the optional draft LoRA
  (:class:`~jaxdlm.lora.OProjLoRA`) and a tokenizer.

Layers are stacked on a leading axis (one array per parameter, ``[L, ...]``).  Two layer loops give the same
result (:data:`LAYER_LOOPS`): ``"unrolled"`` (straight-line code with static layer indices) and ``"scan"`` (a
``lax.scan``).  Training scans.  Inference uses ``layers="auto"``: unrolled on a GPU / TPU, where a loop makes
XLA copy every layer's weight slice out of the stacked arrays, and scanned on a CPU, where XLA copies static
slices instead and the unrolled program compiles several times longer (the measurements: docs/gpu_speed.md).

==================  =======================================  ============================
kind                queries attend to                        cache
==================  =======================================  ============================
``causal``          earlier tokens (+ whole cache)           written, length advanced
``denoise``         whole cache + all tokens of the block    scratch only, length kept
``quadratic``       see :func:`masks.quadratic_info`         scratch only, length kept
``bidirectional``   all tokens (no cache)                    -
``two_stream``      ``[x_t | x_0]`` training layout          -
==================  =======================================  ============================

``two_stream_bidirectional`` is ``two_stream`` with a fully bidirectional noisy half that sees no clean
keys (the comparison baseline of AR-to-diffusion conversion studies).

Shapes (also the suffixes of local names such as ``q_BxTxNxD``): ``B`` batch, ``T`` new tokens, ``S`` cache
slots, ``H`` hidden, ``N`` query heads, ``K`` kv heads, ``D`` head dim, ``F = N * D``, ``I`` MLP hidden,
``V`` vocabulary, ``L`` layers.  Parameters use the ``[in, out]`` layout (``y = x @ W``); docs/model.md
section 4 lists them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdlm import adapter as adapter_lib
from jaxdlm import quant as quant_lib
from jaxdlm import rope as rope_lib
from jaxdlm.adapter import AdapterConfig
from jaxdlm.attention import attention, masks
from jaxdlm.attention.masks import TokenInfo
from jaxdlm.cache import KVCache, write
from jaxdlm.config import ModelConfig
from jaxdlm.lora import OProjLoRA
from jaxdlm.quant import Quantization
from jaxdlm.sharding import CACHE_AXES, constrain

_INIT_STD = 0.02

CACHED_KINDS = ("causal", "denoise", "quadratic")
UNCACHED_KINDS = ("causal", "bidirectional", "two_stream", "two_stream_bidirectional")
LAYER_LOOPS = ("unrolled", "scan")

#: Rematerialisation of each decoder layer (``jax.checkpoint`` around one layer of the stack), by name -> the
#: checkpoint policy, or ``None`` for no checkpoint.  ``"full"`` saves nothing inside a layer (the backward pass
#: keeps only each layer's input and recomputes the rest); ``"dots"`` saves the outputs of the matmuls without
#: batch dimensions (the q/k/v/o and MLP projections) and recomputes the rest, attention scores included (their
#: einsums carry batch dimensions, so a ``[heads, T, T]`` score tensor is never kept).  The one place a name
#: turns into a policy.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def resolve_layers(layers: str = "auto") -> str:
    """The layer loop to run: ``"unrolled"`` / ``"scan"`` as given; ``"auto"`` -> the ``JAXDLM_LAYERS``
    environment variable when set, else ``"scan"`` on a CPU backend and ``"unrolled"`` elsewhere."""
    if layers == "auto":
        layers = os.environ.get("JAXDLM_LAYERS", "").strip().lower() or (
            "scan" if jax.default_backend() == "cpu" else "unrolled")
        if layers not in LAYER_LOOPS:
            raise ValueError(f"JAXDLM_LAYERS={layers!r} is not a layer loop; expected one of {LAYER_LOOPS}")
    if layers not in LAYER_LOOPS:
        raise ValueError(f"layers={layers!r} is not a layer loop; expected 'auto' or one of {LAYER_LOOPS}")
    return layers


def check_remat(remat: str) -> str:
    """``remat`` if it names a :data:`REMAT_POLICIES` entry, else ``ValueError`` naming the choices."""
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat={remat!r} is not a rematerialisation policy; expected one of {tuple(REMAT_POLICIES)}")
    return remat


def _param(value, axes: tuple[str, ...]) -> nnx.Param:
    """A parameter with its logical axes, one name per dimension (``out_sharding`` metadata).

    :mod:`jaxdlm.sharding` maps the names to mesh axes with its own rules, so Flax's eager sharding (which
    would place the value at creation and needs a mesh) is off.
    """
    if len(axes) != np.ndim(value):
        raise ValueError(f"logical axes {axes} do not match a parameter of shape {np.shape(value)}")
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def _normal(rngs: nnx.Rngs, shape, dtype, axes: tuple[str, ...], std=_INIT_STD) -> nnx.Param:
    return _param((jax.random.normal(rngs.params(), shape, jnp.float32) * std).astype(dtype), axes)


def _linear(module: nnx.Module, name: str, rngs: nnx.Rngs, shape, dtype, axes: tuple[str, ...],
            quant: Quantization | None, adapter: AdapterConfig | None = None) -> None:
    """Sets ``module.<name>``: a float weight ``[in, out]`` drawn from N(0, 0.02^2), or with ``quant`` its
    quantized form (zeros of the storage dtype) and ``module.<name>_scale`` ``[G, out]`` (ones; a structure to
    restore into: :func:`quantize_model` fills both from a float model).  With an ``adapter`` that targets
    ``name``: also ``module.<name>_lora_a [in, r]`` and ``<name>_lora_b [r, out]`` in ``dtype`` (zeros, drawing no
    random numbers: :func:`add_adapter` fills them)."""
    if quant is None:
        setattr(module, name, _normal(rngs, shape, dtype, axes))
    else:
        setattr(module, name, _param(jnp.zeros(shape, quant.storage_dtype), axes))
        setattr(module, name + quant_lib.SCALE_SUFFIX, _param(jnp.ones(quant.scale_shape(shape), dtype),
                                                              quant.scale_axes(axes)))
    if adapter is not None and name in adapter.targets:
        (k, n), r = shape, adapter.rank
        setattr(module, name + adapter_lib.A_SUFFIX, _param(jnp.zeros((k, r), dtype), (axes[0], "lora")))
        setattr(module, name + adapter_lib.B_SUFFIX, _param(jnp.zeros((r, n), dtype), ("lora", axes[1])))


def _apply(module: nnx.Module, name: str, x, out_dtype=None):
    """``x @ module.<name>`` through :func:`jaxdlm.quant.matmul` (with ``module.<name>_scale`` when quantized), plus
    the adapter's ``scale * (x @ A) @ B`` when ``name`` is one of its targets: the one place a linear layer is
    applied."""
    scale = getattr(module, name + quant_lib.SCALE_SUFFIX, None)
    y = quant_lib.matmul(x, getattr(module, name)[...], None if scale is None else scale[...], out_dtype=out_dtype)
    a = getattr(module, name + adapter_lib.A_SUFFIX, None)
    if a is None:
        return y
    b = getattr(module, name + adapter_lib.B_SUFFIX)
    return y + adapter_lib.delta(x, a[...], b[...], module.adapter.scale).astype(y.dtype)


class RMSNorm(nnx.Module):
    """RMSNorm with the variance in float32; ``weight * normalized.astype(x.dtype)``.

    ``axis``: the logical axis of the weight (``"norm"`` for the model dimension, ``"head_dim"`` for q/k norms).
    """

    def __init__(self, dim: int, eps: float, dtype, axis: str = "norm"):
        self.weight = _param(jnp.ones((dim,), dtype), (axis,))
        self.eps = eps

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        var = jnp.mean(xf * xf, axis=-1, keepdims=True)
        y = (xf * jax.lax.rsqrt(var + self.eps)).astype(x.dtype)
        return self.weight[...] * y


class Block(nnx.Module):
    """One decoder layer: pre-norm attention and a SwiGLU MLP, both residual.

    :class:`Transformer` creates ``num_layers`` of them at once (``nnx.vmap``), which prepends the ``layers``
    axis to every shape and logical-axes tuple.  With ``quant`` every projection is stored quantized with its
    scale beside it (:mod:`jaxdlm.quant`); with ``adapter`` its targets carry low-rank factors
    (:mod:`jaxdlm.adapter`).
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, quant: Quantization | None = None,
                 adapter: AdapterConfig | None = None):
        c = config
        self.adapter = adapter
        h, f, kvf, i = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size
        self.attn_norm = RMSNorm(h, c.rms_norm_eps, dtype)
        _linear(self, "q_proj", rngs, (h, f), dtype, ("embed", "heads"), quant, adapter)
        _linear(self, "k_proj", rngs, (h, kvf), dtype, ("embed", "kv_heads"), quant, adapter)
        _linear(self, "v_proj", rngs, (h, kvf), dtype, ("embed", "kv_heads"), quant, adapter)
        _linear(self, "o_proj", rngs, (f, h), dtype, ("heads", "embed"), quant, adapter)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, dtype, axis="head_dim")
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, dtype, axis="head_dim")
        self.mlp_norm = RMSNorm(h, c.rms_norm_eps, dtype)
        _linear(self, "gate_proj", rngs, (h, i), dtype, ("embed", "mlp"), quant, adapter)
        _linear(self, "up_proj", rngs, (h, i), dtype, ("embed", "mlp"), quant, adapter)
        _linear(self, "down_proj", rngs, (i, h), dtype, ("mlp", "embed"), quant, adapter)
        self.config = config

    def qkv(self, x_BxTxH, cos, sin, qscale):
        """Projections with q/k norm, RoPE and the query scale: q ``[B,T,N,D]``, k/v ``[B,T,K,D]``."""
        c = self.config
        b, t, _ = x_BxTxH.shape
        a_BxTxH = self.attn_norm(x_BxTxH)
        q_BxTxNxD = _apply(self, "q_proj", a_BxTxH).reshape(b, t, c.num_heads, c.head_dim)
        k_BxTxKxD = _apply(self, "k_proj", a_BxTxH).reshape(b, t, c.num_kv_heads, c.head_dim)
        v_BxTxKxD = _apply(self, "v_proj", a_BxTxH).reshape(b, t, c.num_kv_heads, c.head_dim)
        if c.qk_norm:
            q_BxTxNxD, k_BxTxKxD = self.q_norm(q_BxTxNxD), self.k_norm(k_BxTxKxD)
        q_BxTxNxD = rope_lib.apply_rope(q_BxTxNxD, cos, sin)
        k_BxTxKxD = rope_lib.apply_rope(k_BxTxKxD, cos, sin)
        if qscale is not None:
            q_BxTxNxD = q_BxTxNxD * qscale[:, :, None, None].astype(q_BxTxNxD.dtype)
        return q_BxTxNxD, k_BxTxKxD, v_BxTxKxD

    def finish(self, x_BxTxH, attn_BxTxNxD, lora: OProjLoRA | None = None):
        """Output projection (+ the LoRA delta, ``lora`` sliced to this layer) and the MLP, both added to the
        residual ``x``: ``[B, T, H]``."""
        b, t = x_BxTxH.shape[:2]
        o_BxTxF = attn_BxTxNxD.reshape(b, t, -1)
        y_BxTxH = _apply(self, "o_proj", o_BxTxF)
        if lora is not None:
            y_BxTxH = y_BxTxH + lora.delta(o_BxTxF).astype(y_BxTxH.dtype)
        x_BxTxH = x_BxTxH + y_BxTxH
        m_BxTxH = self.mlp_norm(x_BxTxH)
        gate_BxTxI = jax.nn.silu(_apply(self, "gate_proj", m_BxTxH))
        return x_BxTxH + _apply(self, "down_proj", gate_BxTxI * _apply(self, "up_proj", m_BxTxH))


class Transformer(nnx.Module):
    """Embedding, ``num_layers`` stacked :class:`Block` s, final norm and output head.

    ``quant`` (a :class:`~jaxdlm.quant.Quantization`, static): the linear weights (and with ``quant.head`` the
    head) are stored quantized; ``dtype`` is then the compute dtype of everything else (embedding, norms, scales).
    ``adapter`` (a :class:`~jaxdlm.adapter.AdapterConfig`, static): its target layers carry adapter factors.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, quant: Quantization | None = None,
                 adapter: AdapterConfig | None = None):
        c = config
        if quant is not None:
            quant.check(config)
        self.config = config
        self.quant = quant
        self.adapter = adapter
        self.embed = _normal(rngs, (c.vocab_size, c.hidden_size), dtype, ("vocab", "embed"))
        keys = jax.random.split(rngs.params(), c.num_layers)

        @nnx.vmap(transform_metadata={nnx.PARTITION_NAME: "layers"})  # "layers" leads every block's axes
        def stacked_blocks(key):
            return Block(c, rngs=nnx.Rngs(params=key), dtype=dtype, quant=quant, adapter=adapter)

        self.layers = stacked_blocks(keys)
        self.final_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype)
        if not c.tie_word_embeddings:
            _linear(self, "head", rngs, (c.hidden_size, c.vocab_size), dtype, ("embed", "vocab"),
                    quant if quant is not None and quant.head else None)

    def head_weight(self):
        """Output projection ``[H, V]`` (the transposed embedding when tied; a quantized head dequantized into the
        compute dtype: a full copy, for the training losses; the forward's :meth:`project` never makes one)."""
        if self.config.tie_word_embeddings:
            return self.embed[...].T
        scale = getattr(self, "head" + quant_lib.SCALE_SUFFIX, None)
        return self.head[...] if scale is None else quant_lib.dequantize(self.head[...], scale[...])

    def project(self, hidden):
        """Output-head logits ``float32 [..., V]`` of final normed hidden states ``[..., H]``."""
        if self.config.tie_word_embeddings:
            return quant_lib.matmul(hidden, self.embed[...].T, out_dtype=jnp.float32)
        return _apply(self, "head", hidden, out_dtype=jnp.float32)

    def __call__(self, tokens, positions, q_info: TokenInfo, k_info: TokenInfo, *, cache: KVCache | None = None,
                 lora: OProjLoRA | None = None, impl: str | None = None, return_hidden: bool = False,
                 layers: str = "auto", remat: str = "none"):
        """General forward.

        Args:
          tokens: ``int32 [B, T]``.
          positions: ``int32 [B, T]`` RoPE positions.
          q_info: mask metadata of the ``T`` queries.
          k_info: mask metadata of the keys: the ``T`` new tokens when ``cache`` is None, else the
            ``S`` cache slots (the new tokens included, at the slots where they are written).
          cache: optional KV cache; all ``T`` new tokens are written at slots ``cache.length + i``
            (in place; slots past ``S`` are dropped, so size the cache for the widest pass) and
            ``k_info`` describes what every slot then holds.  The cache length is NOT changed here.
          lora: optional o_proj LoRA (draft passes).
          return_hidden: return the final normed hidden states ``[B, T, H]`` instead of logits.
          layers: ``"unrolled"`` runs the layers as straight-line code with static indices into the stacked
            parameters and the stacked cache; ``"scan"`` runs them in a ``lax.scan`` (~L times smaller
            program); ``"auto"`` (default) picks by backend (:func:`resolve_layers`).  Both give the same
            result; see the module docstring for why each backend prefers its loop.
          remat: ``"none"`` (default), ``"full"`` or ``"dots"``: each layer under ``jax.checkpoint`` with the
            :data:`REMAT_POLICIES` policy (training: less memory for the backward pass, same gradients).

        Returns ``(logits float32 [B, T, V], new_cache or None)``.
        """
        layers = resolve_layers(layers)
        check_remat(remat)
        c = self.config
        cos, sin = rope_lib.cos_sin(c.rope, c.head_dim, positions)
        qscale = rope_lib.query_scale(c.rope, positions)
        graphdef, stacked = nnx.split(self.layers)

        def layer_step(i, per_layer, x_BxTxH, kv):
            """One decoder layer; ``i`` is a Python int (unrolled) or a traced index (scan)."""
            layer_params, lora_ab = per_layer
            layer = nnx.merge(graphdef, layer_params)
            q_BxTxNxD, k_BxTxKxD, v_BxTxKxD = layer.qkv(x_BxTxH, cos, sin, qscale)
            attn_BxTxNxD, kv = self._attend(i, q_BxTxNxD, k_BxTxKxD, v_BxTxKxD, q_info, k_info, kv,
                                            None if cache is None else cache.length, impl)
            lora_l = None if lora_ab is None else dataclasses.replace(lora, a=lora_ab[0], b=lora_ab[1])
            return layer.finish(x_BxTxH, attn_BxTxNxD, lora_l), kv

        x_BxTxH = constrain(jnp.take(self.embed[...], tokens, axis=0), ("batch", "seq", None))
        lora_ab = None if lora is None else (lora.a, lora.b)  # stacked like the params; the scale is shared
        kv = None if cache is None else (cache.k, cache.v)
        x_BxTxH, kv = _layer_loop(layers, layer_step, c.num_layers, (stacked, lora_ab), x_BxTxH, kv,
                                  remat=remat)
        new_cache = None if cache is None else dataclasses.replace(cache, k=kv[0], v=kv[1])
        x_BxTxH = self.final_norm(x_BxTxH)
        if return_hidden:
            return x_BxTxH, new_cache
        return constrain(self.project(x_BxTxH), ("batch", "seq", "vocab")), new_cache

    def _attend(self, i, q_BxTxNxD, k_BxTxKxD, v_BxTxKxD, q_info, k_info, kv, cache_length, impl):
        """Attention of layer ``i``: over the new tokens' k/v when ``kv`` is None, else over the stacked cache
        ``kv = (k, v)`` after writing the new k/v at ``cache_length``.  Returns ``(out [B,T,N,D], kv)``."""
        c = self.config
        scale = c.head_dim ** -0.5
        if kv is None:
            out = attention(q_BxTxNxD, k_BxTxKxD, v_BxTxKxD, q_info, k_info, scale=scale,
                            sliding_window=c.sliding_window, impl=impl)
            return out, None
        k_cache = constrain(write(kv[0], i, k_BxTxKxD, cache_length), CACHE_AXES)
        v_cache = constrain(write(kv[1], i, v_BxTxKxD, cache_length), CACHE_AXES)
        out = attention(q_BxTxNxD, k_cache, v_cache, q_info, k_info, scale=scale, sliding_window=c.sliding_window,
                        impl=impl, layer=i)
        return out, (k_cache, v_cache)


def _layer_loop(layers: str, layer_step, num_layers: int, per_layer, x_BxTxH, kv, *, remat: str = "none"):
    """``layer_step(i, per_layer[i], x, kv) -> (x, kv)`` for ``i = 0 .. num_layers - 1``; ``per_layer`` is a pytree
    of arrays stacked on axis 0.  ``"unrolled"``: static indices (a static slice, no copy); ``"scan"``: a
    ``lax.scan`` with a traced index.  ``remat``: a :data:`REMAT_POLICIES` name; other than ``"none"``, each step
    runs under ``jax.checkpoint`` with that policy."""
    if remat != "none":  # (a scan already keeps XLA from merging the recomputation away: prevent_cse off there)
        layer_step = jax.checkpoint(layer_step, policy=REMAT_POLICIES[remat], prevent_cse=layers == "unrolled",
                                    static_argnums=(0,) if layers == "unrolled" else ())
    if layers == "unrolled":
        for i in range(num_layers):
            x_BxTxH, kv = layer_step(i, jax.tree.map(lambda a: a[i], per_layer), x_BxTxH, kv)
        return x_BxTxH, kv

    def body(carry, xs):
        layer_xs, i = xs
        return layer_step(i, layer_xs, *carry), None

    (x_BxTxH, kv), _ = jax.lax.scan(body, (x_BxTxH, kv), (per_layer, jnp.arange(num_layers)))
    return x_BxTxH, kv


class ParamInfo(NamedTuple):
    """Shape and logical axes of one parameter (see :func:`param_layout`)."""

    shape: tuple[int, ...]
    axes: tuple[str, ...]


@functools.lru_cache(maxsize=32)
def _layout(config: ModelConfig, quant: Quantization | None,
            adapter: AdapterConfig | None) -> tuple[tuple[tuple[str, ...], ParamInfo], ...]:
    out = []
    for path, var in nnx.to_flat_state(Model.abstract(config, quantize=quant, adapter=adapter).params):
        path = tuple(str(k) for k in path)
        axes = var.get_metadata().get("out_sharding")
        if axes is None or len(axes) != len(var.shape):
            raise ValueError(f"parameter {'/'.join(path)} of shape {var.shape} declares logical axes {axes}; "
                             "create it with one axis name per dimension (model._param)")
        out.append((path, ParamInfo(tuple(var.shape), tuple(axes))))
    return tuple(out)


def param_layout(config: ModelConfig, quant: Quantization | None = None,
                 adapter: AdapterConfig | None = None) -> dict[tuple[str, ...], ParamInfo]:
    """Every parameter of a model of ``config`` (quantized by ``quant``: weights in place, ``*_scale`` beside
    them; with an ``adapter``: ``*_lora_a`` / ``*_lora_b`` beside its targets): its path in the pure-dict
    parameter tree (e.g. ``("layers", "q_proj")``) -> :class:`ParamInfo` (shape, logical axes), read from an
    abstract model (no memory; cached per config).  The single source of the layout for sharding and checkpoint
    name maps."""
    return dict(_layout(config, quant, adapter))


# ---------------------------------------------------------------------------------------------------
# pure forward functions


def forward(model: Transformer, tokens, *, kind: str = "causal", cache: KVCache | None = None,
            num_valid=None, lora: OProjLoRA | None = None, impl: str | None = None, return_hidden: bool = False,
            layers: str = "auto", remat: str = "none"):
    """Forward pass of one kind (see the module docstring).

    Without a cache, ``tokens [B, T]`` is a whole sequence at positions ``0..T-1``; for ``two_stream``
    ``T = 2L`` is ``[x_t | x_0]`` and both halves sit at positions ``0..L-1`` with blocks of
    ``config.block_size``.  With a cache, the ``T`` tokens sit at positions ``cache.length + i``; a
    ``causal`` pass advances each row's length by ``num_valid`` (int or ``[B]``, default ``T``: the rest
    is right padding), a ``denoise`` or ``quadratic`` pass keeps it (``quadratic``: ``T = N + N*N`` tokens in
    quadratic self-speculation's layout, :func:`jaxdlm.attention.masks.quadratic_info`).  The cache needs ``T`` free slots after every row's
    length (a denoise pass writes its block there as scratch).

    ``layers``: ``"auto"`` (default: by backend), ``"unrolled"`` or ``"scan"`` (training); ``remat``: ``"none"``,
    ``"full"`` or ``"dots"`` (training); see :meth:`Transformer.__call__`.

    Returns ``(logits float32 [B, T, V], cache or None)``.
    """
    b, t = tokens.shape
    c = model.config
    if cache is None:
        if kind in ("two_stream", "two_stream_bidirectional"):
            if t % 2:
                raise ValueError(f"{kind} needs an even number of tokens [x_t | x_0], got T={t}")
            q_info = masks.two_stream_info(b, t // 2, c.block_size, bidirectional=kind == "two_stream_bidirectional")
        elif kind in ("causal", "bidirectional"):
            pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            q_info = masks.sequence_info(pos, kind)
        else:
            raise ValueError(f"kind={kind!r} is not supported without a cache; expected one of {UNCACHED_KINDS}")
        return model(tokens, q_info.pos, q_info, q_info, lora=lora, impl=impl, return_hidden=return_hidden,
                     layers=layers, remat=remat)
    if kind not in CACHED_KINDS:
        raise ValueError(f"kind={kind!r} is not supported with a cache; expected one of {CACHED_KINDS}")
    if kind == "quadratic":
        q_info, k_info = masks.quadratic_info(cache.length, masks.quadratic_block(t), cache.max_len)
    else:
        q_info = masks.cache_query_info(cache.length, t, kind)
        k_info = masks.cache_key_info(cache.length, cache.max_len, t, kind)
    out, new_cache = model(tokens, q_info.pos, q_info, k_info, cache=cache, lora=lora, impl=impl,
                           return_hidden=return_hidden, layers=layers, remat=remat)
    if kind == "causal":
        new_cache = new_cache.advance(t if num_valid is None else num_valid)
    else:
        new_cache = new_cache.with_length(cache.length)
    return out, new_cache


# ---------------------------------------------------------------------------------------------------
# the user-facing model object


@functools.partial(jax.jit, static_argnames=("graphdef", "kind", "impl"))
def _logits_jit(graphdef, params, tokens, kind, impl):
    model = nnx.merge(graphdef, params)
    return forward(model, tokens, kind=kind, impl=impl)[0]


def _check_tokens(tokens, vocab_size: int, name: str = "tokens"):
    try:
        arr = np.asarray(tokens)
    except (TypeError, jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return  # traced: no eager check possible
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{name} must be integer token ids, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(f"{name} must have shape [batch, length], got shape {arr.shape}")
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        bad = int(arr.min()) if arr.min() < 0 else int(arr.max())
        raise ValueError(f"{name} contains id {bad}, outside the vocabulary [0, {vocab_size})")


class Model:
    """A model ready to use: config, parameters (an ``nnx.State``), optional draft LoRA and tokenizer.

    ``graphdef`` and ``params`` are the two halves of ``nnx.split(transformer)``; pass ``params`` into
    your own jitted functions and ``nnx.merge(model.graphdef, params)`` inside them.
    """

    def __init__(self, config: ModelConfig, graphdef, params, *, lora: OProjLoRA | None = None, tokenizer: Any = None,
                 mesh=None):
        self.config = config
        self.graphdef = graphdef
        self.params = params
        self.lora = lora
        self.tokenizer = tokenizer
        self.mesh = mesh  # set by jaxdlm.sharding.shard_model: jitted calls run under jax.set_mesh(mesh)

    def mesh_context(self):
        """``jax.set_mesh(self.mesh)`` for sharded models, else a null context."""
        return contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)

    @classmethod
    def init(cls, config: ModelConfig, *, seed: int = 0, dtype=jnp.float32, quantize=None) -> "Model":
        """A model with random parameters (normal, std 0.02; norms at one).

        ``quantize`` (``"int8"``, ``"int4"``, ``"fp8"`` or a :class:`~jaxdlm.quant.Quantization`): the float model
        of the same seed, quantized (:func:`quantize_model`); ``dtype`` is the compute dtype.
        """
        quant = quant_lib.as_quantization(quantize)
        if quant is not None:
            quant.check(config)  # before the float model is drawn
        transformer = Transformer(config, rngs=nnx.Rngs(params=seed), dtype=jnp.dtype(dtype))
        graphdef, params = nnx.split(transformer)
        model = cls(config, graphdef, params)
        return model if quant is None else quantize_model(model, quant)

    @classmethod
    def abstract(cls, config: ModelConfig, *, dtype=jnp.float32, quantize=None,
                 adapter: AdapterConfig | None = None) -> "Model":
        """Shapes and dtypes only (``jax.ShapeDtypeStruct`` leaves), no memory: a restore target (``quantize``: the
        quantized tree, as in :meth:`init`; ``adapter``: with adapter factors, :mod:`jaxdlm.adapter`)."""
        quant = quant_lib.as_quantization(quantize)
        transformer = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(params=0), dtype=jnp.dtype(dtype),
                                                         quant=quant, adapter=adapter))
        graphdef, params = nnx.split(transformer)
        return cls(config, graphdef, params)

    @property
    def module(self) -> Transformer:
        """The merged NNX module (for use inside jitted code).  It shares its variables with
        ``params``: assigning to them changes this model."""
        return nnx.merge(self.graphdef, self.params)

    @property
    def dtype(self):
        """The compute dtype: the embedding's (quantized weights keep their storage dtype)."""
        return self.params["embed"][...].dtype

    @property
    def quant(self) -> Quantization | None:
        """The weight quantization (static, from the module graph), or ``None`` for float weights."""
        return nnx.merge(self.graphdef, self.params).quant

    @property
    def adapter_config(self) -> AdapterConfig | None:
        """The adapter's shape (static, from the module graph; :mod:`jaxdlm.adapter`), or ``None`` without one."""
        return nnx.merge(self.graphdef, self.params).adapter

    def layout(self) -> dict[tuple[str, ...], "ParamInfo"]:
        """Every parameter's path -> :class:`ParamInfo` (shape, logical axes): :func:`param_layout` of this model."""
        return param_layout(self.config, self.quant, self.adapter_config)

    def replace(self, *, params=None, lora=None, mesh=None) -> "Model":
        """A copy with ``params`` / ``lora`` / ``mesh`` replaced where given (same graph, config, tokenizer)."""
        return Model(self.config, self.graphdef, self.params if params is None else params,
                     lora=self.lora if lora is None else lora, tokenizer=self.tokenizer,
                     mesh=self.mesh if mesh is None else mesh)

    def astype(self, dtype) -> "Model":
        """A copy with every floating parameter (and the LoRA) cast to ``dtype``; quantized weights keep their
        storage dtype (their scales are cast)."""
        dtype = jnp.dtype(dtype)
        quant = self.quant
        keep = quant.weight_paths() if quant is not None else ()

        def cast(path, x):
            key = tuple(str(k.key) for k in path)
            return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) and key not in keep else x

        target = Model.abstract(self.config, dtype=dtype, quantize=quant, adapter=self.adapter_config)
        nnx.replace_by_pure_dict(target.params, jax.tree_util.tree_map_with_path(cast, nnx.to_pure_dict(self.params)))
        lora = None if self.lora is None else jax.tree.map(lambda x: cast((), x), self.lora)
        return Model(self.config, target.graphdef, target.params, lora=lora, tokenizer=self.tokenizer, mesh=self.mesh)

    def logits(self, tokens, kind: str = "causal", *, params=None, impl: str | None = None) -> jax.Array:
        """Float32 logits ``[B, T, V]`` for whole sequences ``tokens [B, T]`` (no cache).

        ``kind``: ``"causal"`` (AR; logits at t predict token t+1), ``"bidirectional"``, or
        ``"two_stream"`` (``tokens = [x_t | x_0]``, ``T = 2L``; diffusion logits on the first half
        predict the token at the same position, AR logits on the second half the next token).
        ``params``: parameters to use instead of ``self.params`` (e.g. the traced ones of your own
        ``jax.grad`` / ``jax.jit``; call it inside your ``jax.set_mesh`` for a sharded model).
        """
        if kind not in UNCACHED_KINDS:
            raise ValueError(f"kind={kind!r} is not supported; expected one of {UNCACHED_KINDS}")
        _check_tokens(tokens, self.config.vocab_size)
        tokens = jnp.asarray(tokens, jnp.int32)
        if params is not None:
            return _logits_jit(self.graphdef, params, tokens, kind, impl)
        with self.mesh_context():
            return _logits_jit(self.graphdef, self.params, tokens, kind, impl)

    def __repr__(self):
        c = self.config
        quant = "" if self.quant is None else f", quantized={self.quant.describe()}"
        adapter = "" if self.adapter_config is None else f", adapter={self.adapter_config}"
        return (f"Model({c.model_type}, layers={c.num_layers}, hidden={c.hidden_size}, "
                f"params={c.num_params() / 1e6:.1f}M, dtype={self.dtype}{quant}{adapter}, "
                f"lora={self.lora is not None})")


def quantize_model(model, quantize):
    """A copy of a float :class:`Model` with its linear weights quantized (``quantize``: a scheme name or a
    :class:`~jaxdlm.quant.Quantization`); the LoRA and tokenizer are shared.  Each weight is fetched to the host,
    quantized there (:func:`jaxdlm.quant.quantize`, in the model's dtype) and put back on the default device; shard the result
    with :func:`jaxdlm.shard_model`."""
    quant = quant_lib.as_quantization(quantize)
    if quant is None:
        raise ValueError("quantize_model needs a scheme: 'int8', 'int4' or 'fp8'")
    if model.quant is not None:
        raise ValueError(f"the model is already quantized ({model.quant.describe()}); quantize its float original")
    target = Model.abstract(model.config, dtype=model.dtype, quantize=quant, adapter=model.adapter_config)
    pure = nnx.to_pure_dict(model.params)
    for path in quant.weight_paths():
        node = pure
        for key in path[:-1]:
            node = node[key]
        for leaf_path, value in quant_lib.quantized_leaves(path, node[path[-1]], quant, model.dtype):
            node[leaf_path[-1]] = jnp.asarray(value)
    nnx.replace_by_pure_dict(target.params, pure)
    return Model(model.config, target.graphdef, target.params, lora=model.lora, tokenizer=model.tokenizer)


def add_adapter(model, adapter: AdapterConfig, factors: adapter_lib.Adapter | None = None):
    """A copy of ``model`` (a :class:`~jaxdlm.model.Model` without an adapter; float or quantized) with an adapter
    of ``adapter``'s shape: ``factors`` cast to the compute dtype, or zeros (a structure to fill with
    :func:`jaxdlm.adapter.set_adapter`).  Its base parameters, draft LoRA and tokenizer are shared."""
    if model.adapter_config is not None:
        raise ValueError("the model already has an adapter; merge it (merge_adapter) or start from its base")
    target = Model.abstract(model.config, dtype=model.dtype, quantize=model.quant, adapter=adapter)
    pure = nnx.to_pure_dict(model.params)
    shapes = adapter.shapes(param_layout(model.config))
    for t, a_path, b_path in adapter_lib.leaf_paths(adapter):
        for i, path in enumerate((a_path, b_path)):
            value = jnp.zeros(shapes[t][i]) if factors is None else jnp.asarray((factors.a, factors.b)[i][t])
            pure["layers"][path[-1]] = value.astype(model.dtype)
    nnx.replace_by_pure_dict(target.params, pure)
    return Model(model.config, target.graphdef, target.params, lora=model.lora, tokenizer=model.tokenizer,
                 mesh=model.mesh)


def merge_adapter(model):
    """A copy of ``model`` without its adapter whose target weights are ``W + scale * A @ B`` (computed in float32,
    stored in the compute dtype).  A quantized base is dequantized first, every linear weight (and a quantized
    head): the result is a float model in the compute dtype (bfloat16 for a quantized base), which generates like
    the adapter model up to that dtype's rounding.  Draft LoRA and tokenizer are kept."""
    cfg = model.adapter_config
    if cfg is None:
        raise ValueError("the model has no adapter to merge")
    quant, dtype = model.quant, model.dtype
    pure = nnx.to_pure_dict(model.params)
    for path in (quant.weight_paths() if quant is not None else ()):
        node = pure if len(path) == 1 else pure[path[0]]
        scale = node.pop(quant_lib.scale_path(path)[-1])
        node[path[-1]] = quant_lib.dequantize(node[path[-1]], scale, jnp.float32)
    layers = pure["layers"]
    for t, a_path, b_path in adapter_lib.leaf_paths(cfg):
        a, b = layers.pop(a_path[-1]).astype(jnp.float32), layers.pop(b_path[-1]).astype(jnp.float32)
        w = jnp.asarray(layers[t]).astype(jnp.float32)
        layers[t] = w + cfg.scale * jnp.einsum("lir,lro->lio", a, b, precision=jax.lax.Precision.HIGHEST)
    for path in (quant.weight_paths() if quant is not None else ()) + tuple(("layers", t) for t in cfg.targets):
        node = pure if len(path) == 1 else pure[path[0]]
        node[path[-1]] = jnp.asarray(node[path[-1]]).astype(dtype)
    target = Model.abstract(model.config, dtype=dtype)
    nnx.replace_by_pure_dict(target.params, pure)
    return Model(model.config, target.graphdef, target.params, lora=model.lora, tokenizer=model.tokenizer,
                 mesh=model.mesh)
