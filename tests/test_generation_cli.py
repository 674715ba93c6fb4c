"""The ``jaxdlm`` command line: ``generate`` (through run_generate, with a tokenizer built here), argument
and runtime errors (exit 2, one line, no traceback), ``info`` on jaxdlm checkpoints, the compile cache.
``jaxdlm demo`` on the embedded model is tested in test_default_model.py."""

import io
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxdlm
from jaxdlm import cli
from jaxdlm.default import DEFAULT_MODEL_DIR, card
from jaxdlm.testing import tiny_config, tiny_model

CFG = tiny_config()

WORDS = ["<pad>", "<s>", "</s>", "<mask>"] + [f"w{i}" for i in range(CFG.vocab_size - 4)]
MAX_NEW = 24


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = "{% for m in messages %}w1 {{ m['content'] }} w2 {% endfor %}{% if add_generation_prompt %}w3{% endif %}"
    return fast


def generate_args(*extra):
    return cli.build_parser().parse_args(["generate", "--checkpoint", "unused", "--prompt", "w5 w9 w7", "--chat",
                                          "--max-new-tokens", str(MAX_NEW), "--block-length", "4", *extra])


PROMPT_IDS = [WORDS.index(w) for w in "w1 w5 w9 w7 w2 w3".split()]  # "w5 w9 w7" in the chat template


def free_run(model, **kw):
    """The output without EOS and an id it never emits (an EOS that is not hit)."""
    kw = dict(dict(mode="ar"), **kw)
    free = jaxdlm.generate(model, [PROMPT_IDS], max_new_tokens=MAX_NEW, eos_token_id=[], **kw)
    free = free.sequences()[0].tolist()
    return free, next(i for i in range(4, CFG.vocab_size) if i not in free)


