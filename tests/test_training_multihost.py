"""`jaxdlm train` on a mesh and on many processes (jax.distributed on 127.0.0.1, 4 fake CPU devices per process):
the same losses and params as one process and as one device, checkpoints that move between meshes and process
counts, SIGTERM stops of both processes that resume, SIGINT stops that resume bit-identically, a lost process that
ends its peers, memory-mapped data.

The 2-process runs are subprocesses of ``python -m jaxdlm.cli train``; every wait is bounded and every child is
killed in ``finally``.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdlm import cli
from jaxdlm.model import Model
from jaxdlm.training import data as data_lib
from jaxdlm.training import step as step_lib
from jaxdlm.training.config import load_config
from jaxdlm.training.distributed import EXIT_PREEMPTED
from jaxdlm.training.run import Stopped, load_dataset, load_trained, train
from numerics import rel_err
from training_utils import counting_data, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 10  # optim.total_steps of every run here; checkpoints every 4
TOL = 2e-4  # a mesh changes the order of reductions, nothing else
RUN_TIMEOUT_S = 240  # any one (pair of) subprocess(es)

# A `jaxdlm train` process; TEST_SIGNAL_AT="SIGTERM:1" sends it that signal while it reads the batch of step 1 and
# slows its later steps, so the processes agree on a stop step well before the end of the run.
CHILD = """
import os, signal, sys, time
hook = os.environ.get("TEST_SIGNAL_AT")
if hook:
    from jaxdlm.training import data
    name, at = hook.split(":")
    batch = data.Dataset.batch
    def hooked(self, step, *args, **kwargs):
        if step == int(at):
            os.kill(os.getpid(), getattr(signal, name))
        if step > int(at):
            time.sleep(0.5)
        return batch(self, step, *args, **kwargs)
    data.Dataset.batch = hooked
from jaxdlm import cli
sys.exit(cli.main(["train", "--no-compile-cache", *sys.argv[1:]]))
"""


def _config(tmp, out: str, eval: bool = True, **mesh) -> str:
    """A tiny joint-loss experiment over a memory-mapped 1-D token stream (and eval rows); returns its path."""
    path = tmp / f"{out}.json"
    conf = {
        "model": {"config": "model.json", "seed": 1},
        "data": {"train": "train.npy", "eval": "eval.npy" if eval else None, "seq_len": 16, "seed": 2},
        "optim": {"lr": 3e-3, "total_steps": STEPS, "warmup_steps": 2, "decay_steps": 4, "weight_decay": 0.0,
                  "batch_size": 8, "accum": 2},
        "objective": {"objective": "joint", "schedule": "position"},
        "run": {"out_dir": out, "eval_every": 0, "eval_batches": 1, "checkpoint_every": 4, "log_every": 1,
                "keep": 10, "seed": 3},
    }
    if mesh:
        conf["mesh"] = mesh
    path.write_text(json.dumps(conf))
    return str(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
               JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0",
               JAX_DEFAULT_MATMUL_PRECISION="highest")
    env.pop("TEST_SIGNAL_AT", None)
    env.update(extra)
    return env


def _two_processes(config: str, tmp, tag: str, *args, hooks=(None, None), timeout=RUN_TIMEOUT_S):
    """Runs ``jaxdlm train config`` as processes 0 and 1 of a job on 127.0.0.1; returns their exit codes and
    outputs (and the seconds each took).  ``hooks``: each process's TEST_SIGNAL_AT."""
    port = _free_port()
    procs, logs = [], []
    try:
        for i in range(2):
            log = open(tmp / f"{tag}.{i}.log", "w+")
            logs.append(log)
            env = _env(**({"TEST_SIGNAL_AT": hooks[i]} if hooks[i] else {}))
            procs.append(subprocess.Popen(
                [sys.executable, "-c", CHILD, config, "--no-progress", "--coordinator", f"127.0.0.1:{port}",
                 "--num-processes", "2", "--process-id", str(i), *args],
                env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(tmp)))
        start = time.monotonic()
        codes, ended = [None, None], [None, None]
        while None in codes and time.monotonic() - start < timeout:
            for i, p in enumerate(procs):
                if codes[i] is None and p.poll() is not None:
                    codes[i], ended[i] = p.returncode, time.monotonic() - start
            time.sleep(0.1)
        outputs = []
        for log in logs:
            log.seek(0)
            outputs.append(log.read())
        assert None not in codes, f"{tag}: no exit within {timeout} s:\n" + "\n".join(o[-3000:] for o in outputs)
        return codes, outputs, ended
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=30)
        for log in logs:
            log.close()


