"""jaxdlm: block diffusion language models (Nemotron-Labs-Diffusion, Efficient-DLM) in JAX.

Public API::

    ModelConfig.from_hf(path_or_dict)     # Hugging Face config.json -> frozen config
    Model.init(config, seed=0)            # random model (tests, demos)
    model.logits(tokens, kind="causal")   # float32 [B, T, V]
    forward(module, tokens, kind=..., cache=...)   # pure forward for jitted code
    KVCache.init(config, batch, max_len)
    load(path, dtype=None, mesh=None, quantize=None)   # a checkpoint folder -> Model (quantize: int8/int4/fp8)
    save(model, path)                     # Model -> checkpoint folder (Orbax + config + tokenizer)
    load_default(dtype="float32")         # the embedded trained byte-level code model (offline)
    generate(model, prompts, mode="ar" | "diffusion" | "linear_spec" | "quadratic_spec" | "auto", ...)
    DecodeOptions(temperature=..., threshold=..., policy=..., ...)   # the decoding settings as one object
    make_generate_fn(model, mode=..., batch=..., prompt_length=..., max_new_tokens=...)   # pure, for your jit
    make_mesh("tensor=2,fsdp=4")          # a (data, fsdp, tensor) mesh; see jaxdlm.sharding
"""

from jaxdlm.cache import KVCache
from jaxdlm.checkpoint import load, save
from jaxdlm.config import ModelConfig, RopeConfig
from jaxdlm.default import load_default
from jaxdlm.generation import (DecodeOptions, GenerationOutput, GenerationResult, ar_generate, diffusion_generate,
                               generate, linear_spec_generate, make_generate_fn, quadratic_spec_generate)
from jaxdlm.model import Model, Transformer, forward
from jaxdlm.sharding import make_mesh, shard_model

__version__ = "0.1.0"

__all__ = ["KVCache", "Model", "ModelConfig", "RopeConfig", "Transformer", "forward", "load", "load_default", "save",
           "make_mesh", "shard_model", "DecodeOptions", "GenerationOutput", "GenerationResult", "generate", "make_generate_fn",
           "ar_generate", "diffusion_generate", "linear_spec_generate", "quadratic_spec_generate", "__version__"]