def test_generate_command_prints_prompt_continuation_stop_reason_and_figures(seed):
    model, tok = tiny_model(seed), tiny_tokenizer()
    ids = PROMPT_IDS
    free, absent = free_run(model)          # absent: never emitted, the row stops at --max-new-tokens
    eos = free[len(free) // 2]              # hit: the row stops at its first occurrence
    prompt_text = tok.decode(ids, skip_special_tokens=False)
    for eos_id, want, stop in ((eos, free[:free.index(eos) + 1], f"stopped at EOS (id {eos}) after "
                                f"{free.index(eos) + 1} tokens"),
                               (absent, free, f"{MAX_NEW} tokens, stopped at --max-new-tokens={MAX_NEW}")):
        out, err = io.StringIO(), io.StringIO()
        info = cli.run_generate(model, tok, generate_args("--mode", "linear_spec", "--eos-token-id", str(eos_id)),
                                out=out, err=err)
        text = tok.decode(want, skip_special_tokens=False)
        printed = out.getvalue()
        assert info["rows"][0]["text"] == text and info["mode"] == "linear_spec"
        # not a terminal: the prompt, the mark, the continuation; then why the row stopped
        assert f"{prompt_text}{cli.PROMPT_MARK}{text}\n[{stop}]\n" in printed
        assert f"nfe={info['rows'][0]['nfe']}" in printed and "TPF=" in printed and "tokens/s)" in printed
        assert "compile " in printed and "run " in printed
        assert err.getvalue() == ""                         # no progress line off a terminal


def test_prompt_is_dimmed_on_a_terminal(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    shown = cli._prompt_and_continuation("def f():", " pass", Terminal())
    assert shown == "\033[2mdef f():\033[22m pass"
    assert cli._prompt_and_continuation("def f():", " pass", io.StringIO()) == "def f():\u2502 pass"
    monkeypatch.setenv("NO_COLOR", "1")  # https://no-color.org: the mark instead
    assert cli._prompt_and_continuation("def f():", " pass", Terminal()) == "def f():\u2502 pass"


def test_progress_line_counts_committed_tokens(seed):
    model, tok = tiny_model(seed), tiny_tokenizer()
    err = io.StringIO()
    _, absent = free_run(model)
    cli.run_generate(model, tok, generate_args("--mode", "quadratic_spec", "--eos-token-id", str(absent),
                                               "--progress"), out=io.StringIO(), err=err)
    shown = err.getvalue()
    assert f"generating: {MAX_NEW}/{MAX_NEW} tokens" in shown and shown.endswith("\r\033[K")


def test_threshold_none_runs_the_fixed_schedule(seed):
    """``--threshold none``: one masked token per denoise step, B-1 denoise passes + 1 commit per block."""
    model, tok = tiny_model(seed), tiny_tokenizer()
    free, absent = free_run(model, mode="diffusion", block_length=4, threshold=None)
    info = cli.run_generate(model, tok, generate_args("--mode", "diffusion", "--threshold", "none",
                                                      "--eos-token-id", str(absent)), out=io.StringIO())
    blocks = -(-(MAX_NEW - 1) // 4)
    assert info["rows"][0]["nfe"] == blocks * 4
    assert info["rows"][0]["text"] == tok.decode(free, skip_special_tokens=False)


def test_generate_command_needs_a_tokenizer_and_a_template_for_chat(seed):
    args = cli.build_parser().parse_args(["generate", "--checkpoint", "x", "--prompt", "w5"])
    with pytest.raises(ValueError, match="no tokenizer"):
        cli.run_generate(tiny_model(seed), None, args)
    tok = tiny_tokenizer()
    tok.chat_template = None
    with pytest.raises(ValueError, match="tokenizer has none: drop --chat"):
        cli.run_generate(tiny_model(seed), tok, generate_args())


def test_cli_silences_transformers_advice_on_missing_torch(monkeypatch, capsys):
    """transformers says "PyTorch was not found..." at import unless TRANSFORMERS_NO_ADVISORY_WARNINGS is set."""
    monkeypatch.setenv("TRANSFORMERS_NO_ADVISORY_WARNINGS", "")
    monkeypatch.delenv("TRANSFORMERS_NO_ADVISORY_WARNINGS")
    assert cli.main(["info", "--no-compile-cache"]) == 0
    assert os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] == "1"
    capsys.readouterr()


@pytest.mark.parametrize("argv,allowed", [
    (["generate", "--prompt", "x", "--dtype", "float8"], "invalid choice: 'float8' (choose from 'float32', 'bfloat16')"),
    (["generate", "--prompt", "x", "--dtype", "int32"], "invalid choice: 'int32' (choose from 'float32', 'bfloat16')"),
    (["generate", "--prompt", "x", "--threshold", "1.5"], "1.5 is out of range; expected a number in [0, 1] or 'none'"),
    (["generate", "--prompt", "x", "--threshold", "-1"], "-1 is out of range; expected a number in [0, 1] or 'none'"),
    (["generate", "--prompt", "x", "--threshold", "high"], "'high' is not a number; expected a number in [0, 1] or"),
    (["generate", "--prompt", "x", "--temperature", "-0.5"], "expected a number >= 0"),
    (["generate", "--prompt", "x", "--temperature", "nan"], "expected a number >= 0"),
    (["generate", "--prompt", "x", "--top-p", "0"], "expected a number in (0, 1]"),
    (["generate", "--prompt", "x", "--top-k", "0"], "expected an integer >= 1"),
    (["generate", "--prompt", "x", "--max-new-tokens", "0"], "expected an integer >= 1"),
    (["generate", "--prompt", "x", "--block-length", "2.5"], "'2.5' is not an integer; expected an integer >= 1"),
    (["generate", "--prompt", "x", "--steps-per-block", "0"], "expected an integer >= 1"),
    (["generate", "--prompt", "x", "--seed", "-1"], "expected an integer in [0, 4294967295]"),
    (["generate", "--prompt", "x", "--eos-token-id", "-2"], "expected an integer >= 0"),
    (["generate", "--prompt", "x", "--mode", "beam"], "invalid choice: 'beam' (choose from 'ar', 'diffusion'"),
    (["generate", "--prompt", "x", "--spec-sampling", "fuzzy"], "(choose from 'exact', 'rejection')"),
    (["generate", "--prompt", "x", "--policy", "nope"], "invalid choice: 'nope' (choose from 'confidence', 'margin'"),
    (["generate", "--prompt", "x", "--margin", "1.5"], "1.5 is out of range; expected a number in [0, 1]"),
    (["generate", "--prompt", "x", "--entropy-bound", "-1"], "expected a number >= 0"),
    (["generate", "--prompt", "x", "--quantize", "int3"], "invalid choice: 'int3' (choose from 'int8', 'int4', 'fp8')"),
    (["generate"], "the following arguments are required: --prompt"),
    (["demo", "--prompt-index", "-1"], "expected an integer >= 0"),
    (["demo", "--num-prompts", "0"], "expected an integer >= 1"),
    (["frobnicate"], "(choose from 'demo', 'info', 'generate', 'serve', 'train')"),
])
def test_bad_arguments_exit_2_with_one_line(argv, allowed, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("jaxdlm") and allowed in err, err


@pytest.mark.parametrize("argv,message", [
    (["generate", "--checkpoint", "{tmp}/missing", "--prompt", "x"], "{tmp}/missing does not exist"),
    (["generate", "--prompt", "x", "--quantize", "int8", "--dtype", "float32"],
     "--quantize int8 dequantizes its weights into bfloat16 activations, and --dtype float32 asks for full precision"),
    (["generate", "--prompt", "x", "--quantize-head"], "--quantize-head needs --quantize int8, int4 or fp8"),
    (["info", "--config", "{tmp}/missing"], "--config {tmp}/missing does not exist"),
    (["demo", "--prompt-index", "15", "--num-prompts", "2"], "the index must lie in [0, 15]"),
    (["train", "{tmp}/missing.toml"], "config file not found"),
])
def test_runtime_errors_exit_2_with_one_line(argv, message, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert cli.main(argv + ["--no-compile-cache"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"jaxdlm {argv[0]}: error: ") and message.format(tmp=tmp_path) in err, err
    with pytest.raises(ValueError):  # --debug: the exception itself, traceback included
        cli.main(argv + ["--no-compile-cache", "--debug"])


def test_unexpected_errors_name_their_type_and_debug(monkeypatch, capsys):
    def broken(args):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(cli, "cmd_info", broken)
    assert cli.main(["info", "--no-compile-cache"]) == 2
    assert capsys.readouterr().err == ("jaxdlm info: error: RuntimeError: disk on fire "
                                       "(--debug shows the traceback)\n")


def test_info_prints_a_jaxdlm_checkpoint(tmp_path, seed, capsys):
    model = tiny_model(seed, lora_rank=4)
    model.tokenizer = tiny_tokenizer()
    path = jaxdlm.save(model, tmp_path / "ckpt")
    assert cli.main(["info", "--config", str(path), "--no-compile-cache"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["checkpoint"] == str(path) and info["dtype"] == "float32"
    assert info["config"] == json.loads(json.dumps(CFG.to_dict()))
    assert info["num_params"] == sum(x.size for x in jax.tree.leaves(nnx.to_pure_dict(model.params)))
    assert info["lora"]["rank"] == 4 and info["lora"]["layers"] == CFG.num_layers
    assert info["tokenizer"]["vocab_size"] == len(WORDS) and info["tokenizer"]["chat_template"] is True


@pytest.mark.parametrize("argv", [["info", "--config"], ["info", "--config", "default"]])
def test_info_prints_the_default_model(argv, capsys):
    assert cli.main(argv + ["--no-compile-cache"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["checkpoint"] == str(DEFAULT_MODEL_DIR)
    assert info["num_params"] == card()["params"] and info["lora"]["rank"] == card()["lora_rank"]
    assert info["tokenizer"]["vocab_size"] == info["config"]["vocab_size"]


@pytest.fixture
def config_updates(monkeypatch):
    """``jax.config.update`` calls made by the CLI, recorded instead of applied (so that this test process
    never starts writing a persistent cache)."""
    calls = []
    monkeypatch.setattr(jax.config, "update", lambda name, value: calls.append((name, value)))
    return calls


def test_cli_turns_the_compile_cache_on_unless_told_not_to(config_updates, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("JAXDLM_CACHE_DIR", str(tmp_path / "xla"))
    assert cli.main(["info"]) == 0
    assert ("jax_compilation_cache_dir", str(tmp_path / "xla")) in config_updates
    monkeypatch.delenv("JAXDLM_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    config_updates.clear()
    assert cli.main(["info"]) == 0
    assert ("jax_compilation_cache_dir", str(tmp_path / ".cache" / "jaxdlm" / "xla")) in config_updates
    config_updates.clear()
    assert cli.main(["info", "--no-compile-cache"]) == 0
    assert not [c for c in config_updates if c[0] == "jax_compilation_cache_dir"]
    capsys.readouterr()


def test_compile_time_is_reported_apart_from_run_time(seed):
    """The compile clock sees a fresh jit compilation and not a cached call."""
    f = jax.jit(lambda x: jax.numpy.sin(x).sum() + seed)
    x = np.arange(8.0, dtype=np.float32)
    _, first, _ = cli._timed(f, x)
    _, again, _ = cli._timed(f, x)
    assert first > 0 and again == 0


def test_generate_command_passes_the_diffusion_policy(seed):
    """--policy and its knob reach generate(): entropy bound 0 commits one mask per pass (3 passes per block of
    4), a huge bound all of them (1 pass); the default confidence rule cannot give both.  (The EOS is the MASK
    id, which is never emitted: rows run to --max-new-tokens.)"""
    model, tok = tiny_model(seed), tiny_tokenizer()
    argv = ["generate", "--checkpoint", "unused", "--prompt", "w5 w9 w7", "--mode", "diffusion", "--max-new-tokens",
            "24", "--block-length", "4", "--eos-token-id", str(CFG.mask_token_id), "--policy", "entropy"]
    blocks = -(-23 // 4)
    for bound, passes in (("0", 3), ("1e9", 1)):
        info = cli.run_generate(model, tok, cli.build_parser().parse_args(argv + ["--entropy-bound", bound]),
                                out=io.StringIO())
        assert info["rows"][0]["nfe"] == (passes + 1) * blocks and info["rows"][0]["tokens"] == 24


def test_cli_choices_follow_the_library():
    """--mode and --policy are read from the registries (a mode registered later is a choice too); the
    quantization names are a copy (the converter's parser runs before jax is imported)."""
    from convert_weights import core
    from jaxdlm import quant
    from jaxdlm.generation import modes, policies

    gen = cli.build_parser()._subparsers._group_actions[0].choices["generate"]
    choices = {a.dest: a.choices for a in gen._actions if a.choices}
    assert tuple(choices["policy"]) == policies.POLICIES
    assert tuple(choices["mode"]) == modes.mode_names() + ("auto",)
    knob_flags = {a.dest for a in gen._actions} & {p.knob for p in policies.REGISTRY}
    assert knob_flags == {p.knob for p in policies.REGISTRY}
    assert cli.QUANTIZE == core.QUANTIZE == quant.SCHEMES


def test_generate_quantize_loads_the_checkpoint_quantized(tmp_path, seed, monkeypatch, capsys):
    """--quantize (and --quantize-head) quantize a float checkpoint while loading, computing in bfloat16; an
    already quantized checkpoint loads as it is and refuses a second --quantize."""
    model = tiny_model(seed)
    model.tokenizer = tiny_tokenizer()
    path = jaxdlm.save(model, tmp_path / "ckpt")
    seen = []
    monkeypatch.setattr(cli, "run_generate", lambda m, tok, args, **_: seen.append(m))
    base = ["generate", "--checkpoint", str(path), "--prompt", "w5", "--no-compile-cache"]
    assert cli.main(base + ["--quantize", "fp8", "--quantize-head"]) == 0
    assert seen[-1].quant == jaxdlm.quant.Quantization("fp8", head=True) and seen[-1].dtype == jnp.bfloat16
    assert seen[-1].params["head"][...].dtype == jnp.float8_e4m3fn
    quantized = jaxdlm.save(seen[-1], tmp_path / "fp8")
    assert cli.main(["info", "--config", str(quantized), "--no-compile-cache"]) == 0
    assert json.loads(capsys.readouterr().out)["quantization"] == {"scheme": "fp8", "head": True, "group_size": None}
    assert cli.main(base[:2] + [str(quantized)] + base[3:]) == 0
    assert seen[-1].quant.scheme == "fp8"
    assert cli.main(base[:2] + [str(quantized)] + base[3:] + ["--quantize", "int8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is already quantized (fp8 with the head); load it without quantize=" in err


# ------------------------------------------------------------------------------------- fresh-clone rough edges


@pytest.fixture
def no_weights(monkeypatch):
    """``jaxdlm.checkpoint.load`` replaced by a recorder that stops the command: the checks that need no weights
    must fail before it is called (the calls are returned)."""
    calls = []

    def load(path, **kw):
        calls.append(path)
        raise ValueError("the weights were asked for")

    monkeypatch.setattr(jaxdlm.checkpoint, "load", load)
    return calls


def ar_checkpoint(tmp_path):
    """A folder with only the metadata of an autoregressive (no MASK) checkpoint: enough for the checks before
    loading, which read jaxdlm.json and no weights."""
    from jaxdlm.checkpoint import FLOAT_FORMAT_VERSION, FORMAT_NAME, METADATA_FILE

    folder = tmp_path / "ar"
    folder.mkdir()
    meta = {"format": FORMAT_NAME, "format_version": FLOAT_FORMAT_VERSION, "dtype": "float32",
            "config": tiny_config(mask_token_id=None).to_dict()}
    (folder / METADATA_FILE).write_text(json.dumps(meta))
    return folder


VOCAB = 260  # the default model's byte-level vocabulary: 256 bytes + 4 specials


@pytest.mark.parametrize("extra,message", [  # the library's own checks (DecodeOptions, the mode registry)
    (["--mode", "ar", "--policy", "margin"], "policy='margin' is a diffusion commit policy; mode='ar' has none"),
    (["--policy", "entropy"], "policy='entropy' is a diffusion commit policy; mode='linear_spec' has none"),
    (["--mode", "diffusion", "--margin", "0.5"], "margin=0.5 is the knob of policy='margin'; policy='confidence' has "
                                                 "no use for it"),
    (["--mode", "diffusion", "--policy", "margin", "--entropy-bound", "1"], "entropy_bound=1.0 is the knob of "
                                                                           "policy='entropy'"),
    (["--mode", "diffusion", "--policy", "margin", "--threshold", "none"], "threshold=None selects the fixed "
                                                                          "schedule, which ranks by confidence"),
    (["--mode", "linear_spec", "--threshold", "none", "--steps-per-block", "2"], "steps_per_block=2 is diffusion's "
                                                                                 "fixed schedule; mode='linear_spec' "
                                                                                 "has none"),
    (["--mode", "diffusion", "--steps-per-block", "2"], "steps_per_block=2 sets the fixed schedule, which "
                                                        "threshold=None selects"),
    (["--mode", "linear_spec", "--block-length", "1"], "block_length=1 does not fit linear_spec: it needs 2 <= "
                                                       "block_length (one seed and at least one draft token)"),
    (["--mode", "quadratic_spec", "--block-length", "65"], "it needs 2 <= block_length <= 64"),
    (["--max-thinking-tokens", "5"], "max_thinking_tokens=5 and end_think_token_id=None must be given together"),
    (["--eos-token-id", "2", "--eos-token-id", "99999"], f"eos_token_id 99999 is outside the vocabulary [0, {VOCAB})"),
    (["--end-think-token-id", str(VOCAB), "--max-thinking-tokens", "3"], f"end_think_token_id={VOCAB} is outside "
                                                                         f"the vocabulary"),
    (["--prompt", os.fsdecode(b"def f():\xff")], "--prompt number 2 is not valid UTF-8 text: character 8 is byte "
                                                  "0xff, which is not UTF-8"),
    (["--chat"], "tokenizer has none: drop --chat"),
    (["--checkpoint", "{ar}", "--mode", "linear_spec"], "mode='linear_spec' needs config.mask_token_id (this model "
                                                        "has none); use mode='ar'"),
])
def test_checks_that_need_no_weights_run_before_they_load(extra, message, no_weights, tmp_path, capsys):
    argv = ["generate", "--checkpoint", str(DEFAULT_MODEL_DIR), "--prompt", "def f():", "--no-compile-cache"]
    argv += [a.format(ar=ar_checkpoint(tmp_path)) if a == "{ar}" else a for a in extra]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert no_weights == []


def test_a_non_utf8_prompt_is_named_not_tokenized():
    """Python keeps the undecodable bytes of a command line as lone surrogates (os.fsdecode does the same)."""
    args = generate_args("--prompt", os.fsdecode(b"w5 \xe9t\xe9"))
    with pytest.raises(ValueError, match=r"--prompt number 2 is not valid UTF-8 text: character 3 is byte 0xe9"):
        cli.run_generate(None, tiny_tokenizer(), args)


def test_block_length_defaults_to_the_training_block(monkeypatch):
    """No --block-length: the model's config.block_size reaches generate; another value does too, with a one-line
    note naming both (for --mode ar: that it has no role).  generate is replaced, so the model needs only a config."""
    from types import SimpleNamespace

    seen = []

    def fake_generate(model, prompts, **kw):
        seen.append(kw)
        raise KeyboardInterrupt  # stop before any program is built

    monkeypatch.setattr(jaxdlm.generation, "generate", fake_generate)
    model = SimpleNamespace(config=tiny_config(block_size=8))
    argv = ["generate", "--checkpoint", "unused", "--prompt", "w5 w9"]
    for extra, block, note in (([], 8, None), (["--mode", "diffusion"], 8, None),
                               (["--block-length", "8"], 8, None),
                               (["--block-length", "4", "--mode", "diffusion"], 4,
                                "--block-length 4 differs from the model's training block (config.block_size = 8)"),
                               (["--block-length", "4", "--mode", "ar"], 4,
                                "--block-length 4 has no role in --mode ar (one token per forward); ignored")):
        err = io.StringIO()
        with pytest.raises(KeyboardInterrupt):
            cli.run_generate(model, tiny_tokenizer(), cli.build_parser().parse_args(argv + extra), out=io.StringIO(),
                             err=err)
        assert seen[-1]["block_length"] == block
        assert err.getvalue() == ("" if note is None else f"jaxdlm generate: note: {note}\n")


def test_generate_without_checkpoint_says_what_the_default_model_is(no_weights, capsys):
    assert cli.main(["generate", "--prompt", "def f():", "--no-compile-cache"]) == 2
    lines = capsys.readouterr().err.splitlines()
    params = f"{card()['params'] / 1e6:.1f}M-parameter byte-level Python code model"
    assert lines[0] == f"jaxdlm generate: {cli.default_model_note()}" and params in lines[0]
    assert len(lines) == 2 and "the weights were asked for" in lines[1]  # said once, then it loads
    assert no_weights == [DEFAULT_MODEL_DIR]
    assert cli.main(["generate", "--checkpoint", str(DEFAULT_MODEL_DIR), "--prompt", "x", "--no-compile-cache"]) == 2
    assert "embedded default model" not in capsys.readouterr().err


def test_relative_checkpoint_paths_in_the_cli(tmp_path, seed, monkeypatch, capsys):
    """A path relative to the working directory (or under ~) reaches Orbax as an absolute one."""
    model = tiny_model(seed)
    model.tokenizer = tiny_tokenizer()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = jaxdlm.save(model, os.path.join("~", "ckpt"))
    assert path == tmp_path / "home" / "ckpt"
    seen = []
    monkeypatch.setattr(cli, "run_generate", lambda m, tok, args, **_: seen.append((m, tok)))
    for given in ("home/ckpt", "~/ckpt"):
        assert cli.main(["generate", "--checkpoint", given, "--prompt", "w5", "--no-compile-cache"]) == 0
        loaded, tok = seen[-1]
        np.testing.assert_array_equal(np.asarray(loaded.params["embed"][...]), np.asarray(model.params["embed"][...]))
        assert tok(["w5"], is_split_into_words=True)["input_ids"] == [WORDS.index("w5")]
        assert cli.main(["info", "--config", given, "--no-compile-cache"]) == 0
        assert json.loads(capsys.readouterr().out)["checkpoint"] == str(path)
