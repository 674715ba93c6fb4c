"""ModelConfig parsing and RoPE tables against transformers."""

import dataclasses
import json

import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from jaxdlm import ModelConfig, RopeConfig
from jaxdlm import rope as rope_lib

NLD_ROPE = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 16.0, "original_max_position_embeddings": 16384,
            "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.1}


def nld_config(size="8B", **kw):
    hidden, layers, inter = {"3B": (3072, 26, 9216), "8B": (4096, 34, 14336), "14B": (5120, 40, 16384)}[size]
    d = {"model_type": "nemotron_labs_diffusion", "hidden_size": hidden, "num_hidden_layers": layers,
         "intermediate_size": inter, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
         "vocab_size": 131072, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "max_position_embeddings": 262144,
         "mask_token_id": 100, "eos_token_id": 11, "bos_token_id": 1, "block_size": 32, "rope_parameters": NLD_ROPE,
         "hidden_act": "silu", "dtype": "bfloat16"}
    d.update(kw)
    return d


@pytest.mark.parametrize("size,billions", [("3B", 3.8), ("8B", 8.5), ("14B", 13.5)])
def test_nld_configs_parse(size, billions, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(nld_config(size)))
    for source in (path, tmp_path, nld_config(size)):
        cfg = ModelConfig.from_hf(source)
        assert cfg.is_nld and cfg.mask_token_id == 100 and cfg.eos_token_id == 11 and cfg.block_size == 32
        assert cfg.head_dim == 128 and cfg.num_groups == 4 and not cfg.tie_word_embeddings and not cfg.qk_norm
        assert cfg.rope.rope_type == "yarn" and cfg.rope.llama4_scaling_beta == 0.1
    assert abs(cfg.num_params() / 1e9 - billions) < 0.15
    assert hash(cfg) == hash(ModelConfig.from_hf(nld_config(size)))
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_legacy_rope_scaling_and_eos_list():
    cfg = ModelConfig.from_hf(nld_config(rope_parameters=None, rope_theta=5e5, eos_token_id=[11, 2],
                                         rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                       "high_freq_factor": 4.0,
                                                       "original_max_position_embeddings": 8192}))
    assert cfg.rope.rope_type == "llama3" and cfg.rope.theta == 5e5 and cfg.eos_token_ids == (11, 2)


@pytest.mark.parametrize("change,message", [
    ({"model_type": "gpt2"}, "model_type='gpt2' is not supported; supported: nemotron_labs_diffusion"),
    ({"num_key_value_heads": 7}, "num_attention_heads=32 is not divisible by num_key_value_heads=7"),
    ({"hidden_size": None}, "missing required field 'hidden_size'"),
    ({"vocab_size": None}, "missing required field 'vocab_size'"),
    ({"mask_token_id": None}, "missing required field 'mask_token_id'"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "rope_type='longrope' is not supported"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "needs factor > 0"),
    ({"attention_bias": True}, "attention_bias=true is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
    ({"mask_token_id": 131072}, "mask_token_id=131072 is outside the vocabulary"),
    ({"head_dim": 127}, "head_dim=127 must be even"),
])
def test_bad_configs_raise_value_error_naming_the_field(change, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        ModelConfig.from_hf(nld_config(**change))


def test_missing_config_file(tmp_path):
    with pytest.raises(ValueError, match="config file not found"):
        ModelConfig.from_hf(tmp_path)


def _hf_inv_freq(rope_parameters, head_dim=128, hidden=4096, heads=32):
    cfg = transformers.LlamaConfig(hidden_size=hidden, num_attention_heads=heads, head_dim=head_dim,
                                   max_position_embeddings=262144, rope_parameters=dict(rope_parameters))
    rope_type = rope_parameters["rope_type"]
    if rope_type == "default":
        base = rope_parameters["rope_theta"]
        return (1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))).numpy(), 1.0
    inv, factor = ROPE_INIT_FUNCTIONS[rope_type](cfg, "cpu")
    return inv.numpy(), factor


@pytest.mark.parametrize("params,head_dim", [
    (NLD_ROPE, 128),
    ({**NLD_ROPE, "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 64}, 16),
    ({"rope_type": "yarn", "rope_theta": 1e4, "factor": 8.0, "original_max_position_embeddings": 4096}, 64),
    ({"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 8192}, 128),
    ({"rope_type": "default", "rope_theta": 1e6}, 128),
    ({"rope_type": "default", "rope_theta": 1e4}, 64),
])
def test_inverse_frequencies_match_transformers(params, head_dim):
    """Within 2 float32 ulp (ours are correctly rounded; torch's float32 pow may be 1 ulp off)."""
    cfg = ModelConfig.from_hf(nld_config(rope_parameters=params, head_dim=head_dim))
    ours, factor = rope_lib.inv_freq(cfg.rope, head_dim)
    ref, ref_factor = _hf_inv_freq(params, head_dim)
    np.testing.assert_allclose(ours, ref, rtol=2.5e-7, atol=0)
    assert factor == pytest.approx(ref_factor, abs=0)


def test_nld_yarn_ramp_runs_from_pair_20_to_37():
    cfg = ModelConfig.from_hf(nld_config())
    inv, factor = rope_lib.inv_freq(cfg.rope, 128)
    base = (1.0 / rope_lib._base_powers(1e6, 128)).astype(np.float32)
    assert factor == 1.0
    np.testing.assert_array_equal(inv[:21], base[:21])  # pairs 0..20 keep the base frequency
    np.testing.assert_allclose(inv[37:], base[37:] / 16, rtol=1e-6)  # pairs 37.. divided by factor
    assert np.all((inv[21:37] < base[21:37]) & (inv[21:37] > base[21:37] / 16))


def test_query_scale_values():
    rope = ModelConfig.from_hf(nld_config()).rope
    pos = np.array([0, 16383, 16384, 40000])
    scale = np.asarray(rope_lib.query_scale(rope, pos))
    np.testing.assert_allclose(scale, [1, 1, 1 + 0.1 * np.log(2), 1 + 0.1 * np.log(3)], rtol=1e-6)
    assert rope_lib.query_scale(dataclasses.replace(rope, llama4_scaling_beta=None), pos) is None


def test_rope_config_validation():
    with pytest.raises(ValueError, match="rope_type='ntk' is not supported"):
        RopeConfig(rope_type="ntk")
    with pytest.raises(ValueError, match="needs original_max_position_embeddings"):
        RopeConfig(rope_type="yarn", factor=2.0)
