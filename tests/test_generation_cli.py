"""``jaxdlm generate`` (through run_generate, with a tokenizer built here) and ``jaxdlm demo``."""

import importlib.util
import io

import numpy as np
import pytest

import jaxdlm
from jaxdlm import cli
from test_generation import make_model, CFG

WORDS = ["<pad>", "<s>", "</s>", "<mask>"] + [f"w{i}" for i in range(CFG.vocab_size - 4)]


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = "{% for m in messages %}w1 {{ m['content'] }} w2 {% endfor %}{% if add_generation_prompt %}w3{% endif %}"
    return fast


def test_generate_command_prints_text_and_figures(seed):
    model, tok = make_model(seed), tiny_tokenizer()
    args = cli.build_parser().parse_args(["generate", "--checkpoint", "unused", "--prompt", "w5 w9 w7", "--chat",
                                          "--mode", "linear_spec", "--max-new-tokens", "24", "--block-length", "4",
                                          "--eos-token-id", "63"])
    buf = io.StringIO()
    info = cli.run_generate(model, tok, args, out=buf)
    ids = [WORDS.index(w) for w in "w1 w5 w9 w7 w2 w3".split()]
    want = jaxdlm.ar_generate(model, [ids], max_new_tokens=24, eos_token_id=[63])
    text = tok.decode(want.sequences()[0].tolist(), skip_special_tokens=False)
    printed = buf.getvalue()
    assert info["rows"][0]["text"] == text and text in printed
    assert f"nfe={info['rows'][0]['nfe']}" in printed and "TPF=" in printed and "tokens/s=" in printed
    assert info["mode"] == "linear_spec"


def test_generate_command_without_checkpoint_module(capsys):
    if importlib.util.find_spec("jaxdlm.checkpoint") is not None:
        pytest.skip("jaxdlm.checkpoint is present: loading is tested with the checkpoint module")
    rc = cli.main(["generate", "--checkpoint", "nowhere", "--prompt", "hi"])
    assert rc == 2 and "jaxdlm.checkpoint" in capsys.readouterr().err


def test_generate_command_needs_a_tokenizer(seed):
    args = cli.build_parser().parse_args(["generate", "--checkpoint", "x", "--prompt", "w5"])
    with pytest.raises(ValueError, match="no tokenizer"):
        cli.run_generate(make_model(seed), None, args)


def test_generate_command_passes_the_diffusion_policy(seed):
    """--policy and its knob reach generate(): entropy bound 0 commits one mask per pass (3 passes per block of
    4), a huge bound all of them (1 pass); the default confidence rule cannot give both."""
    model, tok = make_model(seed), tiny_tokenizer()
    argv = ["generate", "--checkpoint", "unused", "--prompt", "w5 w9 w7", "--mode", "diffusion", "--max-new-tokens",
            "24", "--block-length", "4", "--eos-token-id", "-1", "--policy", "entropy"]
    blocks = -(-23 // 4)
    for bound, passes in (("0", 3), ("1e9", 1)):
        info = cli.run_generate(model, tok, cli.build_parser().parse_args(argv + ["--entropy-bound", bound]),
                                out=io.StringIO())
        assert info["rows"][0]["nfe"] == (passes + 1) * blocks and info["rows"][0]["tokens"] == 24
    bad = cli.build_parser().parse_args(argv[:-1] + ["nope"])
    with pytest.raises(ValueError, match="policy='nope'"):
        cli.run_generate(model, tok, bad, out=io.StringIO())
