"""AR-to-block-diffusion training (docs/training.md): noise schedules, the joint loss, an optax train
step, data packing / SFT format, resumable Orbax checkpoints, draft-LoRA training and a config-driven
runner (``jaxdlm train CONFIG``).

Submodules: :mod:`~jaxdlm.training.masking`, :mod:`~jaxdlm.training.losses`, :mod:`~jaxdlm.training.step`,
:mod:`~jaxdlm.training.data`, :mod:`~jaxdlm.training.checkpointing`, :mod:`~jaxdlm.training.lora`,
:mod:`~jaxdlm.training.config`, :mod:`~jaxdlm.training.run`, :mod:`~jaxdlm.training.plan` (the memory plan of
``--check``), :mod:`~jaxdlm.training.speed` (model FLOPs, tokens/s, MFU).  The names below are imported lazily so
that ``import jaxdlm.training.run`` (the CLI) stays cheap.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Noised": "masking", "uniform_mask": "masking", "position_mask": "masking", "sft_mask": "masking",
    "apply_noise": "masking",
    "LossConfig": "losses", "joint_loss": "losses", "ar_loss": "losses", "batch_loss": "losses",
    "token_ce": "losses",
    "OptimConfig": "step", "make_optimizer": "step", "wsd_schedule": "step", "init_state": "step", "TrainState": "step",
    "make_train_step": "step", "make_eval_step": "step",
    "Dataset": "data", "pack": "data", "pack_stream": "data", "chat_tokens": "data", "sft_batch": "data",
    "Checkpointer": "checkpointing",
    "draft_loss": "lora", "make_lora_step": "lora", "init_lora_state": "lora", "LoraTrainState": "lora",
    "TrainConfig": "config", "load_config": "config", "parse_config": "config",
    "train": "run", "load_trained": "run",
    "memory_plan": "plan", "train_flops_per_token": "speed", "adapter_flops_per_token": "speed",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"jaxdlm.training.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'jaxdlm.training' has no attribute {name!r}")
