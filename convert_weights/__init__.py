"""convert_weights: Hugging Face safetensors checkpoints -> jaxdlm checkpoints (Orbax), streamed.

Command line::

    python -m convert_weights HF_DIR OUT_DIR [--dtype keep|bfloat16|float32] [--lora DIR]
                              [--quantize int8|int4|fp8 [--quantize-head]] [--overwrite] [--quiet] [--debug]
    convert-weights ...       (the same, as a console script)

Python::

    from convert_weights import convert
    convert("hf/Nemotron-Labs-Diffusion-3B", "ckpt/nld-3b", dtype="bfloat16")
    model = jaxdlm.load("ckpt/nld-3b")
"""

from convert_weights.core import ConversionError, __version__, convert
from convert_weights.cli import main

__all__ = ["ConversionError", "__version__", "convert", "main"]
