"""Config-driven runs: resume determinism, periodic eval / checkpoints, config validation by field name."""

import json
import os

import jax
import numpy as np
import pytest

import jaxdlm
from jaxdlm import cli
from jaxdlm.training import checkpointing, speed
from jaxdlm.training.config import load_config, parse_config
from jaxdlm.training.run import load_dataset, load_trained, run_lineage, train
from training_utils import counting_data, tiny_config


def _write_setup(tmp_path, rng, out="run", **sections):
    cfg = tiny_config(block_size=4)
    (tmp_path / "model.json").write_text(json.dumps(cfg.to_dict()))
    np.save(tmp_path / "train.npy", counting_data(rng, 64, 16, cfg.vocab_size).reshape(-1))
    np.save(tmp_path / "eval.npy", counting_data(rng, 8, 16, cfg.vocab_size))
    conf = {
        "model": {"config": "model.json", "seed": 1},
        "data": {"train": "train.npy", "eval": "eval.npy", "seq_len": 16, "seed": 2},
        "optim": {"lr": 3e-3, "total_steps": 50, "warmup_steps": 5, "decay_steps": 10, "weight_decay": 0.0,
                  "batch_size": 8, "accum": 2},
        "objective": {"objective": "joint", "schedule": "position"},
        "run": {"out_dir": out, "eval_every": 25, "eval_batches": 2, "checkpoint_every": 25, "log_every": 1, "keep": 10,
                "seed": 3},
    }
    for k, v in sections.items():
        conf[k] = {**conf.get(k, {}), **v}
    return conf


def _dump(tmp_path, conf, name="exp.json"):
    path = tmp_path / name
    path.write_text(json.dumps(conf))
    return str(path)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """One uninterrupted 50-step joint-objective run (shared: its compiled steps are reused below), its MFU against
    a peak of 1e-3 TFLOP/s per device."""
    tmp_path = tmp_path_factory.mktemp("runs")
    rng = np.random.default_rng(int(np.random.SeedSequence().entropy % 2**31))
    conf = _write_setup(tmp_path, rng, out="straight")
    final = train(load_config(_dump(tmp_path, conf, "a.json")), progress=False, log=lambda *_: None,
                  peak_tflops=1e-3)
    return tmp_path, conf, final


def test_tiny_model_loss_falls_over_50_steps(straight_run):
    tmp_path, conf, final = straight_run
    assert final["step"] == 50 and np.isfinite(final["loss"])
    recs = [json.loads(l) for l in open(tmp_path / "straight" / "log.jsonl")]
    evals = {r["step"]: r for r in recs if r["kind"] == "eval"}
    assert sorted(evals) == [0, 25, 50]  # baseline, periodic, final
    assert sorted(r["step"] for r in recs if r["kind"] == "train") == list(range(1, 51))
    # every train record carries the speed of its steps: tokens/s, and the MFU against the given peak
    flops = speed.train_flops_per_token(load_trained(str(tmp_path / "straight")).config,
                                        load_config(str(tmp_path / "a.json")).objective, conf["data"]["seq_len"])
    for r in recs:
        if r["kind"] == "train":
            assert r["tokens_per_s"] > 0, r
            assert r["mfu"] == pytest.approx(r["tokens_per_s"] * flops / (1e9 * jax.device_count()), rel=1e-9)
    before, after = evals[0], evals[50]
    assert after["ar_loss"] < 0.6 * before["ar_loss"], (before, after)
    assert after["diff_loss"] < 0.8 * before["diff_loss"], (before, after)
    assert after["loss"] < 0.7 * before["loss"]


