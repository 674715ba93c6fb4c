"""Adapter fine-tuning ([adapter]): only the adapter trains, its run folder loads as the tuned model, the merged save
generates like it, an int8 base trains, and bad [adapter] values are named."""

import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx, traverse_util

import jaxdlm
from jaxdlm import adapter as adapter_lib
from jaxdlm import testing
from jaxdlm.model import add_adapter, quantize_model
from jaxdlm.training.checkpointing import Checkpointer
from jaxdlm.training import speed
from jaxdlm.training.config import load_config, parse_config
from jaxdlm.training.run import load_trained, train
from training_utils import counting_data, tiny_config

TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
PEAK_TFLOPS = 0.001  # the runs' --peak-tflops: a CPU has no known peak, and mfu needs one


def _conf(out: str, base_dtype: str, objective: str = "joint") -> dict:
    return {
        "model": {"config": "model.json", "init": "base"},
        "data": {"train": "train.npy", "seq_len": 16, "seed": 2},
        "optim": {"lr": 2e-2, "total_steps": 12, "weight_decay": 0.0, "batch_size": 8},
        "objective": {"objective": objective},
        "adapter": {"enabled": True, "rank": 4, "alpha": 8.0, "targets": TARGETS, "base_dtype": base_dtype},
        "run": {"out_dir": out, "eval_every": 0, "eval_batches": 1, "checkpoint_every": 0, "log_every": 1,
                "seed": 3},
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny base checkpoint (random, sharp head) and two 12-step adapter runs on it (no eval data: the train
    records show the loss): a float32 base on the joint objective and an int8 base on the AR one (a smaller program
    to compile).  Returns ``(folder, base model, float32 tuned model)``."""
    tmp = tmp_path_factory.mktemp("adapter")
    rng = np.random.default_rng(int(np.random.SeedSequence().entropy % 2**31))
    cfg = tiny_config(block_size=4)
    (tmp / "model.json").write_text(json.dumps(cfg.to_dict()))
    np.save(tmp / "train.npy", counting_data(rng, 64, 16, cfg.vocab_size).reshape(-1))
    base = testing.tiny_model(int(rng.integers(2**31)), cfg, head_scale=10.0)
    jaxdlm.save(base, tmp / "base")
    for name, base_dtype, objective in (("f32", "float32", "joint"), ("int8", "int8", "ar")):
        (tmp / f"{name}.json").write_text(json.dumps(_conf(name, base_dtype, objective)))
        train(load_config(tmp / f"{name}.json"), progress=False, log=lambda *_: None, peak_tflops=PEAK_TFLOPS)
    return tmp, base, load_trained(tmp / "f32")


def _assert_loss_falls(run) -> None:
    """The train loss of the last 4 of 12 steps is well below that of the first 2 (about 4.3 -> 2.3)."""
    losses = [r["loss"] for r in map(json.loads, open(run / "log.jsonl")) if r["kind"] == "train"]
    assert len(losses) == 12 and np.mean(losses[-4:]) < 0.75 * np.mean(losses[:2]), losses


def _base_leaves(model) -> dict:
    """The model's parameters other than the adapter factors (flat path -> host array)."""
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(nnx.to_pure_dict(model.params)).items()
            if not k[-1].endswith((adapter_lib.A_SUFFIX, adapter_lib.B_SUFFIX))}


def test_adapter_run_trains_only_the_adapter(runs):
    runs, base, tuned = runs
    _assert_loss_falls(runs / "f32")
    assert tuned.adapter_config == adapter_lib.AdapterConfig(4, 8.0, tuple(TARGETS))
    factors = adapter_lib.adapter_of(tuned)
    assert sorted(factors.b) == sorted(TARGETS) and all(float(np.abs(b).max()) > 0 for b in factors.b.values())
    # the tuned model's base is bit-identical to the checkpoint the run started from
    want, got = _base_leaves(base), _base_leaves(tuned)
    assert sorted(want) == sorted(got)
    for k in want:
        np.testing.assert_array_equal(want[k], got[k], err_msg=str(k))
    # the checkpoint holds the adapter (and its optimizer state), not the base
    ck = Checkpointer(runs / "f32" / "checkpoints")
    try:
        meta = ck.restore_meta()
        state_dir = f"{ck.directory}/{ck.latest_step()}/state"
    finally:
        ck.close()
    tree = ocp.PyTreeCheckpointer().metadata(state_dir).item_metadata.tree  # what is stored: names and shapes
    assert meta["kind"] == "adapter" and meta["base"] == {"init": str(runs / "base"), "seed": 0, "step": None,
                                                          "dtype": "float32"}
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    names = {jax.tree_util.keystr(p) for p, _ in leaves}
    assert not any("embed" in n or "head" in n for n in names), sorted(names)
    adapter_size = sum(a.size + b.size for a, b in zip(factors.a.values(), factors.b.values()))
    stored = sum(int(np.prod(leaf.shape)) for _, leaf in leaves)
    assert adapter_size * 3 <= stored < adapter_size * 3 + 16, (stored, adapter_size)  # factors + Adam's 2 moments