def _losses(run_dir) -> dict[int, float]:
    recs = [json.loads(line) for line in open(os.path.join(run_dir, "log.jsonl"))]
    steps = [r["step"] for r in recs if r["kind"] == "train"]
    assert len(steps) == len(set(steps)), f"duplicate log records in {run_dir}: {sorted(steps)}"
    return {r["step"]: r["loss"] for r in recs if r["kind"] == "train"}


def _params(run_dir, step=None) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(load_trained(str(run_dir), step).params)]


def _single_device_reference(config: str):
    """Per-step losses and final params of the experiment stepped by the library on one device, no mesh: the
    batch of step s is ``Dataset.batch(s)`` whole."""
    cfg = load_config(config)
    from jaxdlm.training.config import model_config

    mcfg = model_config(cfg)
    model = Model.init(mcfg, seed=cfg.model.seed)
    tx = step_lib.make_optimizer(cfg.optim)
    run_step = step_lib.make_train_step(model.graphdef, tx, cfg.objective, schedule=step_lib.wsd_schedule(cfg.optim),
                                        donate=False)
    state = step_lib.init_state(model.params, tx, cfg.run.seed)
    ds = load_dataset(cfg, cfg.data.train, mcfg, cfg.data.seed)
    device = jax.devices()[0]
    losses = {}
    for s in range(STEPS):
        batch = {k: jax.device_put(jnp.asarray(v), device) for k, v in ds.batch(s, cfg.batch_size, cfg.accum).items()}
        state, metrics = run_step(state, batch)
        losses[s + 1] = float(metrics["loss"])
    return losses, [np.asarray(x) for x in jax.tree.leaves(state.params)]


@pytest.fixture
def runs(tmp_path_factory):
    """The runs that one test checks several ways (a fixture shared by several tests would be built once per
    pytest-xdist worker): 2 processes x 4 devices (data=2, fsdp=4) SIGTERMed mid-run, then resumed to the end;
    1 process x 8 devices (the default mesh, fsdp=8) in this process; the library on one device.  (Two launches,
    not three: the resumed pair is checked against the other meshes; resuming bit for bit is checked on 8 devices
    in this process, where an uninterrupted reference costs no extra launch.)"""
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (tests/conftest.py)")
    tmp = tmp_path_factory.mktemp("multihost")
    rng = np.random.default_rng(int(np.random.SeedSequence().entropy % 2**31))
    mcfg = tiny_config(block_size=4)
    (tmp / "model.json").write_text(json.dumps(mcfg.to_dict()))
    np.save(tmp / "train.npy", counting_data(rng, 64, 16, mcfg.vocab_size).reshape(-1))
    np.save(tmp / "eval.npy", counting_data(rng, 8, 16, mcfg.vocab_size))
    two = _config(tmp, "two", data=2, fsdp=4)
    out = {"tmp": tmp, "two": two}

    def two_process_runs():  # one after another: the later one finds process 0's programs in JAX's cache
        out["term"] = _two_processes(two, tmp, "term", hooks=("SIGTERM:1", "SIGTERM:1"))
        out["term_stop"] = [int(d) for d in os.listdir(tmp / "two" / "checkpoints") if d.isdigit()]
        out["straight"] = _two_processes(two, tmp, "resumed")

    worker = threading.Thread(target=two_process_runs, daemon=True)  # much of it waits (rendezvous, gloo set-up)
    worker.start()
    out["eight"] = train(load_config(_config(tmp, "eight")), progress=False, log=lambda *_: None)
    out["single"] = _single_device_reference(two)
    worker.join(timeout=3 * RUN_TIMEOUT_S)
    assert not worker.is_alive(), "the 2-process runs did not finish"
    return out