def test_resumed_run_equals_uninterrupted_run(straight_run):
    tmp_path, conf, _ = straight_run
    conf_b = dict(conf, run=dict(conf["run"], out_dir="resumed"))
    resumed = load_config(_dump(tmp_path, conf_b, "b.json"))
    train(resumed, max_steps=25, progress=False, log=lambda *_: None)  # interrupted after 25 of 50 steps
    ck = checkpointing.Checkpointer(tmp_path / "resumed" / "checkpoints")
    assert ck.latest_step() == 25
    ck.close()
    msgs = []
    train(load_config(_dump(tmp_path, conf_b, "b.json")), progress=False, log=msgs.append)  # fresh objects
    assert any("resumed from step 25" in m for m in msgs)
    # resuming with a changed config is refused, naming the changed field
    conf_c = dict(conf_b, optim=dict(conf_b["optim"], lr=1e-2))
    with pytest.raises(ValueError, match="optim.lr changed"):
        train(load_config(_dump(tmp_path, conf_c, "c.json")), progress=False, log=lambda *_: None)

    a = load_trained(str(tmp_path / "straight"))
    b = load_trained(str(tmp_path / "resumed"))
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # guard: training changed the params between checkpoints
    mid = load_trained(str(tmp_path / "straight"), step=25)
    assert not all(np.array_equal(np.asarray(x), np.asarray(y))
                   for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(mid.params)))
    assert a.logits(np.zeros((1, 8), np.int32)).shape == (1, 8, a.config.vocab_size)


