"""Run a training experiment from a config file: ``jaxdlm train CONFIG`` or ``python -m jaxdlm.training.run CONFIG``.

The config is fully validated (:mod:`jaxdlm.training.config`) before any model is built.  The run folder
(``run.out_dir``) receives ``model_config.json``, ``train_config.json``, ``log.jsonl`` (one JSON record per
log / eval event) and ``checkpoints/`` (Orbax).  Re-running the same command resumes from the latest
checkpoint and reaches exactly the params of an uninterrupted run.  :func:`load_trained` turns a run
folder into a :class:`~jaxdlm.model.Model` (with its LoRA when the run trained one).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from typing import Callable, NamedTuple

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
    """A :class:`~jaxdlm.training.data.Dataset` from a ``.npy`` token file or a ``.jsonl`` chat file."""
    from jaxdlm.training import data

    path = cfg.path(path)
    L = cfg.data.seq_len
    if cfg.data.format == "tokens":
        arr = np.load(path)
        if arr.ndim == 1:
            d = data.pack_stream(arr, L, mcfg.block_size)
        elif arr.ndim == 2:
            if arr.shape[1] != L:
                raise ValueError(f"{path}: rows of length {arr.shape[1]} but data.seq_len={L}")
            d = {"tokens": arr.astype(np.int32), "loss_mask": np.ones(arr.shape, bool)}
        else:
            raise ValueError(f"{path}: expected a 1-D token stream or 2-D [N, L] rows, got shape {arr.shape}")
        if d["tokens"].size and (d["tokens"].min() < 0 or d["tokens"].max() >= mcfg.vocab_size):
            raise ValueError(f"{path}: token ids outside the vocabulary [0, {mcfg.vocab_size})")
        return data.Dataset.from_dict(d, seed)
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


def load_trained(run_dir: str, step: int | None = None):
    """The :class:`~jaxdlm.model.Model` of a run folder (relative or ``~`` paths too) at ``step`` (default: latest
    checkpoint), with the run's draft LoRA for a LoRA run.  ``jaxdlm.load(run_dir)`` calls this."""
    import jax

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
        if meta.get("kind") == "lora":
            from jaxdlm.lora import OProjLoRA

            base = load_trained(meta["base_run"], meta.get("base_step"))
            target = {"step": jax.ShapeDtypeStruct((), np.int32), "lora": OProjLoRA.abstract(mcfg, meta["lora_rank"]),
                      "rng": jax.ShapeDtypeStruct((2,), np.uint32)}
            state = _restore_partial(ck, step, target)
            return Model(mcfg, base.graphdef, base.params, lora=state["lora"], tokenizer=base.tokenizer)
        target = {"step": jax.ShapeDtypeStruct((), np.int32), "params": abstract.params}
        state = _restore_partial(ck, step, target)
        return Model(mcfg, abstract.graphdef, state["params"])
    finally:
        ck.close()


def _restore_partial(ck, step, target):
    """Restores only the entries of ``target`` (others, like the optimizer state, are skipped)."""
    return ck.restore({k: v for k, v in target.items() if v is not None}, step, partial=True)[0]


class _Experiment(NamedTuple):
    """What a run steps: the train state, ``run_step(state, batch) -> (state, metrics)``, ``evaluate(state) ->
    metrics`` (``None`` without eval data) and the record saved with each checkpoint."""

    state: dict
    run_step: Callable
    evaluate: Callable | None
    meta: dict


def train(cfg, *, max_steps: int | None = None, progress: bool = True, log=print) -> dict:
    """Runs (or resumes) the experiment ``cfg``; stops after ``max_steps`` optimizer steps in THIS call
    (the schedule still spans ``optim.total_steps``).  Returns the final metrics.
    """
    from jaxdlm.training import config as config_lib
    from jaxdlm.training.checkpointing import Checkpointer

    mcfg = config_lib.model_config(cfg)
    out = cfg.path(cfg.run.out_dir)
    os.makedirs(out, exist_ok=True)
    train_ds = load_dataset(cfg, cfg.data.train, mcfg, cfg.data.seed)
    eval_ds = load_dataset(cfg, cfg.data.eval, mcfg, cfg.data.seed) if cfg.data.eval else None
    if eval_ds is not None and len(eval_ds) < cfg.batch_size:
        raise ValueError(f"data.eval has {len(eval_ds)} sequences, fewer than optim.batch_size={cfg.batch_size}")
    exp = _experiment(cfg, mcfg, eval_ds)
    ck = Checkpointer(os.path.join(out, "checkpoints"), max_to_keep=cfg.run.keep)
    try:
        state, start = _resume(ck, cfg, exp.state, out, log)
        _write_configs(out, mcfg, cfg)
        return _loop(cfg, exp._replace(state=state), train_ds, ck, out, start, max_steps, progress, log)
    finally:
        ck.close()


