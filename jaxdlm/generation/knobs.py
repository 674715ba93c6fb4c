"""The traced numeric settings of a generation program: changing any of them never recompiles it.

Static choices (mode, shapes, greedy or sampling, which filters exist) live in
:class:`jaxdlm.generation.core.Plan`; everything numeric that the program only reads lives here, as
scalar arrays, so one compiled program serves every threshold, temperature, policy or budget.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxdlm.generation.policies import KNOB_DEFAULTS, policy_id


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Knobs:
    """Scalar arrays read inside a generation program.

    Attributes:
      temperature: ``float32 []`` sampling temperature (read only by sampling programs).
      top_k: ``int32 []`` top-k filter size (``<= 0``: off; read when the plan's sampler has the filter).
      top_p: ``float32 []`` nucleus mass (``1``: off).
      threshold: ``float32 []`` the diffusion confidence threshold (policies ``confidence`` and ``leftmost``).
      policy: ``int32 []`` index into :data:`jaxdlm.generation.policies.REGISTRY`.
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

        ``policy`` is a name from :data:`~jaxdlm.generation.policies.POLICIES` or an ``int32`` id.  No range checks here (values may be
        traced): :func:`jaxdlm.generate` checks its arguments before it builds the knobs.
        """
        f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
        i32 = lambda x: jnp.asarray(x, jnp.int32)  # noqa: E731
        cut = lambda name, x: f32(KNOB_DEFAULTS[name] if x is None else x)  # noqa: E731
        return cls(temperature=f32(temperature), top_k=i32(0 if top_k is None else top_k),
                   top_p=f32(1.0 if top_p is None else top_p), threshold=cut("threshold", threshold),
                   policy=policy_id(policy), margin=cut("margin", margin),
                   entropy_bound=cut("entropy_bound", entropy_bound),
                   max_thinking=i32(0 if max_thinking_tokens is None else max_thinking_tokens),
                   end_think=i32(-1 if end_think_token_id is None else end_think_token_id))
