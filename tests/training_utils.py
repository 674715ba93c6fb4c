"""Helpers shared by the training tests: a tiny diffusion-ready config and learnable token data."""

import numpy as np

from jaxdlm.config import ModelConfig

MASK_ID = 3


def tiny_config(block_size: int = 4, vocab: int = 48, **kw) -> ModelConfig:
    base = dict(model_type="nemotron_labs_diffusion", vocab_size=vocab, hidden_size=32, intermediate_size=64,
                num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mask_token_id=MASK_ID, eos_token_ids=(2,),
                bos_token_id=1, block_size=block_size)
    base.update(kw)
    return ModelConfig(**base)


def counting_data(rng, n: int, length: int, vocab: int, step: int = 1) -> np.ndarray:
    """Rows ``(start + step * i) % span + 4`` (ids 4.., avoiding the special ids): easy to learn."""
    span = vocab - 4
    start = rng.integers(0, span, size=(n, 1))
    return ((start + step * np.arange(length)[None, :]) % span + 4).astype(np.int32)
