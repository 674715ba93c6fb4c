"""``jaxdlm.make_generate_fn``: generation as a pure JAX function inside the user's own jit, scan, vmap and mesh,
giving exactly ``jaxdlm.generate``'s tokens, lengths and nfe (the two share one program)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdlm
from jaxdlm.testing import count_compilations, tiny_config, tiny_model

CFG = tiny_config()

MAX_NEW = 12
BLOCK = 4
P_LEN = 64  # generate()'s bucket for these prompt lengths


def _prompts(rng, lengths=(3, 9, 5)):
    rows = [rng.integers(4, CFG.vocab_size, size=n) for n in lengths]
    padded = np.zeros((len(rows), P_LEN), np.int32)
    for i, r in enumerate(rows):
        padded[i, :len(r)] = r
    return rows, jnp.asarray(padded), jnp.asarray([len(r) for r in rows], jnp.int32)


@pytest.mark.parametrize("mode,temperature", [("ar", 0.9), ("diffusion", 0.0), ("diffusion", 0.9),
                                              ("linear_spec", 0.0), ("quadratic_spec", 0.9)])
def test_fn_in_user_jit_equals_generate(mode, temperature, seed, rng):
    """Inside a user jit that also post-processes the output (ragged prompts, T = 0 and seeded T > 0; each mode
    at least once, and both temperatures of diffusion, whose sampled program differs most from its greedy one)."""
    model = tiny_model(seed, head_scale=60.0 if temperature == 0 else 5.0, lora_rank=4)
    rows, prompts, lens = _prompts(rng)
    fn = jaxdlm.make_generate_fn(model, mode=mode, batch=3, prompt_length=P_LEN, max_new_tokens=MAX_NEW,
                                 block_length=BLOCK, sample=temperature > 0)

    @jax.jit
    def user_step(params, lora, prompts, lens, key):
        out = fn(params, lora, prompts, lens, key, threshold=0.7, temperature=temperature)
        valid = jnp.arange(MAX_NEW)[None, :] < out.lengths[:, None]
        return out, jnp.sum(jnp.where(valid, out.tokens, 0), axis=1)  # post-processing in the same program

    with count_compilations() as n:
        out, sums = user_step(model.params, model.lora, prompts, lens, jax.random.PRNGKey(7))
        again, _ = user_step(model.params, model.lora, prompts, lens, jax.random.PRNGKey(7))
    assert n.value == 1  # one program for the static shape, reused
    ref = jaxdlm.generate(model, rows, mode=mode, max_new_tokens=MAX_NEW, block_length=BLOCK, threshold=0.7,
                          temperature=temperature, seed=7)
    np.testing.assert_array_equal(np.asarray(out.tokens), ref.tokens)
    np.testing.assert_array_equal(np.asarray(out.lengths), ref.lengths)
    np.testing.assert_array_equal(np.asarray(out.nfe), ref.nfe)
    assert int(out.total_nfe) == ref.total_nfe
    np.testing.assert_array_equal(np.asarray(sums), [int(t[:n].sum()) for t, n in zip(ref.tokens, ref.lengths)])
    np.testing.assert_array_equal(np.asarray(again.tokens), ref.tokens)


def test_fn_program_has_no_host_callback_and_knobs_do_not_recompile(seed, rng):
    model = tiny_model(seed, head_scale=5.0)  # flat distributions: nothing reaches the 0.99 threshold below
    _, prompts, lens = _prompts(rng)
    fn = jaxdlm.make_generate_fn(model, mode="diffusion", batch=3, prompt_length=P_LEN, max_new_tokens=MAX_NEW,
                                 block_length=BLOCK)
    jitted = jax.jit(fn)
    text = jitted.lower(model.params, None, prompts, lens, jax.random.PRNGKey(0)).as_text()
    assert not re.search(r"callback|host_compute|outfeed", text, re.IGNORECASE)
    knobs = lambda t, eos: dict(threshold=jnp.float32(t), eos_token_id=jnp.array(eos, jnp.int32),  # noqa: E731
                                policy=jnp.int32(0))
    jitted(model.params, None, prompts, lens, jax.random.PRNGKey(0), **knobs(0.5, [2, 9]))
    no_eos = [-1, -1]  # -1 is never a token id: every row runs to max_new_tokens
    with count_compilations() as n:
        a = jitted(model.params, None, prompts, lens, jax.random.PRNGKey(0), **knobs(0.99, no_eos))
        b = jitted(model.params, None, prompts, lens, jax.random.PRNGKey(1), **knobs(0.0, no_eos))
        first = int(np.asarray(b.tokens)[0, 0])
        c = jitted(model.params, None, prompts, lens, jax.random.PRNGKey(1), **knobs(0.0, [first, first]))
    assert n.value == 0
    np.testing.assert_array_equal(np.asarray(b.lengths), MAX_NEW)
    # threshold 0 commits a whole block in one denoise pass, plus its commit pass (docs/decoding.md accounting)
    np.testing.assert_array_equal(np.asarray(b.nfe), 2 * (MAX_NEW // BLOCK))
    assert int(a.nfe.sum()) > int(b.nfe.sum())  # the traced threshold takes effect
    assert int(c.lengths[0]) == 1  # the traced EOS ids take effect: row 0 stops at its first token


def test_grad_of_logits_over_generated_tokens_in_the_same_jit(seed, rng):
    """RL-style: sample, then differentiate the AR log-likelihood of the samples (tokens as constants) through
    Model.logits with the traced parameters, all in one jitted program."""
    model = tiny_model(seed, head_scale=5.0)
    rows, prompts, lens = _prompts(rng)
    fn = jaxdlm.make_generate_fn(model, mode="linear_spec", batch=3, prompt_length=P_LEN, max_new_tokens=MAX_NEW,
                                 block_length=BLOCK, sample=True)

    def loglik(params, prompts, out):
        seq = jnp.concatenate([prompts, out.tokens], axis=1)
        logp = jax.nn.log_softmax(model.logits(seq, params=params), axis=-1)
        # token t of the output sits at position lens + t (right after the row's prompt) ... here the prompt is
        # padded to P_LEN, so score the output against the logits at P_LEN - 1 + t (a fixed, valid layout)
        pred = logp[:, P_LEN - 1:-1]
        tok_lp = jnp.take_along_axis(pred, out.tokens[..., None], -1)[..., 0]
        return jnp.sum(jnp.where(jnp.arange(MAX_NEW)[None] < out.lengths[:, None], tok_lp, 0.0))

    @jax.jit
    def step(params, prompts, lens, key):
        out = jax.tree.map(jax.lax.stop_gradient, fn(params, None, prompts, lens, key, temperature=1.0))
        return out, jax.value_and_grad(loglik)(params, prompts, out)

    out, (value, grads) = step(model.params, prompts, lens, jax.random.PRNGKey(3))
    want_value, want_grads = jax.value_and_grad(loglik)(model.params, prompts, out)
    assert np.isfinite(float(value)) and abs(float(value) - float(want_value)) < 1e-4 * abs(float(want_value))
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-6)
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


def test_fn_under_vmap_over_keys_and_scan_over_batches(seed, rng):
    """``jax.vmap`` over PRNG keys gives each key's generate() output; ``lax.scan`` over prompt batches gives
    each batch's."""
    model = tiny_model(seed, head_scale=5.0)
    rows, prompts, lens = _prompts(rng)
    fn = jaxdlm.make_generate_fn(model, mode="ar", batch=3, prompt_length=P_LEN, max_new_tokens=MAX_NEW,
                                 sample=True)
    keys = jnp.stack([jax.random.PRNGKey(s) for s in (1, 2)])
    many = jax.jit(jax.vmap(lambda k: fn(model.params, None, prompts, lens, k, temperature=1.0)))(keys)
    for i, s in enumerate((1, 2)):
        ref = jaxdlm.generate(model, rows, mode="ar", max_new_tokens=MAX_NEW, temperature=1.0, seed=s)
        np.testing.assert_array_equal(np.asarray(many.tokens[i]), ref.tokens)
    rows2, prompts2, lens2 = _prompts(rng, (7, 2, 11))

    def body(carry, batch):
        out = fn(model.params, None, batch[0], batch[1], jax.random.PRNGKey(5), temperature=1.0)
        return carry + jnp.sum(out.lengths), out.tokens

    total, toks = jax.jit(lambda p, l: jax.lax.scan(body, jnp.int32(0), (p, l)))(
        jnp.stack([prompts, prompts2]), jnp.stack([lens, lens2]))
    want_total = 0
    for i, r in enumerate((rows, rows2)):
        ref = jaxdlm.generate(model, r, mode="ar", max_new_tokens=MAX_NEW, temperature=1.0, seed=5)
        np.testing.assert_array_equal(np.asarray(toks[i]), ref.tokens)
        want_total += int(ref.lengths.sum())
    assert int(total) == want_total


