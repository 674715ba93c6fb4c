"""The traced numeric settings of a generation program: changing any of them never recompiles it.

Static choices (mode, shapes, greedy or sampling, which filters exist) live in
:class:`jaxdlm.generation.core.Plan`; everything numeric that the program only reads lives here, as
scalar arrays, so one compiled program serves every threshold, temperature, policy or budget.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

# diffusion commit policies (jaxdlm.generation.diffusion); the traced policy id is the index
POLICIES = ("confidence", "margin", "entropy", "leftmost")
# the knob each non-threshold policy reads, and its default (see generate()'s docstring)
POLICY_KNOB_DEFAULTS = {"margin": 0.8, "entropy_bound": 0.3}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Knobs:
    """Scalar arrays read inside a generation program.

    Attributes:
      temperature: ``float32 []`` sampling temperature (read only by sampling programs).
      top_k: ``int32 []`` top-k filter size (``<= 0``: off; read when the plan's sampler has the filter).
      top_p: ``float32 []`` nucleus mass (``1``: off).
      threshold: ``float32 []`` the diffusion confidence threshold (policies ``confidence`` and ``leftmost``).
      policy: ``int32 []`` index into :data:`POLICIES`.
      margin: ``float32 []`` the ``margin`` policy's cut.
      entropy_bound: ``float32 []`` the ``entropy`` policy's bound (nats).
      max_thinking: ``int32 []`` thinking budget in tokens.
      end_think: ``int32 []`` the end-of-thinking token id (``< 0``: no budget).
    """

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    threshold: jax.Array
    policy: jax.Array
    margin: jax.Array
    entropy_bound: jax.Array
    max_thinking: jax.Array
    end_think: jax.Array

    @classmethod
    def make(cls, *, temperature=0.0, top_k=None, top_p=None, threshold=0.9, policy="confidence", margin=None,
             entropy_bound=None, max_thinking_tokens=None, end_think_token_id=None) -> "Knobs":
        """Knobs from Python values or (traced) arrays; ``None`` means off / the policy's default.

        ``policy`` is a name from :data:`POLICIES` or an ``int32`` id.  No range checks here (values may be
        traced): :func:`jaxdlm.generate` checks its arguments before it builds the knobs.
        """
        if isinstance(policy, str):
            if policy not in POLICIES:
                raise ValueError(f"policy={policy!r} is not a diffusion commit policy; expected one of {POLICIES}")
            policy = POLICIES.index(policy)
        f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
        i32 = lambda x: jnp.asarray(x, jnp.int32)  # noqa: E731
        return cls(temperature=f32(temperature), top_k=i32(0 if top_k is None else top_k),
                   top_p=f32(1.0 if top_p is None else top_p), threshold=f32(0.0 if threshold is None else threshold),
                   policy=i32(policy),
                   margin=f32(POLICY_KNOB_DEFAULTS["margin"] if margin is None else margin),
                   entropy_bound=f32(POLICY_KNOB_DEFAULTS["entropy_bound"] if entropy_bound is None else entropy_bound),
                   max_thinking=i32(0 if max_thinking_tokens is None else max_thinking_tokens),
                   end_think=i32(-1 if end_think_token_id is None else end_think_token_id))
