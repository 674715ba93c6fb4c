"""Logits parity with Hugging Face transformers (PyTorch) on tiny random models, float32."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxdlm.attention import masks
from hf_models import CASES, hf_logits, jax_twin, make_hf
from numerics import rel_err

TOL = 1e-5


@pytest.mark.parametrize("case", sorted(CASES))
def test_causal_logits_match_transformers(case, seed, rng):
    hf = make_hf(case, seed)
    model = jax_twin(hf, case)
    tokens = rng.integers(0, hf.config.vocab_size, size=(2, 13))
    ours = np.asarray(model.logits(tokens))
    ref = hf_logits(hf, tokens)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    assert rel_err(ours, ref) <= TOL


@pytest.mark.parametrize("case", ["ministral3", "nld", "llama_untied_llama3", "qwen3"])
@pytest.mark.parametrize("offset", [61, 150, 1000])
def test_logits_match_past_original_max_positions(case, offset, seed, rng):
    """Positions past original_max_position_embeddings (64 here): YaRN + llama-4 query scale active."""
    hf = make_hf(case, seed)
    model = jax_twin(hf, case)
    t = 9
    tokens = rng.integers(0, hf.config.vocab_size, size=(2, t))
    pos = np.broadcast_to(offset + np.arange(t), (2, t)).astype(np.int32)
    info = masks.sequence_info(jnp.asarray(pos), "causal")
    ours, _ = model.module(jnp.asarray(tokens), info.pos, info, info)
    ref = hf_logits(hf, tokens, positions=pos)
    assert rel_err(ours, ref) <= TOL


def test_query_scale_changes_logits_past_original_max(seed, rng):
    """Guard: the offset test above is meaningful only if the llama-4 scale changes the output there."""
    import dataclasses

    hf = make_hf("ministral3", seed)
    model = jax_twin(hf, "ministral3")
    rope = dataclasses.replace(model.config.rope, llama4_scaling_beta=None)
    cfg = dataclasses.replace(model.config, rope=rope)
    from jaxdlm.hf import model_from_pure_dict
    from flax import nnx

    unscaled = model_from_pure_dict(cfg, nnx.to_pure_dict(model.params))
    tokens = rng.integers(0, 96, size=(1, 6))
    pos = jnp.asarray(150 + np.arange(6))[None]
    info = masks.sequence_info(pos, "causal")
    a, _ = model.module(jnp.asarray(tokens), pos, info, info)
    b, _ = unscaled.module(jnp.asarray(tokens), pos, info, info)
    assert rel_err(a, b) > 1e-3
    ref = hf_logits(hf, tokens, positions=np.asarray(pos))
    assert rel_err(a, ref) <= TOL < rel_err(b, ref)


def test_bf16_params_close_to_float32(seed, rng):
    hf = make_hf("nld", seed)
    model = jax_twin(hf, "nld")
    tokens = rng.integers(0, 96, size=(2, 16))
    ref = np.asarray(model.logits(tokens))
    bf = model.astype(jnp.bfloat16)
    assert bf.dtype == jnp.bfloat16
    out = np.asarray(bf.logits(tokens))
    assert out.dtype == np.float32
    assert rel_err(out, ref) <= 2e-2
    assert rel_err(out, ref) > 0  # really ran in bf16