def test_sharded_params_give_the_same_tokens(seed, rng):
    """Parameters sharded over a tensor=2,fsdp=4 mesh of 8 fake CPU devices, fn jitted under jax.set_mesh."""
    model = tiny_model(seed)
    rows, prompts, lens = _prompts(rng, (3, 9, 5, 6))
    mesh = jaxdlm.make_mesh("tensor=2,fsdp=4")
    sharded = jaxdlm.shard_model(model, mesh)
    fn = jaxdlm.make_generate_fn(sharded, mode="linear_spec", batch=4, prompt_length=P_LEN, max_new_tokens=MAX_NEW,
                                 block_length=BLOCK)
    with jax.set_mesh(mesh):
        out = jax.jit(fn)(sharded.params, None, prompts, lens, jax.random.PRNGKey(0))
    ref = jaxdlm.generate(model, rows, mode="linear_spec", max_new_tokens=MAX_NEW, block_length=BLOCK)
    np.testing.assert_array_equal(np.asarray(out.tokens), ref.tokens)
    np.testing.assert_array_equal(np.asarray(out.nfe), ref.nfe)


@pytest.mark.parametrize("kwargs,match", [
    (dict(mode="beam"), "mode='beam'"),
    (dict(max_new_tokens=0), "max_new_tokens=0"),
    (dict(batch=0), "batch=0"),
    (dict(mode="ar", steps_per_block=3), "steps_per_block=3"),
    (dict(mode="quadratic_spec", block_length=1), "block_length=1"),
    (dict(spec_sampling="fuzzy"), "spec_sampling='fuzzy'"),
    (dict(cache_length=16), "cache_length=16"),
])
def test_bad_static_arguments_raise(kwargs, match):
    args = dict(mode="diffusion", batch=2, prompt_length=8, max_new_tokens=8, block_length=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=re.escape(match)):
        jaxdlm.make_generate_fn(tiny_model(0), **args)


def test_wrong_prompt_shape_raises(rng):
    model = tiny_model(0)
    fn = jaxdlm.make_generate_fn(model, mode="ar", batch=3, prompt_length=P_LEN, max_new_tokens=4)
    with pytest.raises(ValueError, match=r"made for \[batch=3, prompt_length=64\]"):
        fn(model.params, None, jnp.zeros((2, P_LEN), jnp.int32), jnp.ones((2,), jnp.int32), jax.random.PRNGKey(0))