def test_merged_save_generates_like_the_adapter_model(runs, tmp_path):
    _, base, tuned = runs
    with pytest.raises(ValueError, match="carries an adapter.*pass merge_adapter=True"):
        jaxdlm.save(tuned, tmp_path / "refused")
    jaxdlm.save(tuned, tmp_path / "merged", merge_adapter=True)
    merged = jaxdlm.load(tmp_path / "merged")
    assert merged.adapter_config is None and merged.dtype == tuned.dtype
    tokens = counting_data(np.random.default_rng(0), 2, 12, tuned.config.vocab_size)
    np.testing.assert_allclose(merged.logits(tokens), tuned.logits(tokens), rtol=1e-4, atol=1e-4)
    assert float(np.abs(tuned.logits(tokens) - base.logits(tokens)).max()) > 1e-2  # the adapter matters
    # greedy generation; the merged model runs through the adapter model's compiled program with a zero adapter
    # added (y + 0 is y exactly: the tokens are the merged weights'), so one program compiles, not two
    prompts = [row[:5] for row in tokens]
    want = jaxdlm.generate(tuned, prompts, mode="ar", max_new_tokens=8, temperature=0.0)
    zero = add_adapter(merged, tuned.adapter_config)
    assert zero.graphdef == tuned.graphdef
    got = jaxdlm.generate(zero, prompts, mode="ar", max_new_tokens=8, temperature=0.0)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.lengths, want.lengths)


def test_int8_base_trains(runs):
    runs, base, _ = runs
    _assert_loss_falls(runs / "int8")
    # the speed of every train record counts an adapter step's FLOPs (no weight gradients of the base)
    cfg = load_config(runs / "int8.json")
    flops = speed.adapter_flops_per_token(tiny_config(block_size=4), cfg.objective, cfg.data.seq_len,
                                          cfg.adapter.adapter_config())
    assert flops < speed.train_flops_per_token(tiny_config(block_size=4), cfg.objective, cfg.data.seq_len)
    for r in map(json.loads, open(runs / "int8" / "log.jsonl")):
        if r["kind"] == "train":
            assert r["tokens_per_s"] > 0, r
            assert r["mfu"] == pytest.approx(r["tokens_per_s"] * flops / (PEAK_TFLOPS * 1e12 * jax.device_count()),
                                             rel=1e-9), r
    tuned = load_trained(runs / "int8")
    assert tuned.quant.scheme == "int8" and str(tuned.dtype) == "bfloat16"
    want = _base_leaves(quantize_model(base.astype("bfloat16"), "int8"))
    got = _base_leaves(tuned)
    for k in want:
        np.testing.assert_array_equal(want[k], got[k], err_msg=str(k))


@pytest.mark.parametrize("adapter, match", [
    ({"targets": ["q_proj", "qkv"]}, r"adapter.targets=\['q_proj', 'qkv'\]: 'qkv' is not a linear layer; allowed: "
                                     r"\['q_proj'"),
    ({"targets": "q_proj"}, r"adapter.targets='q_proj' must be a list of layer names"),
    ({"targets": []}, r"adapter.targets=\[\]: list each layer once"),
    ({"base_dtype": "fp8"}, r"adapter.base_dtype='fp8' is not supported; allowed: \['float32', 'bfloat16', "
                            r"'int8', 'int4'\]"),
    ({"rank": 0}, r"adapter.rank=0 must be a positive integer"),
    ({"rank": 2.5}, r"adapter.rank=2.5 has the wrong type"),
    ({"base_dtype": "int4"}, r"adapter.base_dtype='int4': int4 quantizes groups of 128"),
    ({"base_dtype": "float32", "compute": "bfloat16"}, r"optim.compute_dtype='bfloat16' with adapter.base_dtype="),
    ({"lora": True}, r"adapter.enabled and lora.enabled are both true"),
])
def test_adapter_config_errors_name_the_field(tmp_path, adapter, match):
    cfg = tiny_config(block_size=4)
    (tmp_path / "model.json").write_text(json.dumps(cfg.to_dict()))
    np.save(tmp_path / "train.npy", np.zeros(64, np.int32))
    (tmp_path / "base").mkdir()
    conf = _conf("run", "bfloat16")
    adapter = dict(adapter)
    if adapter.pop("lora", False):
        conf["lora"] = {"enabled": True}
    conf["optim"]["compute_dtype"] = adapter.pop("compute", "float32")
    conf["adapter"].update(adapter)
    with pytest.raises(ValueError, match=match):
        parse_config(conf, base_dir=str(tmp_path))


def test_a_resumed_adapter_run_keeps_the_base_its_checkpoint_recorded(runs):
    """Resuming rebuilds the base the run's checkpoint names (here: another random seed than the config's), not
    whatever ``model.init`` points at now (a base run may have trained on since)."""
    from jaxdlm.training import adapter as tune
    from jaxdlm.training.config import model_config
    from jaxdlm.training.run import _experiment, run_mesh

    tmp = runs[0]
    conf = dict(_conf("resumed", "float32"), model={"config": "model.json", "init": "random", "seed": 0})
    cfg = parse_config(conf, base_dir=str(tmp))
    mcfg = model_config(cfg)
    recorded = tune.base_record("random", 7, "float32")
    exp = _experiment(cfg, mcfg, None, run_mesh(cfg, mcfg), {"kind": "adapter", "base": recorded})
    assert exp.meta["base"] == recorded
    fresh = _experiment(cfg, mcfg, None, run_mesh(cfg, mcfg))
    assert fresh.meta["base"]["seed"] == 0
