"""Run a training experiment from a config file: ``jaxdlm train CONFIG`` or ``python -m jaxdlm.training.run CONFIG``.

The config is fully validated (:mod:`jaxdlm.training.config`) before any model is built.  The run folder
(``run.out_dir``) receives ``model_config.json``, ``train_config.json``, ``log.jsonl`` (one JSON record per
log / eval event) and ``checkpoints/`` (Orbax).  Re-running the same command resumes from the latest
checkpoint and reaches exactly the params of an uninterrupted run.  :func:`load_trained` turns a run
folder into a :class:`~jaxdlm.model.Model` (with its LoRA when the run trained one).

The run lives on a mesh (``[mesh]``, :mod:`jaxdlm.sharding`) over the devices of every process: the train
state is created or restored directly in its shards, each process reads only its rows of each global batch
(the same rows whatever the process count or mesh), process 0 alone writes ``log.jsonl`` and the configs, and
SIGTERM / SIGINT stop the run at a step every process agrees on, with a checkpoint
(:mod:`jaxdlm.training.distributed`).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from typing import Any, Callable, NamedTuple

import numpy as np

# The noise of evaluations (masks and noise levels) comes from this fixed seed, not from the run's: every
# evaluation of every run then scores the same noised batches, so eval losses compare across steps, across
# resumed and uninterrupted runs, and across runs with different seeds.
EVAL_NOISE_SEED = 12345


def _load_tokenizer(path: str):
    if os.path.isfile(path):
        from tokenizers import Tokenizer

        return Tokenizer.from_file(path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def load_dataset(cfg, path: str, mcfg, seed: int):
    """A :class:`~jaxdlm.training.data.Dataset` from a ``.npy`` token file (memory-mapped: only the rows a batch
    uses are read) or a ``.jsonl`` chat file."""
    from jaxdlm.training import data

    path = cfg.path(path)
    L = cfg.data.seq_len
    if cfg.data.format == "tokens":
        arr = np.load(path, mmap_mode="r")
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{path}: token ids must be integers, got dtype {arr.dtype}")
        if arr.ndim == 1:
            rows = data.stream_rows(arr, L, mcfg.block_size)
        elif arr.ndim == 2:
            if arr.shape[1] != L:
                raise ValueError(f"{path}: rows of length {arr.shape[1]} but data.seq_len={L}")
            rows = arr
        else:
            raise ValueError(f"{path}: expected a 1-D token stream or 2-D [N, L] rows, got shape {arr.shape}")
        return data.Dataset(rows, None, seed, vocab_size=mcfg.vocab_size, name=path)
    tok = _load_tokenizer(cfg.path(cfg.data.tokenizer))
    examples = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if line.strip():
                try:
                    examples.append(data.chat_tokens(tok, json.loads(line)["messages"]))
                except (KeyError, json.JSONDecodeError) as e:
                    raise ValueError(f"{path}:{i + 1}: expected {{\"messages\": [...]}} ({e})") from None
    pad = mcfg.pad_token_id if mcfg.pad_token_id is not None else (mcfg.eos_token_id or 0)
    return data.Dataset.from_dict(data.sft_batch(examples, L, mcfg.block_size, pad_id=pad), seed)


def run_lineage(run_dir: str, config_dir: str | None = None) -> list[tuple[str, dict]]:
    """``(run folder, its train_config.json)`` for ``run_dir`` and each run it started from (``model.init``),
    newest first.  A relative ``init`` is resolved against ``config_dir`` (the folder of the configs that named
    it; ``None``: the current directory)."""
    from jaxdlm.checkpoint import resolve_path

    chain = []
    run_dir = os.fspath(resolve_path(run_dir))
    while run_dir and os.path.isdir(run_dir):
        with open(os.path.join(run_dir, "train_config.json"), encoding="utf-8") as f:
            tc = json.load(f)
        chain.append((run_dir, tc))
        init = tc.get("model", {}).get("init", "random")
        run_dir = None if init == "random" else os.fspath(resolve_path(os.path.join(config_dir or "",
                                                                                 os.path.expanduser(init))))
    return chain


def load_trained(run_dir: str, step: int | None = None, *, mesh=None):
    """The :class:`~jaxdlm.model.Model` of a run folder (relative or ``~`` paths too) at ``step`` (default: latest
    checkpoint), with the run's draft LoRA for a LoRA run; for an adapter run (``[adapter]``) the tuned model:
    its base rebuilt as the run recorded it (init, seed, step, ``base_dtype``) with the trained adapter in it
    (it generates with the adapter applied; ``jaxdlm.save(model, DIR, merge_adapter=True)`` folds it in).
    ``jaxdlm.load(run_dir)`` calls this.  ``mesh``: the params (and LoRA) are restored straight into their shards
    on it (:mod:`jaxdlm.sharding` rules)."""
    import jax

    from jaxdlm import sharding as sh
    from jaxdlm.checkpoint import METADATA_FILE, resolve_path
    from jaxdlm.config import ModelConfig
    from jaxdlm.model import Model
    from jaxdlm.training.checkpointing import Checkpointer

    run_dir = os.fspath(resolve_path(run_dir))
    cfg_path = os.path.join(run_dir, "model_config.json")
    if not os.path.isfile(cfg_path):
        hint = (f"; it holds {METADATA_FILE}: load it with jaxdlm.load" if os.path.isfile(os.path.join(
            run_dir, METADATA_FILE)) else "")
        raise ValueError(f"{run_dir} is not a training run folder (no model_config.json){hint}")
    with open(cfg_path, encoding="utf-8") as f:
        mcfg = ModelConfig.from_dict(json.load(f))
    ck = Checkpointer(os.path.join(run_dir, "checkpoints"))
    try:
        step = ck.latest_step() if step is None else step
        if step is None or step not in ck.all_steps():
            raise ValueError(f"{run_dir}: no checkpoint at step {step}; available: {ck.all_steps()}")
        meta = ck.restore_meta(step)
        abstract = Model.abstract(mcfg)
        scalars = {"step": _placed(jax.ShapeDtypeStruct((), np.int32), mesh),
                   "rng": _placed(jax.ShapeDtypeStruct((2,), np.uint32), mesh)}
        if meta.get("kind") == "lora":
            from jaxdlm.lora import OProjLoRA

            base = load_trained(meta["base_run"], meta.get("base_step"), mesh=mesh)
            lora = OProjLoRA.abstract(mcfg, meta["lora_rank"])
            lora = lora if mesh is None else _placed(lora, sh.lora_shardings(mesh))
            state = _restore_partial(ck, step, dict(scalars, lora=lora))
            return Model(mcfg, base.graphdef, base.params, lora=state["lora"], tokenizer=base.tokenizer, mesh=mesh)
        if meta.get("kind") == "adapter":
            return _load_adapter_run(ck, step, meta, mcfg, mesh)
        params = abstract.params if mesh is None else _placed(abstract.params, sh.param_shardings(abstract, mesh))
        state = _restore_partial(ck, step, {"step": scalars["step"], "params": params})
        return Model(mcfg, abstract.graphdef, state["params"], mesh=mesh)
    finally:
        ck.close()


def _placed(abstract, where):
    """``ShapeDtypeStruct`` leaves of ``abstract`` given the shardings ``where``: a tree of shardings like
    ``abstract``, a mesh (every leaf replicated on it) or ``None`` (unchanged)."""
    import jax

    if where is None:
        return abstract
    if isinstance(where, jax.sharding.Mesh):
        rep = jax.sharding.NamedSharding(where, jax.sharding.PartitionSpec())
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), abstract)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, where)


def _restore_partial(ck, step, target):
    """Restores only the entries of ``target`` (others, like the optimizer state, are skipped)."""
    return ck.restore({k: v for k, v in target.items() if v is not None}, step, partial=True)[0]


class _Experiment(NamedTuple):
    """What a run steps: ``abstract`` (the train state's shapes, dtypes and shardings: the restore target),
    ``init() -> state`` (a fresh state, created directly in its shards), ``run_step(state, batch) -> (state,
    metrics)``, ``evaluate(state) -> metrics`` (``None`` without eval data) and the record saved with each
    checkpoint, and the model FLOPs per token of a step (for MFU).  States are
    :class:`~jaxdlm.training.step.TrainState` or
    :class:`~jaxdlm.training.lora.LoraTrainState` pytrees."""

    abstract: Any
    init: Callable
    run_step: Callable
    evaluate: Callable | None
    meta: dict
    flops_per_token: float | None = None  # model FLOPs per sequence token of a step (speed.py), None: unknown


class Stopped(Exception):
    """A SIGTERM / SIGINT stopped the run after ``step`` with a checkpoint there: re-running resumes from it."""

    def __init__(self, step: int, signal_name: str):
        super().__init__(f"{signal_name}: stopped with a checkpoint at step {step}; run the same command again to "
                         f"resume from step {step}")
        self.step, self.signal_name = step, signal_name


def train(cfg, *, max_steps: int | None = None, progress: bool = True, log=print,
          peak_tflops: float | None = None) -> dict:
    """Runs (or resumes) the experiment ``cfg`` on the ``[mesh]`` over every device of every process; stops
    after ``max_steps`` optimizer steps in THIS call (the schedule still spans ``optim.total_steps``).  Returns
    the final metrics (of a finished run: the last ones its ``log.jsonl`` holds).  Only process 0 writes the
    run folder's logs and configs and calls ``log``.  ``peak_tflops``: dense bf16 TFLOP/s of one device for the
    ``mfu`` of the train records, where :data:`~jaxdlm.training.speed.PEAK_BF16_TFLOPS` does not know the device.

    Raises :class:`Stopped` when SIGTERM or SIGINT stopped the run early (a checkpoint was written first).
    """
    import jax

    from jaxdlm.training import config as config_lib
    from jaxdlm.training import distributed
    from jaxdlm.training.checkpointing import Checkpointer

    mcfg = config_lib.model_config(cfg)
    main = distributed.is_main()
    log = log if main else _silent
    out = cfg.path(cfg.run.out_dir)
    if main:
        os.makedirs(out, exist_ok=True)
    mesh = run_mesh(cfg, mcfg)
    train_ds = load_dataset(cfg, cfg.data.train, mcfg, cfg.data.seed)
    eval_ds = load_dataset(cfg, cfg.data.eval, mcfg, cfg.data.seed) if cfg.data.eval else None
    if eval_ds is not None and len(eval_ds) < cfg.batch_size:
        raise ValueError(f"data.eval has {len(eval_ds)} sequences, fewer than optim.batch_size={cfg.batch_size}")
    ck = Checkpointer(os.path.join(out, "checkpoints"), max_to_keep=cfg.run.keep)
    try:
        latest = ck.latest_step()
        if latest is not None:
            _check_same_config(ck, cfg, out)
        if latest is not None and latest >= cfg.optim.total_steps:
            log(f"{out} is finished: it stopped at step {latest} of optim.total_steps={cfg.optim.total_steps}; "
                "nothing to train (raise optim.total_steps in a new run.out_dir to train on)")
            return _last_metrics(out) if main else {}
        resumed = ck.restore_meta() if latest is not None else None
        exp = _experiment(cfg, mcfg, eval_ds, mesh, resumed)  # (outside set_mesh: NNX would read the logical axis names
        state, start = _resume(ck, cfg, exp, out, log)  # of new params as mesh axes)
        if main:
            _write_configs(out, mcfg, cfg)
            _truncate_log(out, start)
        with jax.set_mesh(mesh):  # the model pins its activations' shardings under it
            return _loop(cfg, exp, state, train_ds, ck, out, start, max_steps, progress and main, log, mesh,
                         peak_tflops)
    finally:
        ck.close()


def run_mesh(cfg, mcfg):
    """The run's mesh: ``[mesh]`` over ``jax.devices()`` (every device of every process), checked against the
    model and ``optim.batch_size``."""
    import jax

    from jaxdlm import sharding as sh

    mesh = sh.make_mesh(cfg.mesh.sizes(jax.device_count()))
    sh.check_divisible(mcfg, mesh)
    rows = sh.batch_size_divisor(mesh)
    if cfg.batch_size % rows:
        raise ValueError(f"optim.batch_size={cfg.batch_size} is not a multiple of the {rows} batch shards of the "
                         f"mesh {dict(mesh.shape)} (data x fsdp); pick a batch size divisible by {rows}")
    return mesh


def _experiment(cfg, mcfg, eval_ds, mesh, resumed: dict | None = None) -> _Experiment:
    """The model to start from (random, or a trained run's) and the full, draft-LoRA or adapter experiment around
    it.  ``resumed``: the record of the run's own latest checkpoint when it resumes; a frozen base (LoRA, adapter)
    is then the one that record names, not the base run's latest step now (which may have moved on)."""
    from jaxdlm.config import ModelConfig
    from jaxdlm.model import Model
    from jaxdlm.training.checkpointing import Checkpointer

    if cfg.adapter.enabled:
        return _adapter_experiment(cfg, mcfg, eval_ds, mesh, (resumed or {}).get("base"))
    if cfg.model.init == "random":
        return _full_experiment(cfg, mcfg, None, eval_ds, mesh)
    base_run = cfg.path(cfg.model.init)
    with open(os.path.join(base_run, "model_config.json"), encoding="utf-8") as f:
        base_cfg = ModelConfig.from_dict(json.load(f))
    if base_cfg.num_params() != mcfg.num_params() or base_cfg.vocab_size != mcfg.vocab_size:
        raise ValueError(f"model.init={cfg.model.init!r} has a different architecture than model.config")
    base_ck = Checkpointer(os.path.join(base_run, "checkpoints"))
    base_step = base_ck.latest_step()
    base_ck.close()
    if resumed and resumed.get("kind") == "lora":
        base_step = resumed["base_step"]
    if not cfg.lora.enabled:
        return _full_experiment(cfg, mcfg, (base_run, base_step), eval_ds, mesh)
    model = load_trained(base_run, base_step, mesh=mesh)
    return _lora_experiment(cfg, mcfg, Model(mcfg, model.graphdef, model.params), eval_ds, base_run, base_step, mesh)


def _full_experiment(cfg, mcfg, base: tuple[str, int] | None, eval_ds, mesh) -> _Experiment:
    """All parameters train on the configured objective, from random params (drawn inside the jitted init, so
    they land in their shards) or from the checkpoint ``base = (run folder, step)`` (restored into them)."""
    import jax

    from jaxdlm.model import Model
    from jaxdlm.training import speed
    from jaxdlm.training import step as step_lib

    tx, run_step, eval_step, shapes, shardings = _steps(mcfg, cfg.optim, cfg.objective, cfg.compute_dtype, mesh,
                                                        cfg.model.remat)
    eval_key = jax.random.PRNGKey(EVAL_NOISE_SEED)

    def init_state(params):
        return step_lib.init_state(params, tx, cfg.run.seed)

    def init():
        if base is None:
            return jax.jit(lambda: init_state(Model.init(mcfg, seed=cfg.model.seed).params),
                           out_shardings=shardings)()
        return jax.jit(init_state, out_shardings=shardings)(load_trained(*base, mesh=mesh).params)

    def evaluate(state):
        return _mean_metrics(eval_step(state.params, b, jax.random.fold_in(eval_key, i))
                             for i, b in enumerate(_eval_batches(eval_ds, cfg, mesh)))

    return _Experiment(_placed(shapes, shardings), init, run_step, evaluate if eval_ds is not None else None,
                       {"kind": "full"}, speed.train_flops_per_token(mcfg, cfg.objective, cfg.data.seq_len))


def _state_shardings(tx, shapes, trained: str, trained_shardings, mesh):
    """Shardings of a train state ``shapes`` (:class:`~jaxdlm.training.step.TrainState` or
    :class:`~jaxdlm.training.lora.LoraTrainState`): the field ``trained`` and its optimizer-state copies (Adam's
    moments) as ``trained_shardings``, everything else (step, RNG, counters) replicated."""
    import jax
    import optax

    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    opt = optax.tree_map_params(tx, lambda _, s: s, shapes.opt_state, trained_shardings,
                                transform_non_params=lambda _: rep,
                                is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    return jax.tree.map(lambda _: rep, shapes).replace(opt_state=opt, **{trained: trained_shardings})


def _lora_experiment(cfg, mcfg, model, eval_ds, base_run, base_step, mesh) -> _Experiment:
    """A draft LoRA trains on the frozen ``model`` (training/lora.py; its params already in their shards)."""
    import jax
    import jax.numpy as jnp

    from jaxdlm import sharding as sh
    from jaxdlm.lora import OProjLoRA
    from jaxdlm.training import lora as lora_lib
    from jaxdlm.training import step as step_lib

    tx = step_lib.make_optimizer(cfg.optim)

    def init_state():
        lora0 = OProjLoRA.init(mcfg, cfg.lora.rank, cfg.lora.alpha, jax.random.PRNGKey(cfg.run.seed))
        return lora_lib.LoraTrainState(rng=jax.random.PRNGKey(cfg.run.seed), **lora_lib.init_lora_state(lora0, tx))

    shapes = jax.eval_shape(init_state)
    shardings = _state_shardings(tx, shapes, "lora", sh.lora_shardings(mesh), mesh)
    base_params = step_lib.cast_floating(model.params, jnp.bfloat16 if cfg.compute_dtype == "bfloat16" else None)
    lstep = lora_lib.make_lora_step(model.graphdef, tx, target=cfg.lora.target, donate=False)
    flatten = jax.jit(lambda batch: {k: v.reshape(-1, v.shape[-1]) for k, v in batch.items()})

    def run_step(state, batch):
        new, metrics = lstep(base_params, {"lora": state.lora, "opt_state": state.opt_state, "step": state.step},
                             flatten(batch))
        return state.replace(**new), metrics

    graphdef = model.graphdef
    eval_fn = jax.jit(lambda lora, params, b: lora_lib.draft_loss(
        _merge(graphdef, params), b["tokens"], lora, target=cfg.lora.target, loss_mask=b["loss_mask"])[1])

    def evaluate(state):
        return _mean_metrics(eval_fn(state.lora, base_params, b) for b in _eval_batches(eval_ds, cfg, mesh))

    meta = {"kind": "lora", "base_run": base_run, "base_step": base_step, "lora_rank": cfg.lora.rank}
    return _Experiment(_placed(shapes, shardings), jax.jit(init_state, out_shardings=shardings), run_step,
                       evaluate if eval_ds is not None else None, meta)


def _adapter_experiment(cfg, mcfg, eval_ds, mesh, recorded_base: dict | None = None) -> _Experiment:
    """An adapter (``[adapter]``, :mod:`jaxdlm.adapter`) trains on the frozen base: random (``model.seed``), a run
    folder or a jaxdlm checkpoint (``model.init``), prepared in ``adapter.base_dtype``
    (:mod:`jaxdlm.training.adapter`).  The state (checkpointed) is the float32 adapter and its optimizer state; the
    record saved with it names the base so that :func:`load_trained` rebuilds the tuned model; a resumed run
    rebuilds the base its checkpoint recorded (``recorded_base``)."""
    import jax

    from jaxdlm import sharding as sh
    from jaxdlm.model import add_adapter
    from jaxdlm.training import adapter as tune
    from jaxdlm.training import speed

    acfg = cfg.adapter.adapter_config()
    init = cfg.model.init if cfg.model.init == "random" else cfg.path(cfg.model.init)
    base = recorded_base or tune.base_record(init, cfg.model.seed, cfg.adapter.base_dtype)
    model = sh.shard_model(add_adapter(tune.load_base(base, mcfg), acfg), mesh)
    steps = _adapter_steps(model.graphdef, mcfg, acfg, cfg.optim, cfg.objective, mesh, cfg.model.remat, cfg.run.seed)
    eval_key = jax.random.PRNGKey(EVAL_NOISE_SEED)
    base_params = model.params

    def evaluate(state):
        return _mean_metrics(steps.eval_step(state.params, base_params, b, jax.random.fold_in(eval_key, i))
                             for i, b in enumerate(_eval_batches(eval_ds, cfg, mesh)))

    meta = {"kind": "adapter", "adapter": acfg.to_dict(), "base": base}
    return _Experiment(_placed(steps.shapes, steps.shardings), steps.init,
                       lambda state, batch: steps.train_step(state, base_params, batch),
                       evaluate if eval_ds is not None else None, meta,
                       speed.adapter_flops_per_token(mcfg, cfg.objective, cfg.data.seq_len, acfg))


class _AdapterSteps(NamedTuple):
    """The jitted programs of an adapter run and its state's layout (:func:`_adapter_steps`)."""

    init: Callable  # () -> a fresh TrainState (float32 Adapter params), created in its shardings
    train_step: Callable  # (state, base_params, batch [A, B, L]) -> (state, metrics): make_adapter_step
    eval_step: Callable  # (factors, base_params, batch [B, L], key) -> metrics
    shapes: Any  # the state's ShapeDtypeStructs (jax.eval_shape of init)
    shardings: Any  # the state's NamedShardings: the factors and their Adam moments by their logical axes


def _adapter_steps(graphdef, mcfg, acfg, optim_cfg, loss_cfg, mesh, remat: str, seed: int) -> _AdapterSteps:
    """The steps of an adapter run whose base (with the adapter ``acfg`` added) has ``graphdef``: the loaded base's
    in a run, an abstract one's in the memory plan (:func:`jaxdlm.training.adapter.abstract_base`)."""
    import jax

    from jaxdlm import adapter as adapter_lib
    from jaxdlm.model import param_layout
    from jaxdlm.training import adapter as tune
    from jaxdlm.training import step as step_lib

    layout = param_layout(mcfg)
    tx = step_lib.make_optimizer(optim_cfg)

    def init_state():
        factors = adapter_lib.Adapter.init(layout, acfg, jax.random.PRNGKey(seed))
        return step_lib.init_state(factors, tx, seed)

    shapes = jax.eval_shape(init_state)
    shardings = _state_shardings(tx, shapes, "params", adapter_lib.adapter_shardings(layout, acfg, mesh), mesh)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    train_step = tune.make_adapter_step(graphdef, tx, loss_cfg, schedule=step_lib.wsd_schedule(optim_cfg),
                                        out_shardings=(shardings, replicated), remat=remat)
    return _AdapterSteps(jax.jit(init_state, out_shardings=shardings), train_step,
                         tune.make_adapter_eval_step(graphdef, loss_cfg), shapes, shardings)


def _load_adapter_run(ck, step: int, meta: dict, mcfg, mesh):
    """The tuned model of an adapter run's checkpoint ``step``: its base rebuilt from ``meta["base"]`` with the
    checkpointed adapter in it (:func:`load_trained`)."""
    import jax

    from jaxdlm import adapter as adapter_lib
    from jaxdlm import sharding as sh
    from jaxdlm.model import add_adapter, param_layout
    from jaxdlm.training import adapter as tune

    acfg, layout = adapter_lib.AdapterConfig.from_dict(meta["adapter"]), param_layout(mcfg)
    target = {"step": _placed(jax.ShapeDtypeStruct((), np.int32), mesh),
              "params": _placed(adapter_lib.Adapter.abstract(layout, acfg),
                                None if mesh is None else adapter_lib.adapter_shardings(layout, acfg, mesh))}
    factors = _restore_partial(ck, step, target)["params"]
    model = add_adapter(tune.load_base(meta["base"], mcfg), acfg, factors)
    return model if mesh is None else sh.shard_model(model, mesh)


def _train_batch(train_ds, cfg, mesh, step: int) -> dict:
    """The global ``[accum, batch_size, L]`` batch of ``step``, rows over ``data`` x ``fsdp``; this process reads
    only its own rows."""
    from jaxdlm import sharding as sh
    from jaxdlm.training import distributed

    shape = (cfg.accum, cfg.batch_size, cfg.data.seq_len)
    sharding = _with_leading_axis(sh.batch_sharding(mesh, 2))
    part = distributed.local_rows(sharding, shape, axis=1)
    return distributed.global_batch(sharding, train_ds.batch(step, cfg.batch_size, cfg.accum, part), shape)


def _eval_batches(eval_ds, cfg, mesh):
    """The global ``[batch_size, L]`` eval batches, sharded like the train batches (this process's rows only)."""
    from jaxdlm import sharding as sh
    from jaxdlm.training import distributed

    shape = (cfg.batch_size, cfg.data.seq_len)
    sharding = sh.batch_sharding(mesh, 2)
    part = distributed.local_rows(sharding, shape, axis=0)
    for rows in eval_ds.eval_batches(cfg.batch_size, cfg.run.eval_batches, part):
        yield distributed.global_batch(sharding, rows, shape)


def _with_leading_axis(sharding):
    """``sharding`` of a ``[B, ...]`` array for ``[A, B, ...]`` (the micro-batch axis is not sharded)."""
    import jax

    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(None, *sharding.spec))


def _resume(ck, cfg, exp: _Experiment, out: str, log) -> tuple[Any, int]:
    """``(state, first step)``: the latest checkpoint of ``out`` (its config checked by
    :func:`_check_same_config` first) restored into the state's shards of this mesh and process count, else a fresh
    state at step 0."""
    if ck.latest_step() is None:
        return exp.init(), 0
    state, meta = ck.restore(exp.abstract)
    start = int(state.step)
    log(f"resumed from step {start} ({meta.get('samples_seen')} samples seen)")
    return state, start


def _check_same_config(ck, cfg, out: str) -> None:
    """Refuses to go on with a run folder whose latest checkpoint was written under another config (only
    ``[mesh]``, ``[run]`` and ``model.remat``, which changes memory but not results, may change).  A field the
    saved config lacks (a run from before that field existed) counts as its default value."""
    from jaxdlm.training.config import default_sections

    saved = ck.restore_meta().get("train_config") or {}
    now = json.loads(json.dumps(cfg.to_dict(), default=str))
    defaults = default_sections()
    changed = [f"{sec}.{k}" for sec in ("model", "data", "objective", "optim", "lora", "adapter")
               for k in sorted(set(saved.get(sec, {})) | set(now.get(sec, {})))
               if saved.get(sec, {}).get(k, defaults.get(sec, {}).get(k)) != now.get(sec, {}).get(k)
               and (sec, k) != ("model", "remat")]
    if saved and changed:
        raise ValueError(f"{out} holds a run with a different config ({', '.join(changed)} changed); "
                         "use a new run.out_dir or restore the original values")


def _write_configs(out: str, mcfg, cfg) -> None:
    with open(os.path.join(out, "model_config.json"), "w", encoding="utf-8") as f:
        json.dump(mcfg.to_dict(), f, indent=1)
    with open(os.path.join(out, "train_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg.to_dict(), f, indent=1, default=str)


def _log_records(out: str) -> list[dict]:
    path = os.path.join(out, "log.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _truncate_log(out: str, start: int) -> None:
    """Drops the ``log.jsonl`` records a run starting at ``start`` writes again: those after the restored step
    (and, for a fresh start, every record), so a resumed run never repeats a step."""
    path = os.path.join(out, "log.jsonl")
    if not os.path.isfile(path):
        return
    keep = [r for r in _log_records(out) if start and r["step"] <= start]
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in keep)
    os.replace(path + ".tmp", path)


def _last_metrics(out: str) -> dict:
    """The last train record of ``log.jsonl`` with the last eval's metrics as ``eval_*`` (what :func:`_loop`
    returns)."""
    last = {}
    for rec in _log_records(out):
        if rec["kind"] == "train":
            last = dict(rec, **{k: v for k, v in last.items() if k.startswith("eval_")})
        elif rec["kind"] == "eval":
            last.update({f"eval_{k}": v for k, v in rec.items() if k not in ("kind", "step", "time")})
    return last


_SHOWN_METRICS = ("loss", "ar_loss", "diff_loss", "match", "accept")


def _loop(cfg, exp: _Experiment, state, train_ds, ck, out: str, start: int, max_steps, progress: bool, log,
          mesh, peak_tflops: float | None = None) -> dict:
    """Steps ``start .. stop - 1`` with the periodic log records, evaluations and checkpoints of ``cfg.run``
    (all three at the last step); returns the last train metrics with the last eval's as ``eval_*``.  A SIGTERM
    or SIGINT stops it at a step every process agrees on, after a checkpoint there (:class:`Stopped`).  Train
    records carry ``tokens_per_s`` and ``mfu`` of the steps since the previous record (:func:`_meter`)."""
    import jax
    from tqdm.auto import tqdm

    from jaxdlm.training import distributed

    total = cfg.optim.total_steps
    stop = total if max_steps is None else min(total, start + max_steps)
    main = distributed.is_main()
    last = {}
    logf = open(os.path.join(out, "log.jsonl"), "a", encoding="utf-8") if main else None

    def every(n, done):
        return n and done % n == 0 or done == stop

    meter = _meter(cfg, exp, mesh, start, peak_tflops)

    def record(kind, step, metrics):
        values = {k: float(v) for k, v in metrics.items()}  # waits for the step
        rec = {"kind": kind, "step": step, "time": time.time(), **values,
               **(meter.read(step) if kind == "train" else {})}
        if logf is not None:
            logf.write(json.dumps(rec) + "\n")
            logf.flush()
        return rec

    def evaluate(done):
        ev = record("eval", done, exp.evaluate(state))
        log(f"step {done}: eval " + " ".join(f"{k}={v:.4f}" for k, v in ev.items() if k in _SHOWN_METRICS))
        return ev

    def save(done):
        meta = dict(exp.meta, step=done, samples_seen=done * cfg.batch_size * cfg.accum, train_config=cfg.to_dict())
        ck.save(done, state, json.loads(json.dumps(meta, default=str)))

    try:
        if start < stop and not distributed.is_single_process():
            distributed.compile_everywhere(exp.run_step, state, _train_batch(train_ds, cfg, mesh, start))
        if start == 0 and exp.evaluate is not None and stop > 0:
            evaluate(0)  # the baseline (e.g. AR loss before conversion)
        bar = tqdm(range(start, stop), initial=start, total=total, disable=not progress, desc="train",
                   dynamic_ncols=True)
        with distributed.StopSignals(ck) as signals:
            for s in bar:
                state, metrics = exp.run_step(state, _train_batch(train_ds, cfg, mesh, s))
                done = s + 1
                if every(cfg.run.log_every, done):
                    last = record("train", done, metrics)
                    bar.set_postfix(loss=f"{last['loss']:.4f}", **_speed_postfix(last))
                elif done == start + 1:  # the first step's time is mostly compilation: left out of the speed
                    jax.block_until_ready(metrics)
                    meter.restart(done)
                if exp.evaluate is not None and every(cfg.run.eval_every, done):
                    ev = evaluate(done)
                    last.update({f"eval_{k}": v for k, v in ev.items() if k not in ("kind", "step", "time")})
                saved = every(cfg.run.checkpoint_every, done)
                if saved:
                    save(done)
                if saved or exp.evaluate is not None and every(cfg.run.eval_every, done):
                    jax.block_until_ready(state)
                    meter.restart(done)  # evaluations and checkpoints are not training speed
                if done < stop and signals.reached(done):
                    if not saved:
                        save(done)
                    bar.close()
                    stopped = Stopped(done, signals.received or "SIGTERM")
                    log(f"jaxdlm train: {stopped}")
                    raise stopped
        bar.close()
    finally:
        if logf is not None:
            logf.close()
    return last


def _meter(cfg, exp: _Experiment, mesh, start: int, peak_tflops: float | None):
    """The :class:`~jaxdlm.training.speed.Meter` of a run: every process's tokens of a step, the run's model FLOPs
    per token and the peak of all the mesh's devices (``peak_tflops`` per device, else the known peak of the
    device kind, else unknown)."""
    from jaxdlm.training import speed

    peak = speed.peak_tflops(mesh.devices.flat[0].device_kind, peak_tflops)
    return speed.Meter(cfg.accum * cfg.batch_size * cfg.data.seq_len, exp.flops_per_token,
                       None if peak is None else peak * 1e12 * mesh.size, start)


def _speed_postfix(rec: dict) -> dict:
    """The progress bar's speed fields of a train record (those that are known)."""
    out = {}
    if rec.get("tokens_per_s") is not None:
        out["tok/s"] = f"{rec['tokens_per_s']:.4g}"
    if rec.get("mfu") is not None:
        out["mfu"] = f"{rec['mfu']:.1%}"
    return out


def _silent(*_args, **_kwargs) -> None:
    """The ``log`` of processes other than 0."""


@functools.lru_cache(maxsize=8)
def _steps(mcfg, optim_cfg, loss_cfg, compute_dtype: str, mesh, remat: str = "none"):
    """``(tx, train_step, eval_step, state shapes, state shardings)`` of a full experiment on ``mesh``: the train
    step keeps the state in its shardings; ``remat``: ``[model] remat``.  Cached so that resuming in the same
    process reuses the compiled steps (everything here is hashable configuration)."""
    import jax
    import jax.numpy as jnp

    from jaxdlm import sharding as sh
    from jaxdlm.model import Model
    from jaxdlm.training import step as step_lib

    abstract = Model.abstract(mcfg)
    compute = jnp.bfloat16 if compute_dtype == "bfloat16" else None
    tx = step_lib.make_optimizer(optim_cfg)
    shapes = jax.eval_shape(lambda p: step_lib.init_state(p, tx, 0), abstract.params)
    shardings = _state_shardings(tx, shapes, "params", sh.param_shardings(abstract, mesh), mesh)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    train_step = step_lib.make_train_step(abstract.graphdef, tx, loss_cfg, compute_dtype=compute,
                                          schedule=step_lib.wsd_schedule(optim_cfg),
                                          out_shardings=(shardings, replicated), remat=remat)
    eval_step = step_lib.make_eval_step(abstract.graphdef, loss_cfg, compute_dtype=compute, remat=remat)
    return tx, train_step, eval_step, shapes, shardings


def _merge(graphdef, params):
    from flax import nnx

    return nnx.merge(graphdef, params)


def _mean_metrics(it):
    items = list(it)
    if not items:
        return {}
    return {k: float(np.mean([float(m[k]) for m in items])) for k in items[0]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="jaxdlm train", description="Train from a TOML/JSON config file.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_command(args)
    except ValueError as e:
        print(f"jaxdlm train: error: {e}", file=sys.stderr)
        return 2


def add_arguments(parser):
    from jaxdlm.training.distributed import DEFAULT_HEARTBEAT_TIMEOUT_S, EXIT_PREEMPTED

    parser.add_argument("config", help="experiment config (.toml or .json)")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps in this call")
    parser.add_argument("--check", action="store_true",
                        help="validate the config, compile the train step from abstract shapes (no data, no weights) "
                             "and print its memory plan per device; exit 1 when it does not fit")
    parser.add_argument("--json", action="store_true", help="--check: the plan as one JSON object on the last line")
    parser.add_argument("--device-memory", type=int, default=None, metavar="BYTES",
                        help="--check: plan against this many bytes per device instead of the device's own limit")
    parser.add_argument("--peak-tflops", type=float, default=None, metavar="X",
                        help="dense bf16 TFLOP/s of one device, for the mfu of the train records (default: known "
                             "for H100 SXM and H200, else mfu is null)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    group = parser.add_argument_group(
        "many processes (jax.distributed; docs/training.md)",
        "Give all three to run one process of a multi-process job; none: one process, or what JAX detects of a "
        f"SLURM / Open MPI job. SIGTERM or SIGINT: checkpoint at a step every process agrees on, exit "
        f"{EXIT_PREEMPTED}; re-run to resume.")
    group.add_argument("--coordinator", default=None, metavar="HOST:PORT", help="address of process 0's coordinator")
    group.add_argument("--num-processes", type=int, default=None, metavar="N", help="processes in the job")
    group.add_argument("--process-id", type=int, default=None, metavar="I", help="this process, 0 .. N-1")
    group.add_argument("--heartbeat-timeout", type=int, default=DEFAULT_HEARTBEAT_TIMEOUT_S, metavar="SECONDS",
                       help="a process silent this long counts as lost and every other one exits non-zero "
                            f"(default {DEFAULT_HEARTBEAT_TIMEOUT_S})")


def run_command(args) -> int:
    from jaxdlm.training import distributed
    from jaxdlm.training.config import load_config

    cfg = load_config(args.config)
    for flag, value in (("--peak-tflops", args.peak_tflops), ("--device-memory", args.device_memory)):
        if value is not None and not value > 0:
            raise ValueError(f"{flag} {value} must be > 0")
    if args.check:
        print(f"{args.config}: OK")
        return _check_plan(cfg, args)
    distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                           heartbeat_timeout_s=args.heartbeat_timeout)
    try:
        final = train(cfg, max_steps=args.max_steps, progress=not args.no_progress, peak_tflops=args.peak_tflops)
    except Stopped:
        return distributed.EXIT_PREEMPTED
    if distributed.is_main():
        print(json.dumps(final, indent=1))
    return 0


def _check_plan(cfg, args) -> int:
    """``--check`` after validation: the memory plan (:mod:`jaxdlm.training.plan`) printed, as JSON on the last line
    with ``--json``; 1 with one line on stderr (the biggest part, what to change) when it does not fit.  No plan
    (said in one line, and with ``--json`` an object whose ``reason`` says why) for a draft-LoRA run or where this
    machine's devices cannot hold the run's mesh (the plan compiles the step on them)."""
    import jax

    from jaxdlm.training import config as config_lib
    from jaxdlm.training import plan as plan_lib

    reason = None
    if cfg.lora.enabled:
        reason = "not made for lora.enabled=true runs (the plan covers full-parameter and [adapter] runs)"
    else:
        try:
            run_mesh(cfg, config_lib.model_config(cfg))
        except ValueError as e:
            reason = (f"skipped: {e} (the plan compiles the step on this machine's {jax.device_count()} devices; "
                      "run --check where the run's devices are)")
    if reason is not None:
        print(f"memory plan: {reason}")
        if args.json:
            print(json.dumps({"devices": jax.device_count(), "memory": None, "device_memory": None, "fits": None,
                              "reason": reason}))
        return 0
    plan = plan_lib.memory_plan(cfg, device_memory=args.device_memory)
    print(plan_lib.describe(plan))
    if args.json:
        print(json.dumps(plan))
    if plan["fits"] is False:
        print(f"jaxdlm train: {plan_lib.advice(plan, cfg)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
