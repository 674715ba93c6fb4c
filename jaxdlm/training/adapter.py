"""Adapter fine-tuning (LoRA; QLoRA-style with an int8 / int4 base): only the adapter trains, the base is frozen.

The frozen base is prepared once (:func:`prepare_base`: cast to float32 / bfloat16, or cast to bfloat16 and
quantized with :mod:`jaxdlm.quant`) and passed to every step as an input that is only read: no gradient is taken
with respect to it, it gets no optimizer state and it is never returned.  The train state is an ordinary
:class:`~jaxdlm.training.step.TrainState` whose ``params`` is an :class:`~jaxdlm.adapter.Adapter` (float32
master factors); each step writes the factors, cast to the base's compute dtype, into the merged module
(:func:`jaxdlm.adapter.set_adapter`) and runs the configured objective (:func:`~jaxdlm.training.losses.batch_loss`).

:func:`load_base` rebuilds a base from the record a run keeps with each checkpoint (``meta["base"]``), which is
how :func:`jaxdlm.training.load_trained` returns the tuned model.
"""

from __future__ import annotations

import os
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxdlm.adapter import set_adapter
from jaxdlm.model import check_remat
from jaxdlm.training.losses import LossConfig, batch_loss
from jaxdlm.training.step import _accumulate, apply_gradients

BASE_DTYPES = ("float32", "bfloat16", "int8", "int4")


def prepare_base(model, base_dtype: str):
    """The frozen base as the step reads it: ``"float32"`` / ``"bfloat16"``: every parameter cast to it;
    ``"int8"`` / ``"int4"``: cast to bfloat16 (the compute dtype), then the linear weights quantized
    (:func:`jaxdlm.model.quantize_model`).  A base that is already quantized must match ``base_dtype``."""
    from jaxdlm.model import quantize_model

    if base_dtype not in BASE_DTYPES:
        raise ValueError(f"base_dtype={base_dtype!r} is not supported; allowed: {list(BASE_DTYPES)}")
    if model.quant is not None:
        if model.quant.scheme != base_dtype:
            raise ValueError(f"the base is stored quantized ({model.quant.describe()}), not as {base_dtype}: set "
                             f"adapter.base_dtype = {model.quant.scheme!r} or start from its float original")
        return model
    if base_dtype in ("float32", "bfloat16"):
        return model.astype(base_dtype)
    return quantize_model(model.astype(jnp.bfloat16), base_dtype)


def abstract_base(config, adapter, base_dtype: str):
    """Shapes and dtypes only (a :meth:`~jaxdlm.model.Model.abstract` model, no memory) of the base the step reads:
    what :func:`prepare_base` makes of a float base of ``config`` in ``base_dtype``, with ``adapter`` (an
    :class:`~jaxdlm.adapter.AdapterConfig`) added (:func:`jaxdlm.model.add_adapter`): the memory plan's base."""
    from jaxdlm.model import Model

    if base_dtype not in BASE_DTYPES:
        raise ValueError(f"base_dtype={base_dtype!r} is not supported; allowed: {list(BASE_DTYPES)}")
    dtype = jnp.float32 if base_dtype == "float32" else jnp.bfloat16
    quantize = base_dtype if base_dtype in ("int8", "int4") else None
    return Model.abstract(config, dtype=dtype, quantize=quantize, adapter=adapter)