def _experiment(cfg, mcfg, eval_ds) -> _Experiment:
    """The model to start from (random, or a trained run's) and the full or draft-LoRA experiment around it."""
    from jaxdlm.model import Model
    from jaxdlm.training.checkpointing import Checkpointer

    if cfg.model.init == "random":
        model = Model.init(mcfg, seed=cfg.model.seed)
        base_run, base_step = None, None
    else:
        base_run = cfg.path(cfg.model.init)
        model = load_trained(base_run)
        base_ck = Checkpointer(os.path.join(base_run, "checkpoints"))
        base_step = base_ck.latest_step()
        base_ck.close()
        if model.config.num_params() != mcfg.num_params() or model.config.vocab_size != mcfg.vocab_size:
            raise ValueError(f"model.init={cfg.model.init!r} has a different architecture than model.config")
        model = Model(mcfg, model.graphdef, model.params)
    if cfg.lora.enabled:
        return _lora_experiment(cfg, mcfg, model, eval_ds, base_run, base_step)
    return _full_experiment(cfg, model, eval_ds)


def _full_experiment(cfg, model, eval_ds) -> _Experiment:
    """All parameters train on the configured objective."""
    import jax

    from jaxdlm.training import step as step_lib

    tx, _, run_step, eval_step = _steps(model.graphdef, cfg.optim, cfg.objective, cfg.compute_dtype)
    eval_key = jax.random.PRNGKey(EVAL_NOISE_SEED)

    def evaluate(state):
        return _mean_metrics(eval_step(state["params"], b, jax.random.fold_in(eval_key, i))
                             for i, b in enumerate(eval_ds.eval_batches(cfg.batch_size, cfg.run.eval_batches)))

    return _Experiment(step_lib.init_state(model.params, tx, cfg.run.seed), run_step,
                       evaluate if eval_ds is not None else None, {"kind": "full"})


def _lora_experiment(cfg, mcfg, model, eval_ds, base_run, base_step) -> _Experiment:
    """A draft LoRA trains on the frozen ``model`` (training/lora.py)."""
    import jax
    import jax.numpy as jnp

    from jaxdlm.lora import OProjLoRA
    from jaxdlm.training import lora as lora_lib
    from jaxdlm.training import step as step_lib

    tx = _steps(model.graphdef, cfg.optim, cfg.objective, cfg.compute_dtype)[0]
    lora0 = OProjLoRA.init(mcfg, cfg.lora.rank, cfg.lora.alpha, jax.random.PRNGKey(cfg.run.seed))
    state = dict(lora_lib.init_lora_state(lora0, tx), rng=jax.random.PRNGKey(cfg.run.seed))
    base_params = step_lib.cast_floating(model.params, jnp.bfloat16 if cfg.compute_dtype == "bfloat16" else None)
    lstep = lora_lib.make_lora_step(model.graphdef, tx, target=cfg.lora.target, donate=False)

    def run_step(state, batch):
        flat = {k: v.reshape(-1, v.shape[-1]) for k, v in batch.items()}
        new, metrics = lstep(base_params, {k: state[k] for k in ("lora", "opt_state", "step")}, flat)
        return dict(new, rng=state["rng"]), metrics

    graphdef = model.graphdef
    eval_fn = jax.jit(lambda lora, params, b: lora_lib.draft_loss(
        _merge(graphdef, params), b["tokens"], lora, target=cfg.lora.target, loss_mask=b["loss_mask"])[1])

    def evaluate(state):
        return _mean_metrics(eval_fn(state["lora"], base_params, b)
                             for b in eval_ds.eval_batches(cfg.batch_size, cfg.run.eval_batches))

    meta = {"kind": "lora", "base_run": base_run, "base_step": base_step, "lora_rank": cfg.lora.rank}
    return _Experiment(state, run_step, evaluate if eval_ds is not None else None, meta)


