"""The registry of diffusion commit policies: which masked positions one denoise pass commits.

A :class:`Policy` owns everything about itself: its name, the knob it reads (a field of
:class:`~jaxdlm.generation.knobs.Knobs` and the ``generate`` keyword of the same name), the knob's default and
valid range, and its commit rule.  :data:`REGISTRY` is the one list of policies; a policy's traced id is its index
there, and the ``lax.switch`` of :func:`commit_mask` is built from it, so the order can never drift.

Every rule scores masked positions from the temperature-1 softmax over the full vocabulary (MASK in the
denominator, never chosen) of the chosen token ``x0`` and commits at least one masked position per pass (the
progress guarantee).  The rules are described in the module docstring of :mod:`jaxdlm.generation.diffusion`
and in docs/decoding.md.

Shapes: ``B`` rows, ``N`` block length, ``V`` vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp

from jaxdlm.generation.sampling import confidence, entropy, margin, per_row


@dataclasses.dataclass(frozen=True)
class Policy:
    """One diffusion commit policy.

    Attributes:
      name: the ``policy=`` value that selects it.
      knob: the knob it reads: a :class:`~jaxdlm.generation.knobs.Knobs` field and ``generate`` keyword.
      default: the knob's default value.
      low, high: the knob's valid closed range.
      meaning: what the knob is, for error messages and help texts.
      commit: ``commit(logits float32 [B, N, V], x0 int32 [B, N], masked bool [B, N], cut float32 [],
        mask_id) -> bool [B, N]``, a subset of ``masked`` with at least one position in every row that has one.
      fixed_schedule: whether ``threshold=None`` (the fixed schedule of ``steps_per_block`` steps, which ranks
        by confidence) is this policy's.
    """

    name: str
    knob: str
    default: float
    low: float
    high: float
    meaning: str
    commit: Callable
    fixed_schedule: bool = False

    @property
    def range_text(self) -> str:
        """The valid range in words: ``"in [0, 1]"`` or ``">= 0"``."""
        return f">= {self.low:g}" if math.isinf(self.high) else f"in [{self.low:g}, {self.high:g}]"

    def check(self, value) -> float:
        """``value`` as a float in ``[low, high]``, else a ``ValueError`` naming the knob and its range."""
        try:
            v = float(value)
        except (TypeError, ValueError):
            v = math.nan
        if not self.low <= v <= self.high:
            raise ValueError(f"{self.knob}={value!r} must be a number {self.range_text} ({self.meaning})")
        return v


def _best_and_above(score_BxN, masked_BxN, cut):
    """The masked position with the highest score (first one on ties) and every masked one ``>= cut``."""
    idx = jnp.arange(score_BxN.shape[1])[None, :]
    best_B = jnp.argmax(jnp.where(masked_BxN, score_BxN, -jnp.inf), axis=1)
    return masked_BxN & ((score_BxN >= cut) | (idx == best_B[:, None]))


def by_confidence(logits_BxNxV, x0_BxN, masked_BxN, cut, mask_id):
    """The most confident masked position and every one with ``p(x0) >= cut`` (the reference's rule)."""
    return _best_and_above(confidence(logits_BxNxV, x0_BxN), masked_BxN, cut)


def by_margin(logits_BxNxV, x0_BxN, masked_BxN, cut, mask_id):
    """The masked position with the largest margin and every one with margin ``>= cut``."""
    return _best_and_above(margin(logits_BxNxV, x0_BxN, mask_id), masked_BxN, cut)


def by_entropy(logits_BxNxV, x0_BxN, masked_BxN, cut, mask_id):
    """Masked positions in increasing entropy while their summed entropy is ``<= cut`` nats, at least one."""
    ent_BxN = jnp.where(masked_BxN, entropy(logits_BxNxV), jnp.inf)
    order_BxN = jnp.argsort(ent_BxN, axis=1, stable=True)       # masked positions first, lowest entropy first
    rank_BxN = jnp.argsort(order_BxN, axis=1, stable=True)
    summed_BxN = jnp.take_along_axis(jnp.cumsum(jnp.take_along_axis(ent_BxN, order_BxN, 1), axis=1), rank_BxN, 1)
    return masked_BxN & ((rank_BxN == 0) | (summed_BxN <= cut))


def by_leftmost(logits_BxNxV, x0_BxN, masked_BxN, cut, mask_id):
    """The leftmost masked position and the contiguous run after it while each has ``p(x0) >= cut``."""
    idx = jnp.arange(masked_BxN.shape[1])[None, :]
    first_Bx1 = jnp.argmax(masked_BxN, axis=1)[:, None]          # leftmost masked position (forced)
    ok_BxN = (masked_BxN & (confidence(logits_BxNxV, x0_BxN) >= cut)) | (idx == first_Bx1)
    blocked_BxN = jnp.cumsum(((idx >= first_Bx1) & ~ok_BxN).astype(jnp.int32), axis=1) > 0
    return masked_BxN & (idx >= first_Bx1) & ~blocked_BxN


_THRESHOLD = "probability of the chosen token"
REGISTRY: tuple[Policy, ...] = (
    Policy("confidence", "threshold", 0.9, 0.0, 1.0, _THRESHOLD, by_confidence, fixed_schedule=True),
    Policy("margin", "margin", 0.8, 0.0, 1.0, "top-1 minus top-2 probability", by_margin),
    Policy("entropy", "entropy_bound", 0.3, 0.0, float("inf"), "summed entropy of one pass's commits, nats",
           by_entropy),
    Policy("leftmost", "threshold", 0.9, 0.0, 1.0, _THRESHOLD, by_leftmost),
)
POLICIES: tuple[str, ...] = tuple(p.name for p in REGISTRY)
# every knob some policy reads, with its default (the first policy that reads it sets it)
KNOB_DEFAULTS: dict[str, float] = {}
for _p in REGISTRY:
    KNOB_DEFAULTS.setdefault(_p.knob, _p.default)


def get(name: str) -> Policy:
    """The policy called ``name``, else a ``ValueError`` listing the known ones."""
    for p in REGISTRY:
        if p.name == name:
            return p
    raise ValueError(f"policy={name!r} is not a diffusion commit policy; expected one of {POLICIES}")


def policy_id(name_or_id):
    """The traced ``int32`` id of a policy name (an id, possibly traced, passes through)."""
    if isinstance(name_or_id, str):
        return jnp.int32(POLICIES.index(get(name_or_id).name))
    return jnp.asarray(name_or_id, jnp.int32)


def commit_mask(policy, logits_BxNxV, x0_BxN, masked_BxN, knobs, mask_id: int | None):
    """The positions one denoise pass commits under the traced ``policy`` id.

    Args:
      policy: ``int32 []`` index into :data:`REGISTRY`, or ``int32 [B]`` one per row (the serving engine).
      logits_BxNxV: ``float32`` denoise-pass logits; x0_BxN: ``int32`` the chosen tokens.
      masked_BxN: ``bool`` positions still masked (a row with none commits nothing).
      knobs: :class:`~jaxdlm.generation.knobs.Knobs` (each policy reads its own knob field; scalars or ``[B]``).
      mask_id: the MASK id (excluded from the margin's runner-up).

    Returns ``bool [B, N]``.  One policy id: only the selected policy's branch runs (``lax.switch`` over
    :data:`REGISTRY`); one per row: every policy runs and each row takes its own.
    """
    rules = [lambda _, p=p: p.commit(logits_BxNxV, x0_BxN, masked_BxN, per_row(getattr(knobs, p.knob), 2), mask_id)
             for p in REGISTRY]
    policy = jnp.asarray(policy)
    if policy.ndim == 0:
        return jax.lax.switch(policy, rules, None)
    every_KxBxN = jnp.stack([rule(None) for rule in rules])
    return jnp.take_along_axis(every_KxBxN, policy[None, :, None], axis=0)[0]
