"""KV cache consistency: incremental causal passes equal one full causal forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax import nnx

from jaxdlm import KVCache, Model, ModelConfig, RopeConfig, forward
from jaxdlm.hf import model_from_pure_dict
from jaxdlm.lora import OProjLoRA
from numerics import rel_err

TOL = 1e-5


def tiny_config(**kw):
    base = dict(model_type="ministral3", vocab_size=80, hidden_size=32, intermediate_size=48, num_layers=2,
                num_heads=4, num_kv_heads=2, head_dim=16, mask_token_id=3, block_size=4,
                rope=RopeConfig(rope_type="yarn", theta=1e4, factor=4.0, original_max_position_embeddings=16,
                                beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0,
                                llama4_scaling_beta=0.1))
    base.update(kw)
    return ModelConfig(**base)


def perturbed(model, seed):
    """A copy of ``model`` with non-unit norm weights (so that a wrong norm path shows)."""
    pure = nnx.to_pure_dict(model.params)
    key = jax.random.PRNGKey(seed)
    for norm in ("attn_norm", "mlp_norm"):
        w = pure["layers"][norm]["weight"]
        pure["layers"][norm]["weight"] = w + 0.3 * jax.random.normal(jax.random.fold_in(key, len(norm)), w.shape)
    return model_from_pure_dict(model.config, pure)


@pytest.fixture
def model(seed):
    return perturbed(Model.init(tiny_config(), seed=seed), seed)


def test_prefill_then_commits_equal_full_causal(model, rng):
    total = 30  # past original_max (16): query scale active
    tokens = rng.integers(0, 80, size=(3, total))
    full = np.asarray(model.logits(tokens))
    widths = []
    left = total - 7
    while left > 0:
        widths.append(int(min(left, rng.integers(1, 7))))
        left -= widths[-1]
    cache = KVCache.init(model.config, 3, 40)
    module = model.module
    out, cache = forward(module, jnp.asarray(tokens[:, :7]), kind="causal", cache=cache)
    pieces, start = [np.asarray(out)], 7
    for w in widths:
        out, cache = forward(module, jnp.asarray(tokens[:, start:start + w]), kind="causal", cache=cache)
        pieces.append(np.asarray(out))
        start += w
    np.testing.assert_array_equal(cache.length, [total] * 3)
    assert rel_err(np.concatenate(pieces, axis=1), full) <= TOL


def test_crop_and_reappend_reproduces_logits(model, rng):
    tokens = rng.integers(0, 80, size=(2, 20))
    module = model.module
    cache = KVCache.init(model.config, 2, 32)
    _, cache = forward(module, jnp.asarray(tokens[:, :12]), kind="causal", cache=cache)
    first, cache_after = forward(module, jnp.asarray(tokens[:, 12:]), kind="causal", cache=cache)
    # rejected draft: different tokens were appended, then cropped back
    junk = rng.integers(0, 80, size=(2, 8))
    _, dirty = forward(module, jnp.asarray(junk), kind="causal", cache=cache)
    cropped = dirty.with_length(12)
    np.testing.assert_array_equal(cropped.length, [12, 12])
    again, _ = forward(module, jnp.asarray(tokens[:, 12:]), kind="causal", cache=cropped)
    np.testing.assert_allclose(np.asarray(again), np.asarray(first), rtol=0, atol=1e-6)
    assert rel_err(again, np.asarray(model.logits(tokens))[:, 12:]) <= TOL


def test_ragged_rows_with_right_padding(model, rng):
    """Rows of different prompt lengths in one batch give what each row gives alone."""
    lengths = np.array([3, 9, 6])
    tokens = rng.integers(0, 80, size=(3, 9))
    nxt = rng.integers(0, 80, size=(3, 4))
    module = model.module
    cache = KVCache.init(model.config, 3, 24)
    _, cache = forward(module, jnp.asarray(tokens), kind="causal", cache=cache, num_valid=jnp.asarray(lengths))
    np.testing.assert_array_equal(cache.length, lengths)
    out, _ = forward(module, jnp.asarray(nxt), kind="causal", cache=cache)
    for i, n in enumerate(lengths):
        alone = np.concatenate([tokens[i, :n], nxt[i]])[None]
        ref = np.asarray(model.logits(alone))[0, n:]
        assert rel_err(np.asarray(out)[i], ref) <= TOL


def test_writes_past_capacity_are_dropped_not_clamped(model, rng):
    tokens = rng.integers(0, 80, size=(1, 6))
    module = model.module
    cache = KVCache.init(model.config, 1, 8)
    _, cache = forward(module, jnp.asarray(tokens), kind="causal", cache=cache)
    k_before = np.asarray(cache.k)[:, :, :, :6]
    _, over = forward(module, jnp.asarray(rng.integers(0, 80, size=(1, 4))), kind="causal", cache=cache)
    np.testing.assert_array_equal(np.asarray(over.k)[:, :, :, :6], k_before)
    assert int(over.length[0]) == 8


def test_lora_on_o_proj_equals_merged_weight(model, rng, seed):
    c = model.config
    r = 3
    key = jax.random.PRNGKey(seed)
    ka, kb = jax.random.split(key)
    lora = OProjLoRA(0.1 * jax.random.normal(ka, (c.num_layers, c.num_heads * c.head_dim, r)),
                     0.1 * jax.random.normal(kb, (c.num_layers, r, c.hidden_size)), jnp.float32(4.0))
    tokens = jnp.asarray(rng.integers(0, 80, size=(2, 8)))
    with_lora, _ = forward(model.module, tokens, kind="bidirectional", lora=lora)
    w = nnx.to_pure_dict(model.params)["layers"]["o_proj"]
    pure = nnx.to_pure_dict(model.params)
    pure["layers"]["o_proj"] = w + 4.0 * jnp.einsum("lir,lro->lio", lora.a, lora.b)
    merged = model_from_pure_dict(model.config, pure)
    ref, _ = forward(merged.module, tokens, kind="bidirectional")
    plain, _ = forward(model.module, tokens, kind="bidirectional")
    assert rel_err(with_lora, ref) <= TOL
    assert rel_err(plain, ref) > 1e-3


def test_forward_is_jittable_with_params_passed_in(model, rng):
    @jax.jit
    def step(params, tokens, cache):
        return forward(nnx.merge(model.graphdef, params), tokens, kind="causal", cache=cache)

    tokens = jnp.asarray(rng.integers(0, 80, size=(2, 5)))
    out, cache = step(model.params, tokens, KVCache.init(model.config, 2, 16))
    assert rel_err(out, model.logits(np.asarray(tokens))) <= TOL
    np.testing.assert_array_equal(cache.length, [5, 5])
