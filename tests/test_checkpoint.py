"""jaxdlm.save / jaxdlm.load: round trips of trained-model checkpoints, dtype and sharding targets, bad paths."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxdlm
from jaxdlm.checkpoint import CheckpointWriter, load_arrays
from jaxdlm.lora import OProjLoRA


def tiny_config():
    """A tiny random NLD-shaped config (untied head, YaRN)."""
    from jaxdlm.config import ModelConfig
    from jaxdlm.testing import NLD_ROPE

    return ModelConfig(
        model_type="nemotron_labs_diffusion", vocab_size=512, hidden_size=64, intermediate_size=128,
        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, mask_token_id=100, eos_token_ids=(11,),
        bos_token_id=1, block_size=32,
        rope=NLD_ROPE)


def _model_with_lora(seed, rng):
    cfg = tiny_config()
    model = jaxdlm.Model.init(cfg, seed=seed)
    d_in, r = cfg.num_heads * cfg.head_dim, 3
    model.lora = OProjLoRA(jnp.asarray(rng.standard_normal((cfg.num_layers, d_in, r)), jnp.float32),
                           jnp.asarray(rng.standard_normal((cfg.num_layers, r, cfg.hidden_size)), jnp.float32),
                           jnp.asarray(2.5, jnp.float32))
    return model


def test_save_load_round_trip(tmp_path, seed, rng, monkeypatch):
    model = _model_with_lora(seed, rng)
    # several groups: the loader must reassemble the tree from more than one Orbax checkpoint
    monkeypatch.setattr("jaxdlm.checkpoint.GROUP_BYTES", 150_000)
    path = jaxdlm.save(model, tmp_path / "ckpt")
    meta = json.loads((path / "jaxdlm.json").read_text())
    assert meta["has_lora"] and len({e["group"] for e in meta["arrays"].values()}) > 2
    loaded = jaxdlm.load(path)
    assert loaded.config == model.config and loaded.tokenizer is None
    for a, b in zip(jax.tree.leaves(nnx.to_pure_dict(model.params)), jax.tree.leaves(nnx.to_pure_dict(loaded.params))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for k in ("a", "b", "scale"):
        np.testing.assert_array_equal(np.asarray(getattr(loaded.lora, k)), np.asarray(getattr(model.lora, k)))
    tokens = rng.integers(0, model.config.vocab_size, size=(1, 7))
    np.testing.assert_array_equal(np.asarray(loaded.logits(tokens)), np.asarray(model.logits(tokens)))


def test_load_casts_and_shards(tmp_path, seed, rng):
    model = _model_with_lora(seed, rng)
    jaxdlm.save(model, tmp_path / "ckpt")
    bf = jaxdlm.load(tmp_path / "ckpt", dtype=jnp.bfloat16)
    assert bf.dtype == jnp.bfloat16 and bf.lora.a.dtype == jnp.bfloat16 and bf.lora.scale.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(bf.params["embed"][...], np.float32),
                                  np.asarray(model.params["embed"][...].astype(jnp.bfloat16), np.float32))
    seen = []
    device = jax.devices()[0]

    def sharding(path):
        seen.append(path)
        return jax.sharding.SingleDeviceSharding(device)

    jaxdlm.load(tmp_path / "ckpt", sharding=sharding)
    assert ("layers", "q_proj") in seen and ("embed",) in seen and ("lora", "a") in seen
    raw = load_arrays(tmp_path / "ckpt", ["layers/q_proj"])
    assert set(raw) == {"layers/q_proj"}
    np.testing.assert_array_equal(np.asarray(raw["layers/q_proj"]), np.asarray(model.params["layers"]["q_proj"][...]))


def test_save_is_atomic_and_overwrite_guarded(tmp_path, seed, rng, monkeypatch):
    model = _model_with_lora(seed, rng)
    path = tmp_path / "ckpt"
    with pytest.raises(ValueError, match="already exists"):
        (tmp_path / "ckpt").mkdir()
        jaxdlm.save(model, path)
    path.rmdir()
    jaxdlm.save(model, path)
    before = (path / "jaxdlm.json").read_text()

    def boom(self, *a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(CheckpointWriter, "write_lora", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        jaxdlm.save(model, path, overwrite=True)
    assert (path / "jaxdlm.json").read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary folder left behind


def test_save_writes_extra_files_inside_the_atomic_folder(tmp_path, seed, rng):
    model = _model_with_lora(seed, rng)
    path = jaxdlm.save(model, tmp_path / "ckpt", extra_files={"card.json": '{"name": "x"}'})
    assert json.loads((path / "card.json").read_text()) == {"name": "x"}
    assert jaxdlm.load(path).lora is not None  # the extra file does not disturb loading
    for bad in ("../escape.json", "jaxdlm.json", "params"):
        with pytest.raises(ValueError, match="extra_files name"):
            jaxdlm.save(model, tmp_path / "other", extra_files={bad: "{}"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # nothing half-written


def test_load_rejects_non_checkpoints(tmp_path):
    with pytest.raises(ValueError, match="missing does not exist; check the path"):
        jaxdlm.load(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a checkpoint folder"):
        jaxdlm.load(tmp_path / "file")
    (tmp_path / "hf").mkdir()
    with pytest.raises(ValueError, match="is not a jaxdlm checkpoint"):
        jaxdlm.load(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="convert_weights"):
        jaxdlm.load(tmp_path / "hf")
    (tmp_path / "hf" / "jaxdlm.json").write_text(json.dumps({"format": "jaxdlm-checkpoint", "format_version": 99}))
    with pytest.raises(ValueError, match="format_version=99"):
        jaxdlm.load(tmp_path / "hf")


def test_relative_and_home_paths(tmp_path, seed, rng, monkeypatch):
    """Orbax takes absolute paths only: a path relative to the working directory, or under ~, is resolved first by
    save, load, read_metadata and load_arrays."""
    from jaxdlm.checkpoint import read_metadata

    model = _model_with_lora(seed, rng)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert jaxdlm.save(model, "rel/ckpt") == tmp_path / "rel" / "ckpt"
    assert jaxdlm.save(model, "~/ckpt") == tmp_path / "home" / "ckpt"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "rel"]  # no folder named "~"
    np.testing.assert_array_equal(np.asarray(jaxdlm.load("rel/ckpt").lora.a), np.asarray(model.lora.a))
    assert read_metadata("~/ckpt")["has_lora"]
    np.testing.assert_array_equal(np.asarray(load_arrays("~/ckpt", ["embed"])["embed"]),
                                  np.asarray(model.params["embed"][...]))