def test_lora_run_from_a_trained_base(straight_run, capsys):
    tmp_path, conf, _ = straight_run
    conf_l = dict(conf, model=dict(conf["model"], init="straight"),
                  optim=dict(conf["optim"], total_steps=4, warmup_steps=0, decay_steps=0, lr=3e-2),
                  lora={"enabled": True, "rank": 4, "alpha": 8.0},
                  run=dict(conf["run"], out_dir="lora", eval_every=0, checkpoint_every=0))
    final = train(load_config(_dump(tmp_path, conf_l, "l.json")), progress=False, log=lambda *_: None)
    assert final["step"] == 4 and {"eval_match", "eval_accept"} <= set(final)
    base = load_trained(str(tmp_path / "straight"))
    drafted = load_trained(str(tmp_path / "lora"))
    assert drafted.lora.a.shape == (base.config.num_layers, base.config.num_heads * base.config.head_dim, 4)
    assert float(np.abs(drafted.lora.b).max()) > 0
    for x, y in zip(jax.tree.leaves(base.params), jax.tree.leaves(drafted.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # the base stayed frozen
    lineage = run_lineage(str(tmp_path / "lora"), str(tmp_path))  # "straight" is relative to the configs
    assert [os.path.basename(r) for r, _ in lineage] == ["lora", "straight"]
    assert lineage[0][1]["lora"]["enabled"] and lineage[1][1]["model"]["init"] == "random"
    # the run folder as a checkpoint: jaxdlm.load and jaxdlm generate / info read the base with the run's LoRA
    loaded = jaxdlm.load(tmp_path / "lora")
    for k in ("a", "b", "scale"):
        np.testing.assert_array_equal(np.asarray(getattr(loaded.lora, k)), np.asarray(getattr(drafted.lora, k)))
    seen = _cli_generate(tmp_path, "lora")
    np.testing.assert_array_equal(np.asarray(seen.lora.b), np.asarray(drafted.lora.b))
    assert cli.main(["info", "--config", str(tmp_path / "lora"), "--no-compile-cache"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "lora" and info["lora"]["rank"] == 4 and info["latest_step"] == 4
    assert info["lora"]["base_run"] == str(tmp_path / "straight")


def _word_tokenizer(folder, vocab: int) -> str:
    """A tokenizer.json of ``vocab`` words (``w0``, ``w1``...), split at spaces."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = os.path.join(folder, "words.json")
    tok.save(path)
    return path


def _cli_generate(tmp_path, run: str):
    """``jaxdlm generate --checkpoint RUN --tokenizer ...`` up to generation (recorded, not run): the model."""
    seen = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli, "run_generate", lambda model, tok, args, **_: seen.append((model, tok)))
        mp.chdir(tmp_path)
        argv = ["generate", "--checkpoint", run, "--tokenizer", _word_tokenizer(tmp_path, 48), "--prompt", "w5 w6",
                "--no-compile-cache"]
        assert cli.main(argv) == 0
    model, tok = seen[0]
    assert tok("w5 w6")["input_ids"] == [5, 6] and model.tokenizer is tok
    return model


def test_a_run_folder_loads_like_a_checkpoint(straight_run, monkeypatch, capsys):
    """jaxdlm.load, jaxdlm generate --checkpoint and jaxdlm info --config take a run folder (relative, or under ~):
    its latest parameters, through load_trained; what load_trained cannot do is refused, naming it."""
    import jax.numpy as jnp

    from jaxdlm.checkpoint import read_metadata

    tmp_path, conf, _ = straight_run
    want = load_trained(str(tmp_path / "straight"))
    monkeypatch.chdir(tmp_path / "straight" / "checkpoints")
    monkeypatch.setenv("HOME", str(tmp_path))
    for got in (load_trained("~/straight"), jaxdlm.load(".."), jaxdlm.load("~/straight", dtype="bfloat16"),
                _cli_generate(tmp_path, "straight")):
        assert got.lora is None and got.config == want.config
        for x, y in zip(jax.tree.leaves(want.params), jax.tree.leaves(got.params)):
            np.testing.assert_array_equal(np.asarray(x.astype(y.dtype)), np.asarray(y))
    assert got.dtype == jnp.float32 and jaxdlm.load("..", dtype="bfloat16").dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="training run folder, read through jaxdlm.training.load_trained, which "
                                         "takes no quantize="):
        jaxdlm.load("..", quantize="int8")
    with pytest.raises(ValueError, match="is a training run folder, not a jaxdlm checkpoint: jaxdlm.load or "
                                         "jaxdlm.training.load_trained reads it"):
        read_metadata("..")
    assert cli.main(["generate", "--checkpoint", "~/straight", "--prompt", "w5", "--no-compile-cache"]) == 2
    assert f"{tmp_path / 'straight'} is a training run folder without tokenizer files: pass --tokenizer PATH" in \
        capsys.readouterr().err
    assert cli.main(["info", "--config", "..", "--no-compile-cache"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["run"] == str(tmp_path / "straight") and info["kind"] == "full" and info["lora"] is None
    assert info["steps"] == [25, 50] and info["latest_step"] == 50
    assert info["num_params"] == sum(x.size for x in jax.tree.leaves(want.params))


def test_config_paths_are_absolute(tmp_path, rng, monkeypatch):
    """Paths of an experiment config resolve against its folder, made absolute (and ~ expanded) once: the run
    folder and the base run recorded in a LoRA run's checkpoints do not depend on the working directory."""
    conf = _write_setup(tmp_path, rng)
    _dump(tmp_path, conf)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    for cfg in (load_config("~/exp.json"), parse_config(conf, base_dir="."), parse_config(conf, base_dir="~")):
        assert cfg.path(cfg.run.out_dir) == str(tmp_path / "run")
        assert cfg.path("~/elsewhere") == str(tmp_path / "elsewhere")


BAD = [
    ({"objective": {"alpha": -1.0}}, "alpha=-1.0"),
    ({"objective": {"schedule": "gauss"}}, "schedule='gauss'"),
    ({"objective": {"normalisation": "sft"}}, "objective.normalisation is not a known field"),
    ({"optim": {"lr": "fast"}}, "optim.lr='fast'"),
    ({"optim": {"batch_size": 0}}, "optim.batch_size=0"),
    ({"optim": {"compute_dtype": "float16"}}, "optim.compute_dtype='float16'"),
    ({"optim": {"warmup_steps": 30, "decay_steps": 30}}, "warmup_steps=30 and decay_steps=30"),
    ({"data": {"seq_len": 18}}, "data.seq_len=18 must be a multiple of the model's block_size=4"),
    ({"data": {"train": "missing.npy"}}, "data.train='missing.npy': file not found"),
    ({"data": {"format": "parquet"}}, "data.format='parquet'"),
    ({"lora": {"enabled": True}}, "lora.enabled=true needs model.init"),
    ({"run": {"eval_every": -1}}, "run.eval_every=-1"),
    ({"model": {"overrides": {"mask_token_id": None}}}, "mask_token_id is None"),
    ({"model": {"overrides": {"block_sz": 8}}}, "model.overrides has unknown fields ['block_sz']"),
    ({"model": {"remat": "half"}}, "model.remat='half' is not supported; allowed: ['none', 'full', 'dots']"),
    ({"trainer": {}}, "unknown config sections ['trainer']"),
]


@pytest.mark.parametrize("change,message", BAD, ids=[m for _, m in BAD])
def test_invalid_config_rejected_by_name_before_compute(tmp_path, rng, change, message):
    conf = _write_setup(tmp_path, rng, **{k: v for k, v in change.items() if k != "trainer"})
    if "trainer" in change:
        conf["trainer"] = {}
    with pytest.raises(ValueError) as e:
        parse_config(conf, base_dir=str(tmp_path))
    assert message in str(e.value)
    # the CLI reports the same error by name, exit status 2, and starts nothing
    path = _dump(tmp_path, conf)
    assert cli.main(["train", path, "--no-compile-cache"]) == 2
    assert not os.path.exists(tmp_path / "run")


def test_valid_config_check_and_toml(tmp_path, rng, capsys):
    conf = _write_setup(tmp_path, rng)
    toml = "\n".join(
        [f"[{sec}]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in vals.items()) for sec, vals in conf.items()])
    path = tmp_path / "exp.toml"
    path.write_text(toml)
    cfg = load_config(str(path))
    assert cfg.optim.total_steps == 50 and cfg.accum == 2 and cfg.data.seq_len == 16
    assert cli.main(["train", str(path), "--check", "--no-compile-cache"]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and f"memory plan per device ({jax.device_count()} devices)" in out
    assert not os.path.exists(tmp_path / "run")


def test_chat_dataset_from_jsonl(tmp_path, rng):
    """SFT data through the runner: a tokenizer.json without chat template (ChatML text), answer-only mask."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<bos>", "<eos>", "<mask>", "<|im_start|>", "<|im_end|>", "user", "assistant", "\n",
             "hi", "hello", "bye"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>", "\n"])
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "tokenizer.json"))
    lines = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello bye"}]},
             {"messages": [{"role": "user", "content": "bye"}, {"role": "assistant", "content": "bye"}]}]
    (tmp_path / "sft.jsonl").write_text("\n".join(json.dumps(l) for l in lines))
    conf = _write_setup(tmp_path, rng, data={"train": "sft.jsonl", "eval": None, "format": "chat",
                                             "tokenizer": "tokenizer.json", "seq_len": 16},
                        objective={"normalization": "sft"})
    cfg = parse_config(conf, base_dir=str(tmp_path))
    ds = load_dataset(cfg, cfg.data.train, tiny_config(block_size=4), 0)
    assert ds.tokens.shape == (2, 16)
    answers = [[words[t] for t, m in zip(row, mask) if m] for row, mask in zip(ds.tokens, ds.loss_mask)]
    assert answers[0][:2] == ["hello", "bye"] and answers[1][0] == "bye"
    assert all("user" not in a and "hi" not in a for a in answers)


def test_resume_check_reads_missing_fields_of_an_older_run_as_defaults(tmp_path):
    """A run folder written before a config field existed (here: no ``[adapter]``, no ``model.remat``) resumes
    under a config that leaves the field at its default, and is refused when the field changed."""
    import json as json_lib

    from jaxdlm.testing import tiny_config
    from jaxdlm.training.config import parse_config
    from jaxdlm.training.run import _check_same_config

    np.save(tmp_path / "t.npy", np.full(64 * 32, 5, np.int32))

    def config(**adapter):
        conf = {"model": {"config": tiny_config().to_dict()}, "data": {"train": "t.npy", "seq_len": 32}}
        return parse_config(dict(conf, adapter=adapter) if adapter else conf, base_dir=str(tmp_path))

    class Saved:  # the checkpoint metadata of an older run
        def __init__(self, cfg):
            d = json_lib.loads(json_lib.dumps(cfg.to_dict(), default=str))
            del d["adapter"], d["model"]["remat"]
            self.meta = {"train_config": d}

        def restore_meta(self):
            return self.meta

    old = Saved(config())
    _check_same_config(old, config(), "run")  # nothing changed: no error
    with pytest.raises(ValueError, match=r"adapter\.enabled.*changed"):
        _check_same_config(old, config(enabled=True), "run")
