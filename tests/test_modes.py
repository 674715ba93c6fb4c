"""The registries behind generation: a mode registered from outside the package runs through ``generate`` and
``make_generate_fn``; every mode reaches the model through ``forward``; one options object means the same in both
entry points (``threshold=None`` included); the block length defaults to the model's training block; the docs'
modes table is the registry's."""

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdlm
from jaxdlm.generation import DecodeOptions, Mode, modes, policies, register_mode
from jaxdlm.generation.ar import ar_cycle
from jaxdlm.testing import tiny_config, tiny_model

ROOT = Path(__file__).resolve().parents[1]
CFG = tiny_config()
MAX_NEW = 9
P_LEN = 64  # generate()'s bucket for these prompts


def _padded(rows):
    out = np.zeros((len(rows), P_LEN), np.int32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return jnp.asarray(out), jnp.asarray([len(r) for r in rows], jnp.int32)


def _two_tokens(module, plan, state, lora=None):
    """A toy mode's cycle: two AR cycles (two tokens, two forwards) per loop iteration."""
    return ar_cycle(module, plan, ar_cycle(module, plan, state, lora), lora)


@pytest.fixture
def toy_mode():
    mode = register_mode(Mode("ar_twice", "two AR steps per cycle (a test mode)", _two_tokens, prefill_nfe=1,
                              widest_write=lambda n: 1, uses_block=False, needs_mask=False))
    yield mode
    modes.unregister_mode(mode.name)


def test_a_mode_registered_outside_the_package_runs_everywhere(toy_mode, seed, rng):
    """Its tokens and nfe are AR's (two AR cycles per iteration change nothing a row sees), through generate and
    through make_generate_fn, and the CLI offers it."""
    model = tiny_model(seed)
    rows = [rng.integers(4, CFG.vocab_size, size=n) for n in (3, 8)]
    ar = jaxdlm.generate(model, rows, mode="ar", max_new_tokens=MAX_NEW, eos_token_id=())
    toy = jaxdlm.generate(model, rows, mode="ar_twice", max_new_tokens=MAX_NEW, eos_token_id=())
    assert toy.mode == "ar_twice"
    np.testing.assert_array_equal(toy.tokens, ar.tokens)
    np.testing.assert_array_equal(toy.nfe, ar.nfe)
    assert toy.total_nfe > ar.total_nfe // 2 and toy.total_nfe % 2 == 1  # prefill + two forwards per cycle
    fn = jaxdlm.make_generate_fn(model, mode="ar_twice", batch=2, prompt_length=P_LEN, max_new_tokens=MAX_NEW,
                                 eos_token_id=())
    out = jax.jit(fn)(model.params, None, *_padded(rows), jax.random.PRNGKey(0))
    np.testing.assert_array_equal(np.asarray(out.tokens), ar.tokens)
    from jaxdlm import cli

    gen = cli.build_parser()._subparsers._group_actions[0].choices["generate"]
    assert "ar_twice" in next(a for a in gen._actions if a.dest == "mode").choices
    with pytest.raises(ValueError, match="mode name 'ar_twice' is taken"):
        register_mode(toy_mode)


def test_every_mode_reaches_the_model_through_forward(monkeypatch, seed):
    """Transformer.__call__ is only ever entered from jaxdlm.model.forward (one route to the kernels): each mode's
    program is traced (not compiled) with both wrapped."""
    from jaxdlm import model as model_lib

    inside, calls = [False], []
    real_forward, real_call = model_lib.forward, model_lib.Transformer.__call__

    def forward(*a, **kw):
        inside[0] = True
        try:
            return real_forward(*a, **kw)
        finally:
            inside[0] = False

    def call(self, *a, **kw):
        calls.append(inside[0])
        return real_call(self, *a, **kw)

    monkeypatch.setattr(model_lib.Transformer, "__call__", call)
    for name in ("core", "ar", "diffusion", "speculative"):
        monkeypatch.setattr(f"jaxdlm.generation.{name}.forward", forward)
    model = tiny_model(seed)
    prompts, lens = _padded([[5, 6, 7]])
    for mode in modes.mode_names():
        calls.clear()
        fn = jaxdlm.make_generate_fn(model, mode=mode, batch=1, prompt_length=P_LEN, max_new_tokens=4, block_length=3)
        jax.make_jaxpr(fn)(model.params, None, prompts, lens, jax.random.PRNGKey(0))
        assert calls and all(calls), (mode, calls)


def test_threshold_none_means_the_fixed_schedule_in_both_entry_points(seed, rng):
    """The bug this guards: make_generate_fn's function once turned threshold=None into a threshold of 0 (whole
    blocks per pass) where generate ran the fixed schedule."""
    model = tiny_model(seed)
    rows = [rng.integers(4, CFG.vocab_size, size=n) for n in (4, 7)]
    ref = jaxdlm.generate(model, rows, mode="diffusion", max_new_tokens=8, threshold=None, eos_token_id=())
    assert ref.nfe.tolist() == [2 * (CFG.block_size - 1 + 1)] * 2  # N-1 denoise passes + a commit pass, 2 blocks
    fn = jaxdlm.make_generate_fn(model, mode="diffusion", batch=2, prompt_length=P_LEN, max_new_tokens=8,
                                 threshold=None, eos_token_id=())
    out = fn(model.params, None, *_padded(rows), jax.random.PRNGKey(0))
    np.testing.assert_array_equal(np.asarray(out.tokens), ref.tokens)
    np.testing.assert_array_equal(np.asarray(out.nfe), ref.nfe)
    thresholded = jaxdlm.make_generate_fn(model, mode="diffusion", batch=2, prompt_length=P_LEN, max_new_tokens=8)
    with pytest.raises(ValueError, match=r"threshold=None selects diffusion's fixed schedule, a static choice"):
        thresholded(model.params, None, *_padded(rows), jax.random.PRNGKey(0), threshold=None)
    with pytest.raises(ValueError, match=r"threshold=0.5 has no effect: this function runs the fixed schedule"):
        fn(model.params, None, *_padded(rows), jax.random.PRNGKey(0), threshold=0.5)


def test_one_options_object_for_both_entry_points(seed, rng):
    """DecodeOptions given as an object or as keywords is the same call; make_generate_fn built from it runs the
    plan generate runs."""
    model = tiny_model(seed, head_scale=5.0)
    rows = [rng.integers(4, CFG.vocab_size, size=n) for n in (4, 6)]
    opts = DecodeOptions(temperature=0.8, top_k=5, seed=3, threshold=0.6)
    a = jaxdlm.generate(model, rows, mode="diffusion", max_new_tokens=8, options=opts)
    b = jaxdlm.generate(model, rows, mode="diffusion", max_new_tokens=8, temperature=0.8, top_k=5, seed=3,
                        threshold=0.6)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    fn = jaxdlm.make_generate_fn(model, mode="diffusion", batch=2, prompt_length=P_LEN, max_new_tokens=8, options=opts)
    out = fn(model.params, None, *_padded(rows), jax.random.PRNGKey(3))
    np.testing.assert_array_equal(np.asarray(out.tokens), a.tokens)
    with pytest.raises(ValueError, match=r"top_p=0.5 has no effect: this function was made without the top_p filter"):
        fn(model.params, None, *_padded(rows), jax.random.PRNGKey(3), top_p=0.5)
    with pytest.raises(TypeError, match=r"unknown decoding option\(s\) \['treshold'\]"):
        jaxdlm.generate(model, rows, treshold=0.5)


def test_block_length_defaults_to_the_training_block(seed, rng):
    """config.block_size, not a literal 32: every block mode's plan, and the fixed schedule's nfe (N-1 denoise
    passes + 1 commit pass per block) shows the block that ran."""
    model = tiny_model(seed, config=tiny_config(block_size=3))
    for mode in ("diffusion", "linear_spec", "quadratic_spec"):
        assert jaxdlm.make_generate_fn(model, mode=mode, batch=1, prompt_length=P_LEN, max_new_tokens=6).plan.block == 3
    rows = [rng.integers(4, CFG.vocab_size, size=5)]
    res = jaxdlm.generate(model, rows, mode="diffusion", max_new_tokens=6, threshold=None, eos_token_id=())
    assert res.nfe.tolist() == [2 * 3]


@pytest.mark.parametrize("kwargs,message", [
    (dict(mode="diffusion", steps_per_block=2), r"steps_per_block=2 sets the fixed schedule, which threshold=None "
                                                r"selects; with threshold=0.9 it would be ignored"),
    (dict(mode="ar", threshold=None, steps_per_block=2), r"steps_per_block=2 is diffusion's fixed schedule; "
                                                         r"mode='ar' has none"),
    (dict(eos_token_id=[2, 999]), r"eos_token_id 999 is outside the vocabulary \[0, "),
    (dict(mode="diffusion", policy="entropy", entropy_bound=-1.0), r"entropy_bound=-1.0 must be a number >= 0"),
    (dict(mode="diffusion", policy="greedy"), r"policy='greedy' is not a diffusion commit policy; expected one of "
                                              r"\('confidence', 'margin', 'entropy', 'leftmost'\)"),
    (dict(mode="beam"), r"mode='beam' is not a generation mode; expected one of \('ar', 'diffusion'"),
    (dict(mode="quadratic_spec", block_length=65), r"block_length=65 does not fit quadratic_spec: it needs 2 <= "
                                                   r"block_length <= 64"),
])
def test_bad_settings_are_named_by_both_entry_points(kwargs, message):
    model = tiny_model(0)
    with pytest.raises(ValueError, match=message):
        jaxdlm.generate(model, [[5, 6]], max_new_tokens=4, **kwargs)
    mode = kwargs.pop("mode", "ar")
    with pytest.raises(ValueError, match=message):
        jaxdlm.make_generate_fn(model, mode=mode, batch=1, prompt_length=4, max_new_tokens=4, **kwargs)


def test_policy_registry_is_the_switch_and_the_knob_defaults():
    """The policy id is the registry index; each policy reads its own knob; the knob defaults are the registry's."""
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 11)) * 3, jnp.float32)
    x0 = jnp.argmax(logits, -1).astype(jnp.int32)
    masked = jnp.ones((2, 5), bool).at[:, 0].set(False)
    knobs = jaxdlm.generation.Knobs.make(threshold=0.3, margin=0.2, entropy_bound=0.7)
    for i, pol in enumerate(policies.REGISTRY):
        got = policies.commit_mask(jnp.int32(i), logits, x0, masked, knobs, None)
        want = pol.commit(logits, x0, masked, getattr(knobs, pol.knob), None)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=pol.name)
    defaults = jaxdlm.generation.Knobs.make()
    for pol in policies.REGISTRY:
        assert float(getattr(defaults, pol.knob)) == pytest.approx(policies.KNOB_DEFAULTS[pol.knob])


def test_docs_modes_table_is_the_registry():
    """docs/decoding.md's modes table lists exactly the registered modes with their prefill accounting."""
    text = (ROOT / "docs" / "decoding.md").read_text()
    table = re.search(r"<!-- modes-table -->\n(.*?)\n\n", text, re.S)
    assert table, "docs/decoding.md has no <!-- modes-table --> block"
    rows = [line.split("|")[1:-1] for line in table.group(1).splitlines()[2:]]
    got = {r[0].strip().strip("`"): int(r[1]) for r in rows}
    assert got == {m.name: m.prefill_nfe for m in modes.MODES.values()}
