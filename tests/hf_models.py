"""Tiny random Hugging Face (PyTorch) models and their jaxdlm twins, built in the test (no download)."""

from __future__ import annotations

import numpy as np
import torch
import transformers

from jaxdlm import ModelConfig
from jaxdlm.hf import model_from_pure_dict, params_from_hf

torch.set_num_threads(2)

MASK_ID = 5

YARN = {
    "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
    "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.1,
}

# name -> (transformers config class, model class, config kwargs)
CASES = {
    # Ministral-3 with YaRN, llama-4 query scale, explicit head_dim != hidden/heads, GQA 4:2
    "ministral3": ("Ministral3Config", "Ministral3ForCausalLM", dict(
        hidden_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_parameters=YARN,
        tie_word_embeddings=False)),
    # NLD: the Ministral-3 weights under encoder.* / diffusion_head, untied head
    "nld": ("Ministral3Config", "Ministral3ForCausalLM", dict(
        hidden_size=48, num_attention_heads=4, num_key_value_heads=1, head_dim=16, rope_parameters=YARN,
        tie_word_embeddings=False)),
    "llama_tied": ("LlamaConfig", "LlamaForCausalLM", dict(
        hidden_size=32, num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    "llama_untied_llama3": ("LlamaConfig", "LlamaForCausalLM", dict(
        hidden_size=32, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "mistral_window": ("MistralConfig", "MistralForCausalLM", dict(
        hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=5,
        tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
}


def make_hf(case: str, seed: int, vocab: int = 96, layers: int = 2, intermediate: int = 64, **overrides):
    """A tiny random transformers model in float32 with random (non-unit) norm weights (``overrides``: config
    fields of the case to change, e.g. ``hidden_size``)."""
    cfg_cls, model_cls, kw = CASES[case]
    torch.manual_seed(seed)
    cfg = getattr(transformers, cfg_cls)(
        vocab_size=vocab, intermediate_size=intermediate, num_hidden_layers=layers, max_position_embeddings=4096,
        rms_norm_eps=1e-5, attn_implementation="eager", bos_token_id=1, eos_token_id=2, pad_token_id=0,
        **{**kw, **overrides})
    model = getattr(transformers, model_cls)(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    return model


def hf_config_dict(hf_model, case: str) -> dict:
    d = hf_model.config.to_dict()
    if case == "nld":
        d["model_type"] = "nemotron_labs_diffusion"
        d["mask_token_id"] = MASK_ID
        d["block_size"] = 4
    return d


def hf_tensors(hf_model, case: str) -> dict[str, np.ndarray]:
    """The state dict as numpy, renamed to the NLD layout for the ``nld`` case."""
    out = {}
    for k, v in hf_model.state_dict().items():
        v = v.detach().cpu().float().numpy()
        if case == "nld":
            k = k.replace("model.", "encoder.", 1) if k.startswith("model.") else k
            k = "diffusion_head.weight" if k == "lm_head.weight" else k
        out[k] = v
    return out


def jax_twin(hf_model, case: str, **config_overrides):
    """The jaxdlm Model with the same weights (through the converter's tensor map)."""
    cfg = ModelConfig.from_hf({**hf_config_dict(hf_model, case), **config_overrides})
    return model_from_pure_dict(cfg, params_from_hf(cfg, hf_tensors(hf_model, case)))


def hf_logits(hf_model, tokens: np.ndarray, positions: np.ndarray | None = None, allowed: np.ndarray | None = None):
    """transformers logits (float32 numpy) with optional position ids and a dense bool mask ``[B, T, T]``."""
    kwargs = {}
    if positions is not None:
        kwargs["position_ids"] = torch.as_tensor(np.asarray(positions), dtype=torch.long)
    if allowed is not None:
        m = torch.as_tensor(np.asarray(allowed))
        kwargs["attention_mask"] = torch.where(m, 0.0, torch.finfo(torch.float32).min)[:, None]
    with torch.no_grad():
        return hf_model(torch.as_tensor(np.asarray(tokens), dtype=torch.long), **kwargs).logits.float().numpy()
