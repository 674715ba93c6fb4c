"""Resumable training checkpoints with Orbax's ``CheckpointManager``.

A checkpoint at step ``s`` holds the whole train state (float32 params, optimizer state, step counter,
RNG key data) plus a JSON record (data position = samples consumed, the run config, the model config).
Restoring it and continuing gives exactly the params of an uninterrupted run: the train step is a pure
function of (state, batch) and the batch of step ``s`` is a pure function of (data seed, s).

Orbax writes each step into a temporary folder and renames it when complete, so an interrupted save
never leaves a half-written checkpoint that :meth:`Checkpointer.latest_step` would pick up.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """``CheckpointManager`` wrapper for train states (see :mod:`jaxdlm.training.step`)."""

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3):
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, state: dict, meta: dict | None = None, *, wait: bool = True) -> None:
        """Saves ``state`` (a train-state pytree) and the JSON-serialisable ``meta`` as step ``step``."""
        self.manager.save(int(step), args=ocp.args.Composite(state=ocp.args.PyTreeSave(state),
                                                              meta=ocp.args.JsonSave(meta or {})), force=True)
        if wait:
            self.manager.wait_until_finished()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def restore(self, target: dict, step: int | None = None, *, partial: bool = False) -> tuple[dict, dict]:
        """Restores ``(state, meta)`` of ``step`` (default: the latest) into the structure of ``target``.

        ``target`` is a train state or its ``jax.eval_shape`` (``ShapeDtypeStruct`` leaves).  Leaves with a
        sharding are restored straight into it (each process reads only its shards, whatever mesh or process
        count wrote the checkpoint).  With ``partial=True`` ``target`` may name only some top-level entries
        (e.g. ``{"params": ...}``).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise ValueError(f"no checkpoint found in {self.directory}")
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=_sharding(x)), target)
        restore = ocp.args.PyTreeRestore(item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                                         partial_restore=partial)
        out = self.manager.restore(int(step), args=ocp.args.Composite(state=restore, meta=ocp.args.JsonRestore()))
        return out.state, dict(out.meta or {})

    def restore_meta(self, step: int | None = None) -> dict:
        """Only the JSON record of ``step`` (default: the latest)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise ValueError(f"no checkpoint found in {self.directory}")
        out = self.manager.restore(int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out.meta or {})

    def reached_preemption(self, step: int) -> bool:
        """Whether every process has agreed to stop after ``step`` (Orbax / JAX's preemption sync point: a
        SIGTERM to any process of a multi-process run); call it after every step on every process."""
        return bool(self.manager.reached_preemption(int(step)))

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _sharding(x):
    """The ``jax.sharding.NamedSharding`` a restored leaf goes to (``None``: Orbax's default placement)."""
    sharding = getattr(x, "sharding", None)
    return sharding if isinstance(sharding, jax.sharding.NamedSharding) else None
