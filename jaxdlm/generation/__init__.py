"""Generation: AR, block diffusion, linear and quadratic self-speculation (SPEC.md section 5).

Each call is one jitted program (a ``lax.while_loop`` with static shapes); see :func:`generate`.
"""

from jaxdlm.generation.api import (GenerationResult, ar_generate, auto_mode, bucket_length, diffusion_generate,
                                   generate, linear_spec_generate, quadratic_spec_generate)

__all__ = ["GenerationResult", "ar_generate", "auto_mode", "bucket_length", "diffusion_generate", "generate",
           "linear_spec_generate", "quadratic_spec_generate"]
