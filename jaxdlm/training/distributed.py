"""Many processes for ``jaxdlm train``: starting ``jax.distributed``, each process's rows of a global batch, and
stopping cleanly on SIGTERM / SIGINT (docs/training.md, section 7).

Everything here is JAX's own multi-controller runtime: ``jax.distributed`` (coordination service, heartbeats,
the preemption sync point), ``jax.make_array_from_process_local_data`` and Orbax; nothing is a home-made
launcher or collective.
"""

from __future__ import annotations

import os
import signal
import threading

import jax
import numpy as np

from jaxdlm import compat

#: exit status of ``jaxdlm train`` after a SIGTERM / SIGINT stop with a checkpoint: re-run the command to resume
#: (BSD's EX_TEMPFAIL, "try again later")
EXIT_PREEMPTED = 75

#: seconds without heartbeats after which the coordination service declares a process lost and every other
#: process aborts (JAX's own default is 100)
DEFAULT_HEARTBEAT_TIMEOUT_S = 30


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               *, heartbeat_timeout_s: int = DEFAULT_HEARTBEAT_TIMEOUT_S) -> bool:
    """Starts ``jax.distributed`` for the three flags together, or for a cluster JAX detects by itself (SLURM,
    Open MPI, ...) that runs more than one process; returns whether it did.  A plain single-process run starts
    nothing.  On CPU the collectives go through gloo.  Call before anything else touches jax's devices."""
    flags = {"--coordinator": coordinator, "--num-processes": num_processes, "--process-id": process_id}
    given = [k for k, v in flags.items() if v is not None]
    if given and len(given) < 3:
        missing = [k for k in flags if k not in given]
        raise ValueError(f"{', '.join(given)} needs {' and '.join(missing)} too (all three start a multi-process "
                         "run; none of them: a single process, or what JAX detects of a SLURM / Open MPI cluster)")
    if not given:
        cluster = compat.detected_cluster()
        if cluster is None or cluster[1] < 2:
            return False
    elif not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id={process_id} must be in [0, --num-processes={num_processes})")
    if heartbeat_timeout_s < 1:
        raise ValueError(f"--heartbeat-timeout={heartbeat_timeout_s} must be >= 1 second")
    compat.use_gloo_cpu_collectives()
    jax.distributed.initialize(coordinator, num_processes, process_id, heartbeat_timeout_seconds=heartbeat_timeout_s)
    return True


def is_main() -> bool:
    """Whether this is process 0, the one that writes the run folder's logs and configs and prints progress."""
    return jax.process_index() == 0


def is_single_process() -> bool:
    """Whether the run has one process (no ``jax.distributed`` job, or a job of one)."""
    return jax.process_count() == 1


def local_rows(sharding, global_shape: tuple[int, ...], axis: int) -> slice:
    """The rows along ``axis`` of an array of ``global_shape`` laid out by ``sharding`` that this process's devices
    hold (one contiguous range: the meshes of :func:`jaxdlm.sharding.make_mesh` give each process a block)."""
    spans = set()
    for index in sharding.addressable_devices_indices_map(global_shape).values():
        start, stop, _ = index[axis].indices(global_shape[axis])
        spans.add((start, stop))
    start, stop = min(a for a, _ in spans), max(b for _, b in spans)
    if sum(b - a for a, b in spans) != stop - start:
        raise ValueError(f"process {jax.process_index()} holds rows {sorted(spans)} of axis {axis}: not one "
                         "contiguous block; lay the mesh out with jaxdlm.sharding.make_mesh")
    return slice(start, stop)


def global_batch(sharding, local: dict, global_shape: tuple[int, ...]) -> dict:
    """``{name: global jax.Array}`` of ``global_shape`` from this process's rows ``local`` (numpy, the block
    :func:`local_rows` names)."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v), global_shape) for k, v in local.items()}


#: how long the processes wait for each other to finish compiling the train step (big models compile for minutes)
COMPILE_BARRIER_TIMEOUT_S = 3600


def compile_everywhere(step_fn, *args) -> None:
    """Compiles the jitted ``step_fn`` for ``args`` and waits until every process has done the same.  The first
    run of a program sets up its gloo / NCCL contexts with a fixed deadline (30 s for gloo), which a process still
    compiling would miss; after this barrier all processes start the step together.  One process: nothing."""
    if is_single_process() or not hasattr(step_fn, "lower"):
        return
    step_fn.lower(*args).compile()
    compat.wait_for_all_processes("jaxdlm_train_step_compiled", COMPILE_BARRIER_TIMEOUT_S)


class StopSignals:
    """SIGTERM and SIGINT ask the run to stop at a step boundary every process agrees on (a context manager).

    One process: the handlers set a flag.  Many processes: JAX's preemption notifier catches SIGTERM and its
    sync point (Orbax's ``CheckpointManager.reached_preemption``) names the same step on every process; SIGINT is
    turned into a SIGTERM to this process, so both signals take that path.  A second SIGINT interrupts at once
    (``KeyboardInterrupt``).  Outside the main thread no handler is installed.
    """

    def __init__(self, checkpointer):
        self.checkpointer = checkpointer
        self.received: str | None = None
        self._saved: dict = {}
        self._multi = jax.process_count() > 1

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            signals = (signal.SIGINT,) if self._multi else (signal.SIGINT, signal.SIGTERM)
            self._saved = {s: signal.signal(s, self._handle) for s in signals}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._saved.items():
            signal.signal(s, handler)
        self._saved = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGINT and self.received == "SIGINT":
            raise KeyboardInterrupt
        self.received = name
        if self._multi:
            os.kill(os.getpid(), signal.SIGTERM)

    def reached(self, step: int) -> bool:
        """Whether the run stops after ``step`` (call it after every step, on every process)."""
        if self._multi:
            return self.checkpointer.reached_preemption(step)
        return self.received is not None
