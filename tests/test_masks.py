"""Attention patterns of docs/attention.md against transformers run with dense masks built here."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from jaxdlm import KVCache, forward
from hf_models import hf_logits, jax_twin, make_hf
from numerics import rel_err

TOL = 1e-5
RULES = ("xt_xt", "xt_x0", "x0_x0", "x0_xt")


def two_stream_reference_mask(length: int, block: int, flip: str | None = None) -> np.ndarray:
    """The 2L x 2L mask written straight from the four rules of docs/attention.md (``flip`` negates one of them)."""
    n = 2 * length
    allowed = np.zeros((n, n), bool)
    for qi, ki in itertools.product(range(n), range(n)):
        q_noisy, k_noisy = qi < length, ki < length
        q_pos, k_pos = qi % length, ki % length
        q_blk, k_blk = q_pos // block, k_pos // block
        if q_noisy and k_noisy:
            rule, ok = "xt_xt", q_blk == k_blk
        elif q_noisy and not k_noisy:
            rule, ok = "xt_x0", k_blk < q_blk
        elif not q_noisy and not k_noisy:
            rule, ok = "x0_x0", k_pos <= q_pos
        else:
            rule, ok = "x0_xt", False
        allowed[qi, ki] = (not ok) if rule == flip else ok
    return allowed


def _two_stream_case(seed, rng, length, block):
    hf = make_hf("nld", seed)
    model = jax_twin(hf, "nld", block_size=block)
    assert model.config.block_size == block
    x0 = rng.integers(0, 96, size=(2, length))
    xt = np.where(rng.random((2, length)) < 0.5, 5, x0)
    tokens = np.concatenate([xt, x0], axis=1)
    pos = np.broadcast_to(np.concatenate([np.arange(length)] * 2), tokens.shape)
    return hf, model, tokens, pos


@pytest.mark.parametrize("length,block", [(12, 4), (10, 4), (7, 3), (9, 16)])
def test_two_stream_matches_dense_reference(length, block, seed, rng):
    hf, model, tokens, pos = _two_stream_case(seed, rng, length, block)
    ours = np.asarray(model.logits(tokens, kind="two_stream"))
    ref_mask = np.broadcast_to(two_stream_reference_mask(length, block), (2, 2 * length, 2 * length))
    ref = hf_logits(hf, tokens, positions=pos, allowed=ref_mask)
    assert rel_err(ours[:, :length], ref[:, :length]) <= TOL  # x_t half (diffusion)
    assert rel_err(ours[:, length:], ref[:, length:]) <= TOL  # x_0 half (AR)
    # the x_0 half IS the plain causal model
    causal = np.asarray(model.logits(tokens[:, length:]))
    assert rel_err(ours[:, length:], causal) <= TOL


@pytest.mark.parametrize("flip", RULES)
def test_two_stream_detects_each_flipped_rule(flip, seed, rng):
    """Each of the four rules matters: flipping any one in the reference breaks agreement."""
    length, block = 8, 4
    hf, model, tokens, pos = _two_stream_case(seed, rng, length, block)
    ours = np.asarray(model.logits(tokens, kind="two_stream"))
    bad = np.broadcast_to(two_stream_reference_mask(length, block, flip=flip), (2, 2 * length, 2 * length))
    ref = hf_logits(hf, tokens, positions=pos, allowed=bad)
    assert rel_err(ours, ref) > 1e-3


@pytest.mark.parametrize("prefix,width", [(5, 4), (7, 8), (1, 3)])
def test_denoise_pass_over_cache_matches_dense_reference(prefix, width, seed, rng):
    """A block sees the whole cache and all of itself; the cache keeps its length and content."""
    hf = make_hf("nld", seed)
    model = jax_twin(hf, "nld")
    module = model.module
    seq = rng.integers(0, 96, size=(2, prefix + width))
    seq[:, prefix + 1:] = np.where(rng.random((2, width - 1)) < 0.6, 5, seq[:, prefix + 1:])
    cache = KVCache.init(model.config, 2, 32)
    _, cache = forward(module, jnp.asarray(seq[:, :prefix]), kind="causal", cache=cache)
    logits, after = forward(module, jnp.asarray(seq[:, prefix:]), kind="denoise", cache=cache)
    n = prefix + width
    dense = np.tril(np.ones((n, n), bool))
    dense[prefix:, :] = True  # block rows: whole prefix + whole block
    ref = hf_logits(hf, seq, allowed=np.broadcast_to(dense, (2, n, n)))
    assert rel_err(logits, ref[:, prefix:]) <= TOL
    np.testing.assert_array_equal(after.length, cache.length)
    np.testing.assert_array_equal(np.asarray(after.k)[:, :, :, :prefix], np.asarray(cache.k)[:, :, :, :prefix])
    # a causal commit of the same positions afterwards is exact causal logits (the scratch is overwritten)
    commit, _ = forward(module, jnp.asarray(seq[:, prefix:]), kind="causal", cache=after)
    assert rel_err(commit, hf_logits(hf, seq)[:, prefix:]) <= TOL


def test_bidirectional_kind_matches_full_mask(seed, rng):
    hf = make_hf("nld", seed)
    model = jax_twin(hf, "nld")
    tokens = rng.integers(0, 96, size=(2, 9))
    ours = np.asarray(model.logits(tokens, kind="bidirectional"))
    ref = hf_logits(hf, tokens, allowed=np.ones((2, 9, 9), bool))
    assert rel_err(ours, ref) <= TOL
