"""Generation: AR, block diffusion, linear and quadratic self-speculation (docs/decoding.md).

Each call is one program (a ``lax.while_loop`` with static shapes): :func:`make_generate_fn` gives it as a pure
function for your own jitted code, :func:`generate` runs it from the host.
"""

from jaxdlm.generation.api import (GenerationOutput, GenerationResult, ar_generate, auto_mode, bucket_length,
                                   diffusion_generate, generate, linear_spec_generate, make_generate_fn,
                                   quadratic_spec_generate)
from jaxdlm.generation.knobs import Knobs
from jaxdlm.generation.modes import MODES, Mode, mode_names, register_mode
from jaxdlm.generation.options import DecodeOptions
from jaxdlm.generation.policies import POLICIES, Policy

__all__ = ["DecodeOptions", "GenerationOutput", "GenerationResult", "Knobs", "MODES", "Mode", "POLICIES", "Policy",
           "ar_generate", "auto_mode", "bucket_length", "diffusion_generate", "generate", "linear_spec_generate",
           "make_generate_fn", "mode_names", "quadratic_spec_generate", "register_mode"]