def _equal_across_meshes(runs):
    """2 processes x 4 devices (stopped and resumed), 1 x 8 and one device: the same per-step losses and final
    params within TOL."""
    tmp = runs["tmp"]
    codes, outputs, _ = runs["straight"]
    assert codes == [0, 0], outputs
    two, eight = _losses(tmp / "two"), _losses(tmp / "eight")
    single, single_params = runs["single"]
    assert sorted(two) == sorted(eight) == list(range(1, STEPS + 1))
    for s in two:
        assert abs(two[s] - single[s]) <= TOL * abs(single[s]), (s, two[s], single[s])
        assert abs(eight[s] - single[s]) <= TOL * abs(single[s]), (s, eight[s], single[s])
    assert two[STEPS] < two[1]  # guard: it trained
    for a, b, c in zip(_params(tmp / "two"), _params(tmp / "eight"), single_params):
        assert rel_err(a, c) <= TOL and rel_err(b, c) <= TOL
    # only process 0 wrote the run folder's records and printed the final metrics
    assert '"loss"' in outputs[0] and '"loss"' not in outputs[1]
    assert json.load(open(tmp / "two" / "train_config.json"))["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}


def _resumes_on_another_mesh(runs):
    """The 2-process checkpoint of step 4 (data=2, fsdp=4) continues on 1 process (fsdp=8) like the 2-process run."""
    tmp = runs["tmp"]
    shutil.copytree(tmp / "two", tmp / "moved")
    for step in (8, 10):  # the 2-process run as it was after step 4
        shutil.rmtree(tmp / "moved" / "checkpoints" / str(step))
    conf = json.load(open(runs["two"]))
    conf["run"]["out_dir"], conf["mesh"] = "moved", {"fsdp": 8}
    (tmp / "moved.json").write_text(json.dumps(conf))
    msgs = []
    train(load_config(str(tmp / "moved.json")), progress=False, log=msgs.append)
    assert any("resumed from step 4" in m for m in msgs), msgs
    moved, two = _losses(tmp / "moved"), _losses(tmp / "two")  # no step logged twice (checked in _losses)
    assert sorted(moved) == list(range(1, STEPS + 1))
    for s in range(5, STEPS + 1):
        assert abs(moved[s] - two[s]) <= TOL * abs(two[s]), (s, moved[s], two[s])
    for a, b in zip(_params(tmp / "moved"), _params(tmp / "two")):
        assert rel_err(a, b) <= TOL


def _sigterm_checkpoints_and_resumes(runs):
    """SIGTERM to both processes: a checkpoint, exit 75; the pair resumes from it (and then equals the other
    meshes: :func:`_equal_across_meshes`)."""
    codes, outputs, _ = runs["term"]
    assert codes == [EXIT_PREEMPTED, EXIT_PREEMPTED], outputs
    stop = max(runs["term_stop"])  # the last checkpoint of the stopped run
    assert 1 < stop < STEPS, runs["term_stop"]
    assert f"resume from step {stop}" in outputs[0], outputs[0][-2000:]
    codes, outputs, _ = runs["straight"]
    assert codes == [0, 0], outputs
    assert f"resumed from step {stop}" in outputs[0]


def _sigint_resumes_bit_identically_then_says_finished(runs, monkeypatch):
    """SIGINT to this process: Stopped after a checkpoint; resuming equals the uninterrupted 8-device run bit for bit;
    a third call says the run is finished."""
    tmp = runs["tmp"]
    config = _config(tmp, "interrupted")
    batch = data_lib.Dataset.batch

    def interrupted_at_step_1(self, step, *args, **kwargs):
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return batch(self, step, *args, **kwargs)

    monkeypatch.setattr(data_lib.Dataset, "batch", interrupted_at_step_1)
    msgs = []
    with pytest.raises(Stopped) as e:
        train(load_config(config), progress=False, log=msgs.append)
    assert e.value.step == 2 and e.value.signal_name == "SIGINT"
    assert any("SIGINT" in m and "resume from step 2" in m for m in msgs), msgs
    monkeypatch.setattr(data_lib.Dataset, "batch", batch)
    train(load_config(config), progress=False, log=msgs.append)
    assert any("resumed from step 2" in m for m in msgs)
    assert _losses(tmp / "interrupted") == _losses(tmp / "eight")
    for a, b in zip(_params(tmp / "interrupted"), _params(tmp / "eight")):
        np.testing.assert_array_equal(a, b)
    # re-running a finished run says so and returns its final metrics
    msgs.clear()
    final = train(load_config(config), progress=False, log=msgs.append)
    assert any("is finished" in m and f"step {STEPS}" in m for m in msgs), msgs
    assert final["step"] == STEPS and final["loss"] == _losses(tmp / "eight")[STEPS]


def test_runs_on_meshes_and_processes_agree_resume_and_stop(runs, monkeypatch):
    _sigterm_checkpoints_and_resumes(runs)
    _equal_across_meshes(runs)
    _resumes_on_another_mesh(runs)
    if threading.current_thread() is threading.main_thread():  # (signal handlers need the main thread)
        _sigint_resumes_bit_identically_then_says_finished(runs, monkeypatch)


def test_lost_process_ends_its_peer_with_an_error(tmp_path, rng):
    """SIGKILL of process 1 as it reads its first batch: process 0 exits non-zero within the heartbeat bound (not
    forever), whatever it was doing (here: compiling the train step)."""
    mcfg = tiny_config(block_size=4)
    (tmp_path / "model.json").write_text(json.dumps(mcfg.to_dict()))
    np.save(tmp_path / "train.npy", counting_data(rng, 64, 16, mcfg.vocab_size).reshape(-1))
    np.save(tmp_path / "eval.npy", counting_data(rng, 8, 16, mcfg.vocab_size))
    config = _config(tmp_path, "lost", eval=False, data=2, fsdp=4)
    codes, outputs, ended = _two_processes(config, tmp_path, "lost", "--heartbeat-timeout", "5",
                                           hooks=(None, "SIGKILL:0"), timeout=120)
    assert codes[1] == -signal.SIGKILL, outputs[1][-2000:]
    assert codes[0] != 0, outputs[0][-2000:]
    assert ended[0] - ended[1] < 60, ended  # the heartbeat bound (5 s) plus slack, not the 100 s default


def test_token_file_is_memory_mapped_and_read_only_in_the_rows_asked(tmp_path):
    """A 32 MB stream: opening it and serving one process's rows reads those rows, not the file."""
    n_rows, seq_len = 1 << 19, 16
    arr = np.lib.format.open_memmap(tmp_path / "big.npy", mode="w+", dtype=np.int32, shape=(n_rows * seq_len,))
    for i in range(0, arr.size, 1 << 20):
        arr[i:i + (1 << 20)] = 4 + np.arange(min(1 << 20, arr.size - i)) % 40
    arr.flush()
    del arr
    mcfg = tiny_config(block_size=4)
    (tmp_path / "model.json").write_text(json.dumps(mcfg.to_dict()))
    conf = {"model": {"config": "model.json"}, "data": {"train": "big.npy", "seq_len": seq_len},
            "optim": {"batch_size": 8, "accum": 2}}
    (tmp_path / "exp.json").write_text(json.dumps(conf))
    cfg = load_config(str(tmp_path / "exp.json"))
    rss = _rss_bytes()
    ds = load_dataset(cfg, cfg.data.train, mcfg, seed=0)
    part = slice(4, 8)  # the rows of process 1 of 2
    b = ds.batch(3, 8, 2, part)
    grown = _rss_bytes() - rss
    assert isinstance(ds.tokens.base, np.memmap) or isinstance(ds.tokens, np.memmap)
    assert len(ds) == n_rows and b["tokens"].shape == (2, 4, seq_len)
    assert ds.rows_read == 2 * 4  # the loader's own count: only this process's rows of each micro-batch
    np.testing.assert_array_equal(b["tokens"], ds.batch(3, 8, 2)["tokens"][:, part])
    if rss:
        assert grown < (n_rows * seq_len * 4) // 4, f"RSS grew by {grown} bytes for a 32 MB file"


def _rss_bytes() -> int:
    """Resident set size of this process (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def test_multi_process_flags_go_together(tmp_path, capsys):
    mcfg = tiny_config(block_size=4)
    (tmp_path / "model.json").write_text(json.dumps(mcfg.to_dict()))
    np.save(tmp_path / "train.npy", np.full(64 * 16, 5, np.int32))
    (tmp_path / "exp.json").write_text(json.dumps({"model": {"config": "model.json"},
                                                   "data": {"train": "train.npy", "seq_len": 16}}))
    assert cli.main(["train", str(tmp_path / "exp.json"), "--coordinator", "127.0.0.1:1234", "--no-compile-cache"]) == 2
    assert "needs --num-processes and --process-id" in capsys.readouterr().err


def test_checkpoints_of_the_plain_dict_state_restore_into_train_state(tmp_path, seed):
    """Earlier versions saved the train state as a dict; it restores into the typed TrainState, which saves under the
    same keys (a dict target reads its parts back)."""
    from jaxdlm.training.checkpointing import Checkpointer

    params = {"w": jax.random.normal(jax.random.PRNGKey(seed), (4, 8)), "norm": jnp.ones(8)}
    tx = step_lib.make_optimizer(step_lib.OptimConfig())
    state = step_lib.init_state(params, tx, seed)
    old = {"step": state.step + 7, "params": state.params, "opt_state": state.opt_state, "rng": state.rng}
    ck = Checkpointer(tmp_path / "ck")
    try:
        ck.save(7, old)
        restored, _ = ck.restore(jax.eval_shape(lambda: state))
        assert isinstance(restored, step_lib.TrainState) and int(restored.step) == 7
        for name in ("params", "opt_state", "rng"):
            for a, b in zip(jax.tree.leaves(getattr(restored, name)), jax.tree.leaves(old[name])):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        ck.save(8, restored.replace(step=restored.step + 1))
        part = ck.restore({"step": jax.ShapeDtypeStruct((), np.int32), "params": jax.eval_shape(lambda: state.params)},
                          8, partial=True)[0]
        assert int(part["step"]) == 8
        for a, b in zip(jax.tree.leaves(part["params"]), jax.tree.leaves(state.params)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    finally:
        ck.close()


def test_cluster_auto_detection_starts_only_multi_process_jobs(monkeypatch):
    """No flag and no cluster: a plain run, jax.distributed untouched; a SLURM job of one task stays plain too; a task
    of a two-task job starts jax.distributed (stubbed here) with the heartbeat bound."""
    from jaxdlm import compat
    from jaxdlm.training import distributed

    started = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: started.append((a, k)))
    monkeypatch.setattr(compat, "use_gloo_cpu_collectives", lambda: None)
    for var in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID",
                "OMPI_MCA_orte_hnp_uri", "PMIX_NAMESPACE", "KUBERNETES_SERVICE_HOST"):
        monkeypatch.delenv(var, raising=False)
    assert compat.detected_cluster() is None and distributed.initialize() is False
    slurm = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
    for name, value in dict(slurm, SLURM_NTASKS="1").items():
        monkeypatch.setenv(name, value)
    assert compat.detected_cluster() == ("SlurmCluster", 1) and distributed.initialize() is False
    monkeypatch.setenv("SLURM_NTASKS", "2")
    assert compat.detected_cluster() == ("SlurmCluster", 2)
    assert distributed.initialize(heartbeat_timeout_s=30) is True and started[0][1]["heartbeat_timeout_seconds"] == 30
