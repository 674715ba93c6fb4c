"""The embedded default model (``jaxdlm.load_default()``): a trained byte-level code model that ships in the package.

What it must show (issue 6): it loads offline; on held-out prompts (stdlib modules never trained on)
block diffusion and linear self-speculation each decode more than 1.5 tokens per forward, and linear
self-speculation's output equals AR's token for token.
"""

import math

import numpy as np
import pytest

import jaxdlm
from jaxdlm import cli
from jaxdlm.default import DEFAULT_MODEL_DIR, card, heldout_prompts, load_default

NEW = 128


@pytest.fixture(scope="module")
def model():
    return load_default()


@pytest.fixture(scope="module")
def prompt_ids(model):
    return [model.tokenizer(t)["input_ids"] for t in heldout_prompts()[:8]]


def _tpf(res) -> float:
    return float(res.lengths.sum()) / float(res.nfe.sum())


def test_default_model_fits_in_the_package():
    size = sum(p.stat().st_size for p in DEFAULT_MODEL_DIR.rglob("*") if p.is_file())
    assert size <= 21e6, f"embedded default model is {size / 1e6:.1f} MB, over the ~20 MB budget"


def test_default_model_loads_with_tokenizer_lora_and_held_out_prompts(model):
    c = model.config
    info = card()
    assert model.lora is not None and model.tokenizer is not None
    assert c.block_size == info["recommended"]["block_length"]
    assert model.dtype == np.float32
    # the prompts come from held-out modules only
    meta = __import__("json").load(open(DEFAULT_MODEL_DIR / "heldout_prompts.json"))
    eval_modules = set(info["data"]["eval_modules"])
    for rel in meta["files"]:
        top = rel.split("/")[0].removesuffix(".py")
        assert top in eval_modules, f"{rel} is not in a held-out module"
    texts = heldout_prompts()
    assert len(texts) >= 8
    for t in texts:  # byte-level tokenizer: one id per byte, exact round trip
        ids = model.tokenizer(t)["input_ids"]
        assert len(ids) == len(t.encode())
        assert model.tokenizer.decode(ids) == t
    assert jaxdlm.load_default(dtype="bfloat16").dtype == np.dtype("bfloat16")


def test_default_model_is_trained(model, prompt_ids):
    """Teacher-forced AR loss on held-out code is far below a random model's (ln 260 = 5.56 nats/byte)."""
    toks = np.asarray(prompt_ids, np.int32)
    logits = np.asarray(model.logits(toks, kind="causal"), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp[:, :-1], toks[:, 1:, None], axis=-1).mean()
    assert nll < 0.4 * math.log(model.config.vocab_size), f"held-out AR loss {nll:.3f} nats/byte"


def test_default_model_decodes_faster_than_one_token_per_forward(model, prompt_ids):
    common = dict(max_new_tokens=NEW, eos_token_id=(), temperature=0.0)
    threshold = card()["recommended"]["threshold"]
    ar = jaxdlm.generate(model, prompt_ids, mode="ar", **common)
    diff = jaxdlm.generate(model, prompt_ids, mode="diffusion", threshold=threshold, **common)
    lin = jaxdlm.generate(model, prompt_ids, mode="linear_spec", **common)
    for r in (ar, diff, lin):
        assert np.all(np.asarray(r.lengths) == NEW)
    assert _tpf(diff) > 1.5, f"diffusion TPF {_tpf(diff):.2f} at threshold {threshold}"
    assert _tpf(lin) > 1.5, f"linear_spec TPF {_tpf(lin):.2f}"
    np.testing.assert_array_equal(np.asarray(lin.tokens), np.asarray(ar.tokens))
    # the diffusion output is the model's own text, not noise: it starts where AR starts
    assert np.mean(np.asarray(diff.tokens)[:, :4] == np.asarray(ar.tokens)[:, :4]) >= 0.75


def test_demo_command_runs_every_mode_on_the_default_model(capsys):
    assert cli.main(["demo", "--max-new-tokens", "64"]) == 0
    out = capsys.readouterr().out
    assert "embedded default model" in out
    for mode in ("[ar]", "[diffusion (threshold", "[linear_spec]", "[quadratic_spec]"):
        assert mode in out
    lines = {ln.split("]")[0] + "]": ln for ln in out.splitlines() if ln.startswith("[")}
    assert "identical to AR" in lines["[linear_spec]"]
    assert "identical to AR" in lines["[quadratic_spec]"]