def load_base(record: dict, config):
    """The prepared base of an adapter run from its record ``{"init", "seed", "step", "dtype"}``: ``init`` is
    ``"random"`` (``Model.init(config, seed=seed)``), a training run folder (its params at ``step``) or a jaxdlm
    checkpoint folder (quantized while loading for an int8 / int4 base; one stored quantized must match
    ``dtype``); then :func:`prepare_base`."""
    import jaxdlm
    from jaxdlm.checkpoint import is_run_folder, read_config, read_metadata
    from jaxdlm.model import Model

    init, base_dtype = record["init"], record["dtype"]
    if init == "random":
        return prepare_base(Model.init(config, seed=record.get("seed", 0)), base_dtype)
    stored = read_config(init)
    if stored.num_params() != config.num_params() or stored.vocab_size != config.vocab_size:
        raise ValueError(f"model.init={init!r} has a different architecture than model.config")
    if is_run_folder(init):
        from jaxdlm.training.run import load_trained

        return prepare_base(load_trained(init, record.get("step")), base_dtype)
    if read_metadata(init).get("quantization") is not None:  # stored quantized: prepare_base checks the scheme
        return prepare_base(jaxdlm.load(init), base_dtype)
    if base_dtype in ("int8", "int4"):  # quantized while loading, one group of arrays at a time
        return prepare_base(jaxdlm.load(init, quantize=base_dtype), base_dtype)
    return prepare_base(jaxdlm.load(init, dtype=base_dtype), base_dtype)


def base_record(init: str, seed: int, base_dtype: str) -> dict:
    """The record :func:`load_base` reads: ``init`` (``"random"`` or an absolute folder), the init ``seed``, the
    ``step`` of a run-folder base (its latest checkpoint; else ``None``) and ``dtype``."""
    from jaxdlm.checkpoint import is_run_folder

    step = None
    if init != "random" and is_run_folder(init):
        from jaxdlm.training.checkpointing import Checkpointer

        ck = Checkpointer(os.path.join(init, "checkpoints"))
        step = ck.latest_step()
        ck.close()
    return {"init": init, "seed": seed, "step": step, "dtype": base_dtype}


def make_adapter_loss_fn(graphdef, loss_cfg: LossConfig, remat: str = "none") -> Callable:
    """``loss_fn(factors, base_params, batch, key) -> (loss, metrics)`` for one micro-batch: the base (``graphdef``
    of a model with an adapter, and its params) with ``factors`` (an :class:`~jaxdlm.adapter.Adapter`) written in.
    ``remat``: per-layer rematerialisation, as in :func:`~jaxdlm.training.step.make_loss_fn`."""
    check_remat(remat)

    def loss_fn(factors, base_params, batch, key):
        module = nnx.merge(graphdef, base_params, copy=True)  # variables of this trace, so the factors can go in
        set_adapter(module, factors)
        return batch_loss(module, batch, key, loss_cfg, remat)

    return loss_fn


def make_adapter_step(graphdef, tx: optax.GradientTransformation, loss_cfg: LossConfig, *,
                      schedule: optax.Schedule | None = None, donate: bool = True, out_shardings=None,
                      remat: str = "none") -> Callable:
    """A jitted ``step(state, base_params, batch [A, B, L]) -> (state, metrics)``: the adapter's
    :func:`~jaxdlm.training.step.make_train_step` (the same micro-batch accumulation, noise keys, update and
    metrics).  ``state.params`` is the float32 :class:`~jaxdlm.adapter.Adapter`; ``base_params`` is read only;
    ``remat``: ``[model] remat``."""
    loss_fn = make_adapter_loss_fn(graphdef, loss_cfg, remat)

    def step(state, base_params, batch):
        key = jax.random.fold_in(state.rng, state.step)
        grads, metrics = _accumulate(lambda f, mb, k: loss_fn(f, base_params, mb, k), state.params, batch, key)
        return apply_gradients(state, grads, metrics, tx, schedule)

    pinned = {} if out_shardings is None else {"out_shardings": out_shardings}
    return jax.jit(step, donate_argnums=(0,) if donate else (), **pinned)


def make_adapter_eval_step(graphdef, loss_cfg: LossConfig) -> Callable:
    """A jitted ``eval(factors, base_params, batch [B, L], key) -> metrics`` (no gradient)."""
    loss_fn = make_adapter_loss_fn(graphdef, loss_cfg)
    return jax.jit(lambda factors, base_params, batch, key: loss_fn(factors, base_params, batch, key)[1])
