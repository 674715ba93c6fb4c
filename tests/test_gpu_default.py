"""The GPU default-model pipeline's CPU-side pieces (experiments/gpu_default): pack/unpack round trip, the corpus
hold-out on a fake site-packages tree, and the config renderer."""

import importlib.util
import json
import os
import tomllib

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script(name: str):
    """An experiments/gpu_default script loaded as a module from its file (sys.path untouched)."""
    spec = importlib.util.spec_from_file_location(f"gpu_default_{name}",
                                                  os.path.join(ROOT, "experiments", "gpu_default", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_corpus, pack, render_configs = _script("build_corpus"), _script("pack"), _script("render_configs")


def test_pack_unpack_round_trip(tmp_path):
    src = tmp_path / "ckpt"
    (src / "params").mkdir(parents=True)
    blob = np.random.default_rng(0).bytes(300_000)
    (src / "params" / "a.bin").write_bytes(blob)
    (src / "jaxdlm.json").write_text('{"x": 1}')
    paths, digest = pack.pack(str(src), str(tmp_path / "out" / "model"), max_files=5, chunk_mb=0.1)
    assert len(paths) == 4 and all(os.path.getsize(p) <= 0.1 * pack.MB for p in paths)
    assert pack.unpack(str(tmp_path / "out" / "model"), str(tmp_path / "back"), digest) == ["ckpt"]
    assert (tmp_path / "back" / "ckpt" / "params" / "a.bin").read_bytes() == blob
    with pytest.raises(ValueError, match="SHA-256"):
        pack.unpack(str(tmp_path / "out" / "model"), str(tmp_path / "back2"), "0" * 64)
    os.remove(paths[1])
    with pytest.raises(ValueError, match=r"lacks part\(s\) \[2\]"):
        pack.unpack(str(tmp_path / "out" / "model"), str(tmp_path / "back3"))
    with pytest.raises(ValueError, match="max-files=2"):
        pack.pack(str(src), str(tmp_path / "o2" / "m"), max_files=2, chunk_mb=0.1)


def _fake_site(root):
    code = "def f(x):\n    return x + 1\n" * 40
    for pkg in ("jax", "jax_plugins", "torch", "numpy", "mylib", "otherlib", "heldpkg", "jaxonomy"):
        d = root / pkg
        d.mkdir(parents=True)
        (d / "__init__.py").write_text(f"# {pkg}\n" + code)
        (d / "mod.py").write_text(f"# {pkg} module\n" + code.replace("x", pkg))
    (root / "single.py").write_text("# single\n" + code)
    (root / "dup.py").write_text((root / "mylib" / "__init__.py").read_text())  # a duplicate: dropped
    (root / "mylib" / "__pycache__").mkdir()
    (root / "mylib" / "__pycache__" / "x.py").write_text("cached = 1\n")


def test_corpus_holds_out_whole_packages(tmp_path):
    site = tmp_path / "site"
    _fake_site(site)
    out = tmp_path / "data"
    build_corpus.main(["--out", str(out), "--roots", str(site), "--holdout", "heldpkg", "--prompts", "2",
                       "--prompt-bytes", "32", "--continuation-bytes", "16", "--layers", "1", "--hidden", "64",
                       "--heads", "1", "--kv-heads", "1", "--intermediate", "64"])
    stats = json.loads((out / "data_stats.json").read_text())
    assert stats["eval_modules"] == ["heldpkg", "jax", "jax_plugins", "numpy", "torch"]
    evals = (out / "eval_files.txt").read_text().split()
    assert all(e.split("/")[1] in stats["eval_modules"] for e in evals)
    # train: dup (kept: it sorts first), mylib (its duplicate __init__ left out), otherlib, jaxonomy (not a jax
    # package), single; __pycache__ left out
    assert stats["train_files"] == 7 and stats["train_packages"] == 5
    train = np.load(out / "train.npy")
    assert train[0] == 1 and train[-1] == 2 and len(train) == stats["train_bytes"] + 2 * 7
    from tokenizers import Tokenizer

    inv = np.zeros(260, np.uint8)
    inv[build_corpus.byte_lut(Tokenizer.from_file(str(out / "tokenizer.json")))] = np.arange(256)
    text = bytes(inv[train[train > 3]]).decode()
    assert "# mylib" in text and "# jaxonomy" in text
    assert not any(f"# {p}\n" in text or f"# {p} module" in text for p in ("jax", "torch", "numpy", "heldpkg"))
    from jaxdlm.training.data import SPECIAL_TOKENS, tokenizer_from_file

    tok = tokenizer_from_file(out / "tokenizer.json")  # as the checkpoint export loads it
    assert [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.mask_token_id] == [0, 1, 2, 3]
    assert tok.convert_ids_to_tokens([0, 1, 2, 3]) == list(SPECIAL_TOKENS)
    assert tok.decode(tok("def g(y):")["input_ids"]) == "def g(y):"
    held = json.loads((out / "heldout_prompts.json").read_text())
    assert len(held["prompts"]) == 2 and all(len(p) == 32 for p in held["prompts"])
    assert all(f.split("/")[1] in stats["eval_modules"] for f in held["files"])


def test_byte_lut_matches_tokenizer():
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(build_corpus.DEFAULT_TOKENIZER)
    sample = "def f(x):\n\treturn 'é' + \"ü\"  # ~ok\n".encode()
    build_corpus.check_byte_lut(tok, sample)
    lut = build_corpus.byte_lut(tok)
    assert len(set(lut.tolist())) == 256 and lut.min() >= 4


def test_render_configs(tmp_path):
    out = render_configs.render(str(tmp_path), tiny=True, sets=["ar_pretrain:optim.total_steps=7",
                                                                  'convert:optim.compute_dtype="bfloat16"'])
    ar = tomllib.loads(out["ar_pretrain"])
    assert ar["optim"]["total_steps"] == 7 and ar["data"]["train"] == str(tmp_path / "data" / "train.npy")
    assert tomllib.loads(out["convert"])["optim"]["compute_dtype"] == "bfloat16"
    full = tomllib.loads(render_configs.render(str(tmp_path), tiny=False, sets=[])["lora_draft"])
    assert full["lora"]["rank"] == 32 and full["optim"]["compute_dtype"] == "bfloat16"
    with pytest.raises(ValueError, match="not one of"):
        render_configs.parse_set("nope:optim.lr=1")
    with pytest.raises(ValueError, match="NAME:section.key=VALUE"):
        render_configs.parse_set("ar_pretrain.lr=1")
