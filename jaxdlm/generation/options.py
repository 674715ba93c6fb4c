"""``DecodeOptions``: every decoding setting of a call in one typed, checked object.

``generate(model, prompts, **kwargs)`` and ``make_generate_fn(model, ..., **kwargs)`` both build one
(``DecodeOptions(**kwargs)``, or ``options=`` given directly), check it once against the model and the mode,
and split it once: :meth:`DecodeOptions.static` gives the choices that shape the compiled program (greedy or
sampling, which filters exist, the fixed schedule, the spec-sampling flavour, the draft LoRA), and
:meth:`DecodeOptions.knob_values` the numbers the program only reads (traced: changing them never recompiles).
A setting therefore means the same in both entry points.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from jaxdlm.generation import policies
from jaxdlm.generation.knobs import Knobs

SPEC_SAMPLING = ("exact", "rejection")
# the traced settings, by their keyword names (make_generate_fn's function takes these at call time)
TRACED = ("temperature", "top_k", "top_p", "threshold", "policy", "margin", "entropy_bound", "max_thinking_tokens",
          "end_think_token_id", "eos_token_id")


@dataclasses.dataclass(frozen=True)
class StaticChoices:
    """The part of :class:`DecodeOptions` that shapes the compiled program (hashable).

    Attributes:
      sample: sampling (True) or greedy argmax (False).
      use_top_k, use_top_p: whether the traced top-k / top-p filters are compiled in (sampling only).
      fixed_steps: diffusion's fixed schedule, denoise steps per block (None: the policy rule).
      spec_sampling: the self-speculative modes' acceptance rule at T > 0.
      use_lora: the draft LoRA in linear-spec draft passes.
    """

    sample: bool
    use_top_k: bool
    use_top_p: bool
    fixed_steps: int | None
    spec_sampling: str
    use_lora: bool


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """The decoding settings of a ``generate`` / ``make_generate_fn`` call.

    Attributes:
      temperature: 0 = greedy; > 0 = Gumbel-max sampling at this temperature (with ``top_k`` / ``top_p``).
      top_k: keep the ``k`` most likely tokens (None: off).  top_p: nucleus mass in ``(0, 1]`` (None: off).
      seed: PRNG seed (``generate``; ``make_generate_fn`` takes a key): same seed, same output.
      threshold: the diffusion confidence threshold in ``[0, 1]`` (policies ``confidence`` and ``leftmost``);
        None = the fixed schedule of ``steps_per_block`` denoise steps per block (policy ``confidence`` only).
      steps_per_block: the fixed schedule's steps per block, in ``[1, N-1]`` (default ``N-1``: one masked token
        per step, the reference's schedule); only with ``threshold=None``.
      policy: the diffusion commit policy (:data:`jaxdlm.generation.policies.POLICIES`); diffusion only.
      margin, entropy_bound: the knobs of policies ``margin`` and ``entropy`` (None: the policy's default).
      spec_sampling: T > 0 acceptance rule of the self-speculative modes, ``"exact"`` (the reference) or
        ``"rejection"`` (speculative rejection sampling).
      use_lora: use the model's draft LoRA in linear-spec draft passes.
      max_thinking_tokens, end_think_token_id: the thinking budget (given together).
      eos_token_id: an id or ids that end a row (None: ``config.eos_token_ids``; ``()``: none).
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    threshold: float | None = 0.9
    steps_per_block: int | None = None
    policy: str = "confidence"
    margin: float | None = None
    entropy_bound: float | None = None
    spec_sampling: str = "exact"
    use_lora: bool = True
    max_thinking_tokens: int | None = None
    end_think_token_id: int | None = None
    eos_token_id: int | Sequence[int] | None = None

    @classmethod
    def build(cls, options: "DecodeOptions | None" = None, **kwargs) -> "DecodeOptions":
        """``options`` with ``kwargs`` replacing its fields (or the defaults); unknown keywords raise a
        ``TypeError`` that lists the known ones."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown decoding option(s) {unknown}; DecodeOptions has {sorted(names)}")
        return dataclasses.replace(options or cls(), **kwargs)

    # ------------------------------------------------------------------------------------------- checks

    def check(self, config) -> "DecodeOptions":
        """Checks every value against the model ``config``; returns ``self`` (``ValueError`` naming the bad value)."""
        self._check_sampling()
        self._check_policy()
        self._check_token_ids(config)
        if self.spec_sampling not in SPEC_SAMPLING:
            raise ValueError(f"spec_sampling={self.spec_sampling!r} is not known; expected one of {SPEC_SAMPLING}")
        if not isinstance(self.seed, (int, np.integer)):
            raise ValueError(f"seed={self.seed!r} must be an integer")
        return self

    def _check_sampling(self):
        t, k, p = self.temperature, self.top_k, self.top_p
        if t is None or not isinstance(t, (int, float, np.number)) or float(t) < 0:
            raise ValueError(f"temperature={t!r} must be a number >= 0 (0 = greedy)")
        if p is not None and not (0.0 < float(p) <= 1.0):
            raise ValueError(f"top_p={p!r} must lie in (0, 1]")
        if k is not None and (not isinstance(k, (int, np.integer)) or k < 1):
            raise ValueError(f"top_k={k!r} must be an integer >= 1 (or None)")

    def _check_policy(self):
        pol = policies.get(self.policy) if isinstance(self.policy, str) else None
        if pol is None:
            raise ValueError(f"policy={self.policy!r} is not a diffusion commit policy; expected one of "
                             f"{policies.POLICIES}")
        for knob in ("margin", "entropy_bound"):
            value = getattr(self, knob)
            if value is not None and pol.knob != knob:
                owner = next(p.name for p in policies.REGISTRY if p.knob == knob)
                raise ValueError(f"{knob}={value!r} is the knob of policy={owner!r}; policy={pol.name!r} has no "
                                 f"use for it (leave {knob}=None or pass policy={owner!r})")
        if self.threshold is not None:
            policies.get("confidence").check(self.threshold)
        if pol.knob != "threshold" and getattr(self, pol.knob) is not None:
            pol.check(getattr(self, pol.knob))
        if self.threshold is None and not pol.fixed_schedule:
            raise ValueError(f"threshold=None selects the fixed schedule, which ranks by confidence: only "
                             f"policy='confidence' has one (policy={pol.name!r} commits by its {pol.knob}= instead)")
        if self.steps_per_block is not None and self.threshold is not None:
            raise ValueError(f"steps_per_block={self.steps_per_block!r} sets the fixed schedule, which "
                             f"threshold=None selects; with threshold={self.threshold!r} it would be ignored")

    def _check_token_ids(self, config):
        v = config.vocab_size
        for i in self.eos_ids(config):
            if not 0 <= i < v:
                raise ValueError(f"eos_token_id {i} is outside the vocabulary [0, {v})")
        budget, end = self.max_thinking_tokens, self.end_think_token_id
        if (budget is None) != (end is None):
            raise ValueError(f"max_thinking_tokens={budget!r} and end_think_token_id={end!r} must be given together")
        if budget is not None and budget < 0:
            raise ValueError(f"max_thinking_tokens={budget!r} must be >= 0")
        if end is not None and not 0 <= end < v:
            raise ValueError(f"end_think_token_id={end!r} is outside the vocabulary [0, {v})")

    def check_mode(self, mode, block: int) -> None:
        """Checks the settings that only some modes have against ``mode`` (a
        :class:`~jaxdlm.generation.modes.Mode`) and its ``block`` length."""
        if not mode.has_policy:
            if self.policy != "confidence":
                raise ValueError(f"policy={self.policy!r} is a diffusion commit policy; mode={mode.name!r} has none "
                                 f"(use mode='diffusion', or leave policy='confidence')")
            if self.steps_per_block is not None:
                raise ValueError(f"steps_per_block={self.steps_per_block} is diffusion's fixed schedule; "
                                 f"mode={mode.name!r} has none")
        steps = self.steps_per_block
        if mode.has_policy and steps is not None and block > 1 and not 1 <= steps <= block - 1:
            raise ValueError(f"steps_per_block={steps!r} must lie in [1, block_length-1={block - 1}]")

    # ------------------------------------------------------------------------------------------- the split

    def static(self, mode, block: int) -> StaticChoices:
        """The program-shaping part for ``mode`` (a :class:`~jaxdlm.generation.modes.Mode`) and ``block``."""
        sample = float(self.temperature) > 0
        fixed = None
        if mode.has_policy and self.threshold is None:
            fixed = max(1, block - 1) if self.steps_per_block is None else int(self.steps_per_block)
        return StaticChoices(sample=sample, use_top_k=sample and self.top_k is not None,
                             use_top_p=sample and self.top_p is not None and float(self.top_p) < 1,
                             fixed_steps=fixed, spec_sampling=self.spec_sampling, use_lora=bool(self.use_lora))

    def eos_ids(self, config) -> tuple[int, ...]:
        """The EOS ids: ``config.eos_token_ids`` for None, else the id or ids given (``()`` = none)."""
        e = self.eos_token_id
        if e is None:
            return tuple(config.eos_token_ids or ())
        if isinstance(e, (int, np.integer)):
            return (int(e),)
        return tuple(int(x) for x in e)

    def knob_values(self) -> dict:
        """The traced settings by keyword (:data:`TRACED` less ``eos_token_id``), Python values."""
        return {name: getattr(self, name) for name in TRACED if name != "eos_token_id"}

    def knobs(self) -> Knobs:
        """The traced settings as :class:`Knobs` (None: off / the policy's default)."""
        return Knobs.make(**self.knob_values())
