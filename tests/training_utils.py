"""Helpers shared by the training tests: a tiny diffusion-ready config and learnable token data."""

import numpy as np

from jaxdlm import testing
from jaxdlm.config import ModelConfig

MASK_ID = testing.TINY_MASK


def tiny_config(block_size: int = 4, vocab: int = 48, **kw) -> ModelConfig:
    """``jaxdlm.testing.tiny_config`` as an NLD model (vocab 48, MLP 64, head_dim 8) for the training tests."""
    base = dict(model_type="nemotron_labs_diffusion", vocab_size=vocab, intermediate_size=64, head_dim=8,
                bos_token_id=1, block_size=block_size)
    base.update(kw)
    return testing.tiny_config(**base)


def counting_data(rng, n: int, length: int, vocab: int, step: int = 1) -> np.ndarray:
    """Rows ``(start + step * i) % span + 4`` (ids 4.., avoiding the special ids): easy to learn."""
    span = vocab - 4
    start = rng.integers(0, span, size=(n, 1))
    return ((start + step * np.arange(length)[None, :]) % span + 4).astype(np.int32)