def _resume(ck, cfg, state, out: str, log) -> tuple[dict, int]:
    """``(state, first step)``: the latest checkpoint of ``out`` when there is one (refused when the run's
    config changed since), else the fresh ``state`` at step 0."""
    if ck.latest_step() is None:
        return state, 0
    saved = ck.restore_meta().get("train_config") or {}
    now = json.loads(json.dumps(cfg.to_dict(), default=str))
    changed = [f"{sec}.{k}" for sec in ("model", "data", "objective", "optim", "lora")
               for k in sorted(set(saved.get(sec, {})) | set(now.get(sec, {})))
               if saved.get(sec, {}).get(k) != now.get(sec, {}).get(k)]
    if saved and changed:
        raise ValueError(f"{out} holds a run with a different config ({', '.join(changed)} changed); "
                         "use a new run.out_dir or restore the original values")
    state, meta = ck.restore(state)
    start = int(state["step"])
    log(f"resumed from step {start} ({meta.get('samples_seen')} samples seen)")
    return state, start


def _write_configs(out: str, mcfg, cfg) -> None:
    with open(os.path.join(out, "model_config.json"), "w", encoding="utf-8") as f:
        json.dump(mcfg.to_dict(), f, indent=1)
    with open(os.path.join(out, "train_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg.to_dict(), f, indent=1, default=str)


_SHOWN_METRICS = ("loss", "ar_loss", "diff_loss", "match", "accept")


def _loop(cfg, exp: _Experiment, train_ds, ck, out: str, start: int, max_steps, progress: bool, log) -> dict:
    """Steps ``start .. stop - 1`` with the periodic log records, evaluations and checkpoints of ``cfg.run``
    (all three at the last step); returns the last train metrics with the last eval's as ``eval_*``."""
    import jax.numpy as jnp
    from tqdm.auto import tqdm

    total = cfg.optim.total_steps
    stop = total if max_steps is None else min(total, start + max_steps)
    state, last = exp.state, {}

    def every(n, done):
        return n and done % n == 0 or done == stop

    with open(os.path.join(out, "log.jsonl"), "a", encoding="utf-8") as logf:
        def record(kind, step, metrics):
            rec = {"kind": kind, "step": step, "time": time.time(), **{k: float(v) for k, v in metrics.items()}}
            logf.write(json.dumps(rec) + "\n")
            logf.flush()
            return rec

        def evaluate(done):
            ev = record("eval", done, exp.evaluate(state))
            log(f"step {done}: eval " + " ".join(f"{k}={v:.4f}" for k, v in ev.items() if k in _SHOWN_METRICS))
            return ev

        if start == 0 and exp.evaluate is not None and stop > 0:
            evaluate(0)  # the baseline (e.g. AR loss before conversion)
        bar = tqdm(range(start, stop), initial=start, total=total, disable=not progress, desc="train",
                   dynamic_ncols=True)
        for s in bar:
            batch = train_ds.batch(s, cfg.batch_size, cfg.accum)
            state, metrics = exp.run_step(state, {k: jnp.asarray(v) for k, v in batch.items()})
            done = s + 1
            if every(cfg.run.log_every, done):
                last = record("train", done, metrics)
                bar.set_postfix(loss=f"{last['loss']:.4f}")
            if exp.evaluate is not None and every(cfg.run.eval_every, done):
                ev = evaluate(done)
                last.update({f"eval_{k}": v for k, v in ev.items() if k not in ("kind", "step", "time")})
            if every(cfg.run.checkpoint_every, done):
                meta = dict(exp.meta, step=done, samples_seen=done * cfg.batch_size * cfg.accum,
                            train_config=cfg.to_dict())
                ck.save(done, state, json.loads(json.dumps(meta, default=str)))
        bar.close()
    return last


@functools.lru_cache(maxsize=8)
def _steps(graphdef, optim_cfg, loss_cfg, compute_dtype: str):
    """``(tx, schedule, train_step, eval_step)``, cached so that resuming in the same process reuses the
    compiled steps (everything here is hashable configuration)."""
    import jax.numpy as jnp

    from jaxdlm.training import step as step_lib

    compute = jnp.bfloat16 if compute_dtype == "bfloat16" else None
    tx = step_lib.make_optimizer(optim_cfg)
    schedule = step_lib.wsd_schedule(optim_cfg)
    train_step = step_lib.make_train_step(graphdef, tx, loss_cfg, compute_dtype=compute, schedule=schedule)
    eval_step = step_lib.make_eval_step(graphdef, loss_cfg, compute_dtype=compute)
    return tx, schedule, train_step, eval_step


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
    parser.add_argument("config", help="experiment config (.toml or .json)")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps in this call")
    parser.add_argument("--check", action="store_true", help="only validate the config and exit")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_command(args) -> int:
    from jaxdlm.training.config import load_config

    cfg = load_config(args.config)
    if args.check:
        print(f"{args.config}: OK")
        return 0
    final = train(cfg, max_steps=args.max_steps, progress=not args.no_progress)
    print(json.dumps(final, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
