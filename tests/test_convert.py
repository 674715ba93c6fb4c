"""convert_weights: Hugging Face safetensors -> jaxdlm checkpoint, round trips against transformers, bad input.

Every checkpoint is a tiny random model built and saved inside the test (no download).
"""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import save_file

import jaxdlm
from convert_weights import ConversionError, convert, main
from convert_weights.safetensors_io import read_header
from hf_models import hf_config_dict, hf_logits, hf_tensors, make_hf
from numerics import rel_err
from jaxdlm.checkpoint import load_arrays
from jaxdlm.model import forward

TOL = 1e-5
ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------- helpers


def write_nld(folder: Path, hf, *, dtype=np.float32, shards: int = 1, tensors=None, config=None) -> dict:
    """Saves ``hf`` in the NLD layout (encoder.* / diffusion_head); sharded with an index when shards > 1."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.astype(dtype) for k, v in hf_tensors(hf, "nld").items()} if tensors is None else tensors
    cfg = hf_config_dict(hf, "nld") if config is None else config
    (folder / "config.json").write_text(json.dumps(cfg))
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"))
        return tensors
    keys = list(tensors)
    weight_map = {}
    for i, part in enumerate(np.array_split(np.arange(len(keys)), shards)):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({keys[j]: tensors[keys[j]] for j in part}, str(folder / name))
        weight_map.update({keys[j]: name for j in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return tensors


def write_lora(folder: Path, hf, rng, *, r=4, alpha=8.0, layers=None, targets=("o_proj",), a_rank=None,
               prefix="base_model.model.encoder.layers"):
    """A PEFT adapter: lora_A [r, heads*head_dim], lora_B [hidden, r] per layer (o_proj)."""
    cfg = hf.config
    d_in, h = cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size
    layers = range(cfg.num_hidden_layers) if layers is None else layers
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": list(targets), "lora_dropout": 0.0}))
    tensors = {}
    for i in layers:
        tensors[f"{prefix}.{i}.self_attn.o_proj.lora_A.weight"] = (
            0.3 * rng.standard_normal((a_rank or r, d_in))).astype(np.float32)
        tensors[f"{prefix}.{i}.self_attn.o_proj.lora_B.weight"] = (0.3 * rng.standard_normal((h, r))).astype(np.float32)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return tensors


def run(argv, capsys):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def convert_ok(src, dst, capsys, *extra):
    rc, out, err = run([src, dst, "--quiet", *extra], capsys)
    assert rc == 0, err
    return out


def siblings_clean(dst: Path):
    """No temporary or backup folders left next to OUT_DIR."""
    return not [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.")]


# ------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("case", ["ministral3", "llama_tied", "llama_untied_llama3", "qwen3"])
def test_round_trip_matches_transformers(case, tmp_path, seed, rng, capsys):
    hf = make_hf(case, seed)
    hf.save_pretrained(tmp_path / "hf")  # safetensors (transformers >= 5 writes nothing else)
    convert_ok(tmp_path / "hf", tmp_path / "out", capsys)
    model = jaxdlm.load(tmp_path / "out")
    assert model.config.model_type == hf.config.model_type and model.lora is None
    assert model.config.tie_word_embeddings == hf.config.tie_word_embeddings
    tokens = rng.integers(0, hf.config.vocab_size, size=(2, 11))
    assert rel_err(model.logits(tokens), hf_logits(hf, tokens)) <= TOL
    meta = json.loads((tmp_path / "out" / "jaxdlm.json").read_text())
    assert meta["dtype"] == "float32" and meta["source"] == str((tmp_path / "hf").resolve())
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == json.loads(
        (tmp_path / "hf" / "config.json").read_text())
    assert siblings_clean(tmp_path / "out")


def test_nld_round_trip_and_load_dtype(tmp_path, seed, rng, capsys):
    hf = make_hf("nld", seed)
    write_nld(tmp_path / "hf", hf)
    out = convert_ok(tmp_path / "hf", tmp_path / "out", capsys)
    assert out == ""  # --quiet
    model = jaxdlm.load(tmp_path / "out")
    assert model.config.is_nld and model.config.mask_token_id == 5 and model.dtype == jnp.float32
    tokens = rng.integers(0, 96, size=(2, 12))
    assert rel_err(model.logits(tokens), hf_logits(hf, tokens)) <= TOL
    # restoring into another dtype casts every array exactly like a host-side cast
    bf = jaxdlm.load(tmp_path / "out", dtype=jnp.bfloat16)
    assert bf.dtype == jnp.bfloat16
    for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(bf.params)):
        assert b.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a).astype(ml_dtypes.bfloat16))


def test_sharded_checkpoints(tmp_path, seed, rng, capsys):
    # transformers' own sharding (AR, tied) and a hand-sharded NLD checkpoint with an index
    hf = make_hf("qwen3", seed)
    hf.save_pretrained(tmp_path / "qwen", max_shard_size="20KB")
    shards = sorted(p.name for p in (tmp_path / "qwen").glob("*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "qwen" / "model.safetensors.index.json").is_file()
    convert_ok(tmp_path / "qwen", tmp_path / "out_qwen", capsys)
    tokens = rng.integers(0, 96, size=(2, 9))
    assert rel_err(jaxdlm.load(tmp_path / "out_qwen").logits(tokens), hf_logits(hf, tokens)) <= TOL

    nld = make_hf("nld", seed + 1)
    write_nld(tmp_path / "nld", nld, shards=3)
    convert_ok(tmp_path / "nld", tmp_path / "out_nld", capsys)
    meta = json.loads((tmp_path / "out_nld" / "jaxdlm.json").read_text())
    assert len(meta["source_files"]) == 3
    assert rel_err(jaxdlm.load(tmp_path / "out_nld").logits(tokens), hf_logits(nld, tokens)) <= TOL


def test_lora_is_w_plus_scaled_ba(tmp_path, seed, rng, capsys):
    """Draft o_proj = W + (alpha/r) B A: our LoRA forward equals transformers with the merged weight."""
    hf = make_hf("nld", seed)
    write_nld(tmp_path / "hf", hf)
    r, alpha = 4, 12.0
    lora = write_lora(tmp_path / "hf" / "linear_spec_lora", hf, rng, r=r, alpha=alpha)
    out = convert_ok(tmp_path / "hf", tmp_path / "out", capsys, "--dtype", "float32")
    assert out == ""
    rc, out, err = run([tmp_path / "hf", tmp_path / "out2"], capsys)  # not quiet: says it found the adapter
    assert rc == 0 and "linear_spec_lora" in out and "auto-detected" in out and err == ""
    model = jaxdlm.load(tmp_path / "out")
    assert model.lora is not None and float(model.lora.scale) == alpha / r
    assert model.lora.a.shape == (2, 4 * 16, r) and model.lora.b.shape == (2, r, 48)

    tokens = rng.integers(0, 96, size=(2, 10))
    ours, _ = forward(model.module, jnp.asarray(tokens), kind="causal", lora=model.lora)
    plain = np.asarray(model.logits(tokens))
    with torch.no_grad():
        for i, layer in enumerate(hf.model.layers):
            a = torch.as_tensor(lora[f"base_model.model.encoder.layers.{i}.self_attn.o_proj.lora_A.weight"])
            b = torch.as_tensor(lora[f"base_model.model.encoder.layers.{i}.self_attn.o_proj.lora_B.weight"])
            layer.self_attn.o_proj.weight += (alpha / r) * b @ a
    merged = hf_logits(hf, tokens)
    assert rel_err(ours, merged) <= TOL
    assert rel_err(plain, merged) > 1e-2  # the adapter really changes the output

    # an explicit --lora folder elsewhere gives the same arrays
    (tmp_path / "hf" / "linear_spec_lora").rename(tmp_path / "adapter")
    convert_ok(tmp_path / "hf", tmp_path / "out3", capsys, "--lora", tmp_path / "adapter")
    again = jaxdlm.load(tmp_path / "out3")
    for k in ("a", "b", "scale"):
        np.testing.assert_array_equal(np.asarray(getattr(again.lora, k)), np.asarray(getattr(model.lora, k)))


def test_bf16_bit_exact_and_float32_on_request(tmp_path, seed, capsys):
    hf = make_hf("nld", seed)
    src = write_nld(tmp_path / "hf", hf, dtype=ml_dtypes.bfloat16)
    convert_ok(tmp_path / "hf", tmp_path / "keep", capsys)             # --dtype keep (default)
    convert_ok(tmp_path / "hf", tmp_path / "f32", capsys, "--dtype", "float32")
    keep, f32 = load_arrays(tmp_path / "keep"), load_arrays(tmp_path / "f32")
    expect = {
        "embed": src["encoder.embed_tokens.weight"],
        "head": src["diffusion_head.weight"].T,
        "layers/q_proj": np.stack([src[f"encoder.layers.{i}.self_attn.q_proj.weight"].T for i in range(2)]),
        "layers/down_proj": np.stack([src[f"encoder.layers.{i}.mlp.down_proj.weight"].T for i in range(2)]),
        "layers/mlp_norm/weight": np.stack([src[f"encoder.layers.{i}.post_attention_layernorm.weight"]
                                            for i in range(2)]),
    }
    for name, ref in expect.items():
        got = np.asarray(keep[name])
        assert got.dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(got.view(np.uint16), ref.view(np.uint16))
        got32 = np.asarray(f32[name])
        assert got32.dtype == np.float32
        np.testing.assert_array_equal(got32, ref.astype(np.float32))
    assert jaxdlm.load(tmp_path / "keep").dtype == jnp.bfloat16


def test_float32_to_bfloat16_rounds_like_torch(tmp_path, seed, capsys):
    hf = make_hf("llama_tied", seed)
    hf.save_pretrained(tmp_path / "hf")
    convert_ok(tmp_path / "hf", tmp_path / "out", capsys, "--dtype", "bfloat16")
    got = np.asarray(load_arrays(tmp_path / "out", ["embed"])["embed"])
    ref = hf.model.embed_tokens.weight.detach().to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(got.view(np.uint16), ref)


def test_tokenizer_files_copied_and_loaded(tmp_path, seed, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "hello", "world", "diffusion", "jax"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    hf = make_hf("nld", seed)
    write_nld(tmp_path / "hf", hf)
    fast.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }} {% endfor %}")
    rc, out, err = run([tmp_path / "hf", tmp_path / "out"], capsys)
    assert rc == 0 and "tokenizer.json" in out
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "hf" / name).read_bytes()
    model = jaxdlm.load(tmp_path / "out")
    assert model.tokenizer is not None
    text = "hello jax diffusion world"
    assert model.tokenizer(text)["input_ids"] == fast(text)["input_ids"] == [3, 6, 5, 4]
    assert jaxdlm.load(tmp_path / "out", tokenizer=False).tokenizer is None


# ------------------------------------------------------------------------------------------- bad input


@pytest.fixture
def tiny(tmp_path, seed):
    """A valid tiny NLD checkpoint folder and its tensors."""
    hf = make_hf("nld", seed, vocab=32, layers=2)
    tensors = write_nld(tmp_path / "hf", hf)
    return tmp_path / "hf", tensors, hf


def _break(kind, hf_dir: Path, tensors, hf, rng, tmp_path):
    """Breaks a valid checkpoint; returns (argv prefix, expected substrings of the error)."""
    out = tmp_path / "out"
    if kind == "missing_dir":
        return [tmp_path / "nope", out], ["does not exist", "nope"]
    if kind == "missing_config":
        (hf_dir / "config.json").unlink()
        return [hf_dir, out], ["no config.json"]
    if kind == "model_type":
        cfg = json.loads((hf_dir / "config.json").read_text())
        (hf_dir / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
        return [hf_dir, out], ["model_type='gpt2' is not supported", "nemotron_labs_diffusion"]
    if kind == "missing_tensor":
        t = dict(tensors)
        del t["encoder.layers.1.mlp.up_proj.weight"]
        write_nld(hf_dir, hf, tensors=t)
        return [hf_dir, out], ["missing tensor encoder.layers.1.mlp.up_proj.weight"]
    if kind == "unexpected_tensor":
        t = {**tensors, "encoder.layers.0.self_attn.q_proj.bias": np.ones(64, np.float32)}
        write_nld(hf_dir, hf, tensors=t)
        return [hf_dir, out], ["unexpected tensor encoder.layers.0.self_attn.q_proj.bias"]
    if kind == "shape":
        t = {**tensors, "encoder.layers.1.self_attn.k_proj.weight": np.ones((8, 48), np.float32)}
        write_nld(hf_dir, hf, tensors=t)
        return [hf_dir, out], ["encoder.layers.1.self_attn.k_proj.weight", "[8, 48]", "[16, 48]"]
    if kind == "dtype":
        t = {**tensors, "encoder.norm.weight": np.ones(48, np.int32)}
        write_nld(hf_dir, hf, tensors=t)
        return [hf_dir, out], ["encoder.norm.weight", "I32", "BF16, F16 or F32"]
    if kind == "mixed_dtype_keep":
        t = {**tensors, "encoder.norm.weight": tensors["encoder.norm.weight"].astype(ml_dtypes.bfloat16)}
        write_nld(hf_dir, hf, tensors=t)
        return [hf_dir, out], ["mixes dtypes", "--dtype bfloat16"]
    if kind == "truncated":
        f = hf_dir / "model.safetensors"
        f.write_bytes(f.read_bytes()[:-100])
        return [hf_dir, out], ["model.safetensors is truncated"]
    if kind == "corrupted":
        f = hf_dir / "model.safetensors"
        data = bytearray(f.read_bytes())
        data[8:20] = b"{{{{{{{{{{{{"
        f.write_bytes(bytes(data))
        return [hf_dir, out], ["model.safetensors is corrupted", "not valid JSON"]
    if kind == "missing_shard":
        (hf_dir / "model.safetensors").unlink()
        write_nld(hf_dir, hf, tensors=tensors, shards=2)
        (hf_dir / "model-00002-of-00002.safetensors").unlink()
        return [hf_dir, out], ["model-00002-of-00002.safetensors", "missing shard"]
    if kind == "pickles_only":
        (hf_dir / "model.safetensors").unlink()
        marker = tmp_path / "UNPICKLED"
        # a pickle that would create a file if anyone unpickled it
        (hf_dir / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(str(marker))))
        return [hf_dir, out], ["pytorch_model.bin", "never loaded", "safetensors"]
    if kind == "out_exists":
        out.mkdir()
        (out / "keep.txt").write_text("precious")
        return [hf_dir, out], ["already exists", "--overwrite"]
    if kind == "overwrite_foreign":
        out.mkdir()
        (out / "keep.txt").write_text("precious")
        return [hf_dir, out, "--overwrite"], ["not a jaxdlm checkpoint", "refusing"]
    if kind == "out_inside":
        return [hf_dir, hf_dir / "converted"], ["inside HF_DIR"]
    if kind == "out_same":
        return [hf_dir, hf_dir], ["inside HF_DIR"]
    if kind == "lora_rank":
        write_lora(hf_dir / "linear_spec_lora", hf, rng, r=4, a_rank=3)
        return [hf_dir, out], ["lora_A", "[3, 64]", "[4, 64]", "r=4"]
    if kind == "lora_targets":
        write_lora(hf_dir / "linear_spec_lora", hf, rng, targets=("q_proj", "o_proj"))
        return [hf_dir, out], ["target_modules", "q_proj", "o_proj only"]
    if kind == "lora_layers":
        write_lora(hf_dir / "linear_spec_lora", hf, rng, layers=[0])
        return [hf_dir, out], ["layer 1", "the model has 2"]
    if kind == "lora_extra_layer":
        write_lora(hf_dir / "adapter", hf, rng, layers=[0, 1, 2])
        return [hf_dir, out, "--lora", hf_dir / "adapter"], ["layer 2", "2 layers"]
    if kind == "lora_missing_dir":
        return [hf_dir, out, "--lora", tmp_path / "no_adapter"], ["no_adapter", "does not exist"]
    if kind == "quantize_float32":
        return [hf_dir, out, "--quantize", "int8", "--dtype", "float32"], ["--quantize int8", "--dtype float32 asks "
                                                                           "for full precision"]
    if kind == "quantize_int4_groups":
        return [hf_dir, out, "--quantize", "int4", "--dtype", "bfloat16"], ["--quantize int4", "hidden_size = 48 is "
                                                                            "not a multiple of 128: use int8 or fp8"]
    if kind == "quantize_head_alone":
        return [hf_dir, out, "--quantize-head"], ["--quantize-head needs --quantize"]
    if kind == "quantized_source":
        cfg = json.loads((hf_dir / "config.json").read_text())
        (hf_dir / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "fp8"}}))
        return [hf_dir, out, "--quantize", "int8", "--dtype", "bfloat16"], ["already quantized", "quant_method fp8"]
    if kind == "quantize_jaxdlm_checkpoint":
        assert main([str(hf_dir), str(tmp_path / "q8"), "--quiet", "--dtype", "bfloat16", "--quantize", "int8"]) == 0
        return [tmp_path / "q8", out, "--quantize", "int8"], ["is a jaxdlm checkpoint (int8 quantized",
                                                              "not a Hugging Face folder"]
    raise AssertionError(kind)


class _Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


BAD = ["missing_dir", "missing_config", "model_type", "missing_tensor", "unexpected_tensor", "shape", "dtype",
       "mixed_dtype_keep", "truncated", "corrupted", "missing_shard", "pickles_only", "out_exists",
       "overwrite_foreign", "out_inside", "out_same", "lora_rank", "lora_targets", "lora_layers",
       "lora_extra_layer", "lora_missing_dir", "quantize_float32", "quantize_int4_groups",
       "quantize_head_alone", "quantized_source", "quantize_jaxdlm_checkpoint"]


@pytest.mark.parametrize("kind", BAD)
def test_bad_input_one_line_no_output(kind, tiny, tmp_path, rng, capsys):
    hf_dir, tensors, hf = tiny
    argv, expect = _break(kind, hf_dir, tensors, hf, rng, tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    hf_before = sorted(str(p) for p in hf_dir.rglob("*")) if hf_dir.exists() else []
    rc, out, err = run(argv, capsys)
    assert rc != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("convert-weights: error: ") and "Traceback" not in err
    for s in expect:
        assert s in lines[0], (s, lines[0])
    # nothing written: no new entries next to OUT_DIR, nothing inside HF_DIR, OUT_DIR untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (sorted(str(p) for p in hf_dir.rglob("*")) if hf_dir.exists() else []) == hf_before
    if kind in ("out_exists", "overwrite_foreign"):
        assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
    else:
        assert not (tmp_path / "out").exists()
    assert not (tmp_path / "UNPICKLED").exists()


@pytest.mark.parametrize("text,what", [("{\"model_type\": ", "is not valid JSON"), ("[1, 2]", "holds a JSON list"),
                                       (b"\xff\xfe{}", "is not valid JSON")])
def test_corrupt_config_json_is_named_once(text, what, tiny, tmp_path, capsys):
    hf_dir, _, _ = tiny
    config = hf_dir / "config.json"
    config.write_bytes(text if isinstance(text, bytes) else text.encode())
    rc, _, err = run([hf_dir, tmp_path / "out"], capsys)
    assert rc == 2 and err.count("\n") == 1, err
    assert err.count(str(config)) == 1 and f"{config} {what}" in err, err


def test_debug_shows_the_exception(tiny, tmp_path, capsys):
    hf_dir, _, _ = tiny
    (hf_dir / "config.json").unlink()
    with pytest.raises(ConversionError, match="no config.json"):
        main([str(hf_dir), str(tmp_path / "out"), "--debug"])
    assert not (tmp_path / "out").exists()


def test_failure_while_writing_leaves_nothing(tiny, tmp_path, capsys, monkeypatch):
    """A crash after some groups were written: no OUT_DIR (or the old one intact with --overwrite)."""
    import jaxdlm.checkpoint as ckpt

    hf_dir, _, _ = tiny
    out = tmp_path / "out"
    calls = []
    real_save = ckpt._orbax_save

    def flaky_save(directory, tree):
        calls.append(directory)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_save(directory, tree)

    monkeypatch.setattr(ckpt, "GROUP_BYTES", 1)  # one group per array, so the failure hits mid-way
    monkeypatch.setattr(ckpt, "_orbax_save", flaky_save)
    rc, _, err = run([hf_dir, out, "--quiet"], capsys)
    assert rc != 0 and len(err.strip().splitlines()) == 1 and "No space left" in err
    assert len(calls) == 2 and not out.exists() and siblings_clean(out)

    monkeypatch.setattr(ckpt, "_orbax_save", real_save)
    convert_ok(hf_dir, out, capsys)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    calls.clear()
    monkeypatch.setattr(ckpt, "_orbax_save", flaky_save)
    rc, _, err = run([hf_dir, out, "--quiet", "--overwrite", "--dtype", "bfloat16"], capsys)
    assert rc != 0 and len(err.strip().splitlines()) == 1
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before and siblings_clean(out)


def test_overwrite_replaces_a_checkpoint(tiny, tmp_path, capsys):
    hf_dir, _, _ = tiny
    out = tmp_path / "out"
    convert_ok(hf_dir, out, capsys, "--dtype", "float32")
    convert_ok(hf_dir, out, capsys, "--dtype", "bfloat16", "--overwrite")
    assert jaxdlm.load(out).dtype == jnp.bfloat16 and siblings_clean(out)


def test_command_line_subprocess(tiny, tmp_path):
    """The real command: one stderr line on error (no library warnings), exit 0 and a loadable folder on success."""
    hf_dir, _, _ = tiny
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    rel = os.path.relpath(hf_dir, tmp_path)  # relative paths, as typed in a shell (Orbax wants absolute ones)
    bad = subprocess.run([sys.executable, "-m", "convert_weights", rel, os.path.join(rel, "sub")],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "inside HF_DIR" in bad.stderr
    good = subprocess.run([sys.executable, "-m", "convert_weights", rel, "out"],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert good.returncode == 0, good.stderr
    assert f"to {tmp_path / 'out'} as float32" in good.stdout  # the path it wrote, absolute
    assert good.stderr == ""  # no progress bar when stderr is not a terminal
    assert read_header(str(hf_dir / "model.safetensors"))  # input untouched and still valid
    assert jaxdlm.load(tmp_path / "out").config.num_layers == 2


def test_unknown_quantization_scheme_is_an_argument_error(tiny, tmp_path, capsys):
    hf_dir, _, _ = tiny
    with pytest.raises(SystemExit) as e:
        main([str(hf_dir), str(tmp_path / "out"), "--quantize", "int3"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert "argument --quantize: invalid choice: 'int3' (choose from 'int8', 'int4', 'fp8')" in err
    with pytest.raises(ConversionError, match="--quantize 'nf4' is not a quantization scheme; choose one of int8, "
                                              "int4, fp8"):
        convert(hf_dir, tmp_path / "out", quantize="nf4", log=None)
    assert not (tmp_path / "out").exists()


def test_quantized_conversion_equals_quantizing_on_load(tmp_path, seed, capsys):
    """--quantize in the converter and jaxdlm.load(quantize=) give the same bits (from a float32 source: both
    quantize the bfloat16 weight); the scheme is in jaxdlm.json."""
    hf = make_hf("nld", seed, vocab=32, intermediate=256, hidden_size=128, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=64)
    write_nld(tmp_path / "hf", hf)
    convert_ok(tmp_path / "hf", tmp_path / "f32", capsys)
    for scheme, head in (("int8", False), ("int4", True), ("fp8", False)):
        out = tmp_path / f"{scheme}"
        if scheme == "fp8":  # no --dtype: quantizing a float32 checkpoint stores bfloat16, in one line that says so
            rc, said, err = run([tmp_path / "hf", out, "--quantize", scheme], capsys)
            assert rc == 0, err
            note = [line for line in said.splitlines() if "the checkpoint is float32" in line]
            assert len(note) == 1 and "scales in bfloat16" in note[0], said
        else:
            convert_ok(tmp_path / "hf", out, capsys, "--dtype", "bfloat16", "--quantize", scheme,
                       *(["--quantize-head"] if head else []))
        meta = json.loads((out / "jaxdlm.json").read_text())
        assert meta["quantization"] == {"scheme": scheme, "head": head, "group_size": 128 if scheme == "int4" else None}
        assert meta["format_version"] == 2 and meta["dtype"] == "bfloat16"
        storage = {"int8": "int8", "int4": "int4", "fp8": "float8_e4m3fn"}[scheme]
        assert meta["arrays"]["layers/up_proj"]["dtype"] == storage and meta["arrays"]["layers/up_proj"]["shape"] == [
            2, 128, 256]
        assert meta["arrays"]["layers/down_proj_scale"]["shape"] == [2, 2 if scheme == "int4" else 1, 128]
        assert ("head_scale" in json.dumps(meta["arrays"])) == head
        converted = jaxdlm.load(out)
        on_load = jaxdlm.load(tmp_path / "f32", quantize=converted.quant)
        assert converted.quant == on_load.quant and converted.dtype == on_load.dtype == jnp.bfloat16
        a, b = nnx.to_flat_state(converted.params), nnx.to_flat_state(on_load.params)
        assert [p for p, _ in a] == [p for p, _ in b]
        for (path, x), (_, y) in zip(a, b):
            x, y = np.asarray(x[...]), np.asarray(y[...])
            assert x.dtype == y.dtype and x.shape == y.shape, path
            np.testing.assert_array_equal(x.astype(np.float32), y.astype(np.float32), err_msg=str(path))


def test_reader_agrees_with_safetensors(tmp_path, rng):
    """Our header parser + readinto gives the same tensors as safetensors' own (memory-mapping) reader."""
    from safetensors import safe_open

    from convert_weights.safetensors_io import read_into

    tensors = {
        "a.bf16": rng.standard_normal((3, 5)).astype(ml_dtypes.bfloat16),
        "b.f16": rng.standard_normal((7,)).astype(np.float16),
        "c.f32": rng.standard_normal((2, 3, 4)).astype(np.float32),
        "d.empty": np.zeros((0, 4), np.float32),
    }
    save_file(tensors, str(tmp_path / "x.safetensors"), metadata={"format": "pt"})
    entries = read_header(str(tmp_path / "x.safetensors"))
    assert set(entries) == set(tensors)
    with safe_open(str(tmp_path / "x.safetensors"), framework="np") as f:
        for name, entry in entries.items():
            ours, ref = read_into(entry), f.get_tensor(name)
            assert ours.dtype == ref.dtype == tensors[name].dtype and ours.shape == ref.shape
            np.testing.assert_array_equal(ours.view(np.uint8), ref.view(np.uint8))
