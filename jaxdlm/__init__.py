"""jaxdlm: block diffusion language models (Nemotron-Labs-Diffusion, Efficient-DLM) in JAX.

Public API::

    ModelConfig.from_hf(path_or_dict)     # Hugging Face config.json -> frozen config
    Model.init(config, seed=0)            # random model (tests, demos)
    model.logits(tokens, kind="causal")   # float32 [B, T, V]
    forward(module, tokens, kind=..., cache=...)   # pure forward for jitted code
    KVCache.init(config, batch, max_len)
    generate(model, prompts, mode="ar" | "diffusion" | "linear_spec" | "quadratic_spec" | "auto", ...)
"""

from jaxdlm.cache import KVCache
from jaxdlm.config import ModelConfig, RopeConfig
from jaxdlm.model import Model, Transformer, forward
from jaxdlm.generation import (GenerationResult, ar_generate, diffusion_generate, generate, linear_spec_generate,
                               quadratic_spec_generate)

__version__ = "0.1.0"

__all__ = ["KVCache", "Model", "ModelConfig", "RopeConfig", "Transformer", "forward", "__version__",
           "GenerationResult", "generate", "ar_generate", "diffusion_generate", "linear_spec_generate",
           "quadratic_spec_generate"]
