"""Sampling at T > 0: the filters against a numpy transcription, speculative rejection sampling against
the exact target distribution, and end-to-end self-speculation at T > 0 against the exact AR sampling
distribution of a tiny model (chi-square goodness of fit)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxdlm
from jaxdlm import Model, ModelConfig
from jaxdlm.generation.knobs import Knobs
from jaxdlm.generation.sampling import Sampler, exact_match_accept, filtered_logits, speculative_accept
from jaxdlm.hf import model_from_pure_dict

P_MIN = 1e-4  # reject the null only when a chi-square p-value falls below this


def chi2_pvalue(counts, probs, min_expected=5.0):
    """Pearson chi-square p-value of ``counts`` against ``probs`` (cells with small expectation merged)."""
    counts, probs = np.asarray(counts, float).ravel(), np.asarray(probs, float).ravel()
    n = counts.sum()
    expected = probs * n
    big = expected >= min_expected
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    stat = float(np.sum((obs[keep] - exp[keep]) ** 2 / exp[keep]))
    dof = int(keep.sum()) - 1
    return float(jax.scipy.special.gammaincc(dof / 2.0, stat / 2.0))


def np_filter(logits, mask_id, temperature, top_k, top_p):
    x = np.array(logits, np.float64)
    x[mask_id] = -np.inf
    x = x / temperature
    if top_k:
        kth = np.sort(x)[::-1][top_k - 1]
        x[x < kth] = -np.inf
    if top_p < 1:
        order = np.argsort(-x, kind="stable")
        p = np.exp(x[order] - x[order][0])
        p /= p.sum()
        before = np.cumsum(p) - p
        drop = order[before >= top_p]
        x[drop] = -np.inf
    return x


@pytest.mark.parametrize("top_k,top_p", [(None, 1.0), (5, 1.0), (None, 0.6), (7, 0.8), (1, 1.0)])
def test_filters_match_numpy(top_k, top_p, rng):
    logits = rng.normal(size=(6, 20)) * 2
    sampler = Sampler(greedy=False, use_top_k=top_k is not None, use_top_p=top_p < 1, mask_id=3)
    knobs = Knobs.make(temperature=0.7, top_k=top_k, top_p=top_p)
    got = np.asarray(filtered_logits(jnp.asarray(logits, jnp.float32), sampler, knobs))
    for i in range(6):
        want = np_filter(logits[i], 3, 0.7, top_k, top_p)
        np.testing.assert_array_equal(np.isfinite(got[i]), np.isfinite(want))
        np.testing.assert_allclose(got[i][np.isfinite(want)], want[np.isfinite(want)], rtol=1e-5)
    assert not np.isfinite(got[:, 3]).any()


def test_speculative_accept_reproduces_target_distribution(rng):
    """Two drafted positions over a 5-token vocabulary: the emitted (first, second) tokens follow the
    target joint distribution, although drafts come from a very different q."""
    v, n = 5, 200_000
    p = rng.dirichlet(np.ones(v) * 0.7, size=3)                    # target at positions 0, 1, bonus
    q = rng.dirichlet(np.ones(v) * 0.7, size=2)                    # draft distributions
    # targets must not depend on earlier tokens for a closed-form joint: context-free p
    key_d, key_a = jax.random.split(jax.random.PRNGKey(int(rng.integers(1 << 30))))
    draft = jax.random.categorical(key_d, jnp.log(jnp.asarray(q, jnp.float32)), shape=(n, 2)).astype(jnp.int32)
    pb = jnp.broadcast_to(jnp.asarray(p, jnp.float32), (n, 3, v))
    qb = jnp.broadcast_to(jnp.asarray(q, jnp.float32), (n, 2, v))
    a, bonus = jax.device_get(speculative_accept(draft, pb, qb, key_a))
    draft = np.asarray(draft)
    first = np.where(a >= 1, draft[:, 0], bonus)
    assert 0.05 < np.mean(a >= 1) < 0.95 and np.any(a == 2)
    assert chi2_pvalue(np.bincount(first, minlength=v), p[0]) > P_MIN
    # second token, among rows that emitted at least two tokens (a >= 1)
    second = np.where(a >= 2, draft[:, 1], bonus)[a >= 1]
    assert chi2_pvalue(np.bincount(second, minlength=v), p[1]) > P_MIN
    # the draft alone is far from the target: a sampler that accepted every draft would fail
    assert chi2_pvalue(np.bincount(draft[:, 0], minlength=v), p[0]) < 1e-12


def test_exact_match_accept():
    draft = jnp.asarray([[4, 5, 6], [4, 9, 6], [1, 1, 1]])
    ar = jnp.asarray([[4, 5, 6, 7], [4, 5, 6, 7], [2, 1, 1, 1]])
    a, bonus = exact_match_accept(draft, ar)
    np.testing.assert_array_equal(a, [3, 1, 0])
    np.testing.assert_array_equal(bonus, [7, 5, 2])


VOCAB, MASK, TEMP = 8, 7, 0.8
SMALL = ModelConfig(model_type="ministral3", vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=8, mask_token_id=MASK, eos_token_ids=(0,), block_size=4)


def small_model(seed):
    m = Model.init(SMALL, seed=seed)
    pure = nnx.to_pure_dict(m.params)
    pure["head"] = pure["head"] * 15.0  # spread but not degenerate distributions
    return model_from_pure_dict(SMALL, pure)


def exact_joint(model, prompt, n):
    """Exact probability of every n-token continuation under AR sampling at TEMP (MASK excluded)."""
    choices = [t for t in range(VOCAB) if t != MASK]
    conts = np.asarray(list(itertools.product(choices, repeat=n)))
    seqs = np.concatenate([np.broadcast_to(prompt, (len(conts), len(prompt))), conts], axis=1)
    logits = np.asarray(model.logits(seqs), np.float64)[:, len(prompt) - 1:-1]
    logits[..., MASK] = -np.inf
    logp = jax.nn.log_softmax(logits / TEMP, axis=-1)
    lp = np.take_along_axis(np.asarray(logp), conts[..., None], -1)[..., 0].sum(-1)
    return conts, np.exp(lp)


@pytest.mark.parametrize("mode,flavour", [("ar", "exact"), ("linear_spec", "rejection"),
                                          ("quadratic_spec", "rejection"), ("linear_spec", "exact")])
def test_sampled_self_speculation_follows_ar_distribution(mode, flavour, seed):
    """First three sampled tokens: joint histogram over 2048 rows vs the exact AR joint (343 cells)."""
    model = small_model(seed)
    prompt = np.random.default_rng(seed).integers(1, MASK, size=5)
    rows = 2048
    res = jaxdlm.generate(model, np.broadcast_to(prompt, (rows, 5)), mode=mode, max_new_tokens=3, block_length=4,
                          temperature=TEMP, spec_sampling=flavour, eos_token_id=[], seed=seed)
    assert np.all(res.lengths == 3) and not np.any(res.tokens == MASK)
    if mode == "quadratic_spec":
        again = jaxdlm.generate(model, np.broadcast_to(prompt, (rows, 5)), mode=mode, max_new_tokens=3,
                                block_length=4, temperature=TEMP, spec_sampling=flavour, eos_token_id=[], seed=seed)
        np.testing.assert_array_equal(again.tokens, res.tokens)  # seeded: reproducible
    conts, probs = exact_joint(model, prompt, 3)
    index = {tuple(c): i for i, c in enumerate(conts)}
    counts = np.bincount([index[tuple(t)] for t in res.tokens], minlength=len(conts))
    assert chi2_pvalue(counts, probs) > P_MIN
    if mode != "ar":
        assert mode == "quadratic_spec" or np.mean(res.nfe) < 5  # linear: some drafts were accepted
