"""The registry of decoding modes: one :class:`Mode` record per mode, read by everything that needs to know one.

``generate``, ``make_generate_fn``, :func:`jaxdlm.generation.api.auto_mode`, the command line's ``--mode`` choices
and the docs' modes table all read :data:`MODES`.  A mode is its loop body (:attr:`Mode.cycle`: ONE cycle over
every row of a :class:`~jaxdlm.generation.core.DecodeState`, finished rows masked), how its prefill counts in
``nfe``, how many cache slots its widest forward writes, what it needs of the model and of the block length, and
its extra decode state.  :func:`run` is the one program every mode runs: the causal prefill, then
``lax.while_loop(not_done, cycle)``.  A step-wise engine (serving) calls :attr:`Mode.engine_cycle` itself, one
cycle at a time: the mode's ``pass_cycle`` where it has one (diffusion: one denoise or commit pass per row, the
block in progress kept in the state), else its ``cycle``.

Adding a mode is writing its ``cycle`` and calling :func:`register_mode` (docs/code.md, "Adding a decoding
mode"); a mode registered from outside the package runs through ``generate`` and ``make_generate_fn`` alike.

Shapes: ``B`` rows, ``P`` prompt length, ``N`` block length, ``V`` vocabulary.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax

from jaxdlm.generation import core
from jaxdlm.generation.ar import ar_cycle
from jaxdlm.generation.diffusion import block_fields, diffusion_cycle, diffusion_pass, visible_prefix
from jaxdlm.generation.speculative import linear_cycle, quadratic_cycle, quadratic_fields

MAX_QUADRATIC_BLOCK = 64  # N(N+1) = 4160 tokens per forward at most


@dataclasses.dataclass(frozen=True)
class Mode:
    """One decoding mode.

    Attributes:
      name: the ``mode=`` value.
      summary: one line for help texts and the docs table.
      cycle: ``cycle(module, plan, state, lora) -> state``: one loop iteration over every row (rows with
        ``state.done`` change nothing); ``lora`` is the draft LoRA when the plan uses it, else None.
      prefill_nfe: forwards the causal prefill counts in each row's ``nfe`` (1 where it produces the first
        token's forward, 0 for diffusion's accounting; docs/decoding.md).
      widest_write: ``widest_write(N) -> int``: most tokens one forward writes after a row's cache length.
      uses_block: whether the block length plays a role (AR: no; its plan's block is 1, one program for all).
      needs_mask: whether the model needs a MASK token (``config.mask_token_id``).
      min_block, max_block: the block lengths it accepts (``max_block`` None: no upper bound).
      block_rule: why those bounds (for the error message).
      has_policy: whether a diffusion commit policy (and the fixed schedule) applies.
      init_fields: ``init_fields(module, plan, batch) -> dict`` of extra :class:`DecodeState` fields, or None.
      pass_cycle: a finer loop body for step-wise engines, or None (they run ``cycle``): the same passes, keys and
        ``nfe`` per row as ``cycle``, a part of one cycle per call (diffusion: one denoise or commit pass).
      pass_fields: ``pass_fields(module, plan, batch) -> dict``: the extra state ``pass_cycle`` runs on (used
        instead of ``init_fields`` with it; an engine resets a slot's on insert).
      visible: ``visible(state, plan) -> (out [B, W], length [B])``: with ``pass_cycle``, the output a step-wise
        engine may stream before a cycle completes (final tokens only), or None (``state.out`` up to
        ``state.length``).
    """

    name: str
    summary: str
    cycle: Callable
    prefill_nfe: int
    widest_write: Callable[[int], int]
    uses_block: bool = True
    needs_mask: bool = True
    min_block: int = 1
    max_block: int | None = None
    block_rule: str = ""
    has_policy: bool = False
    init_fields: Callable | None = None
    pass_cycle: Callable | None = None
    pass_fields: Callable | None = None
    visible: Callable | None = None

    @property
    def engine_cycle(self) -> Callable:
        """The loop body of a step-wise engine: ``pass_cycle``, else ``cycle``."""
        return self.pass_cycle or self.cycle

    @property
    def engine_fields(self) -> Callable | None:
        """The extra-state maker that goes with :attr:`engine_cycle`."""
        return self.pass_fields if self.pass_cycle else self.init_fields

    def available(self, config) -> bool:
        """Whether the model can run this mode at all."""
        return not (self.needs_mask and config.mask_token_id is None)

    def check(self, config, block: int) -> None:
        """Raises a ``ValueError`` naming what is wrong when the model or ``block`` cannot run this mode."""
        if not self.available(config):
            raise ValueError(f"mode={self.name!r} needs config.mask_token_id (this model has none); use mode='ar'")
        if self.uses_block and (block < self.min_block or (self.max_block is not None and block > self.max_block)):
            upper = f" <= {self.max_block}" if self.max_block is not None else ""
            raise ValueError(f"block_length={block} does not fit {self.name}: it needs {self.min_block} <= "
                             f"block_length{upper} ({self.block_rule})")


MODES: dict[str, Mode] = {}


def register_mode(mode: Mode, *, replace: bool = False) -> Mode:
    """Adds ``mode`` to :data:`MODES` (``replace=True`` to redefine a name); returns it."""
    if not isinstance(mode, Mode):
        raise TypeError(f"register_mode takes a Mode record, got {type(mode).__name__}")
    if mode.name == "auto" or (mode.name in MODES and not replace):
        raise ValueError(f"mode name {mode.name!r} is taken (pass replace=True to redefine a registered mode)")
    MODES[mode.name] = mode
    return mode


def unregister_mode(name: str) -> None:
    """Removes a mode registered with :func:`register_mode` (tests, experiments)."""
    MODES.pop(name, None)


def get_mode(name: str) -> Mode:
    """The mode called ``name``, else a ``ValueError`` listing the registered ones."""
    if name not in MODES:
        raise ValueError(f"mode={name!r} is not a generation mode; expected one of {mode_names() + ('auto',)}")
    return MODES[name]


def mode_names() -> tuple[str, ...]:
    """Every registered mode, in registration order (``"auto"`` is not a mode but a rule over them)."""
    return tuple(MODES)


def run(module, plan: core.Plan, params_dtype, prompts_BxP, lens_B, key, knobs, eos_E, lora=None):
    """The generation program of every mode: prefill, then the mode's cycle until every row is done.

    Returns ``(tokens int32 [B, max_new], lengths [B], nfe [B], total [])`` (:func:`core.finish`).
    """
    mode = MODES[plan.mode]
    fields = mode.init_fields(module, plan, prompts_BxP.shape[0]) if mode.init_fields else {}
    state = core.init_state(module, plan, prompts_BxP, lens_B, key, knobs, eos_E, params_dtype,
                            prefill_nfe=mode.prefill_nfe, **fields)
    lora = lora if plan.use_lora else None
    state = jax.lax.while_loop(core.not_done, lambda s: mode.cycle(module, plan, s, lora), state)
    return core.finish(state, plan)


register_mode(Mode("ar", "autoregressive: one token per forward over the KV cache", ar_cycle, prefill_nfe=1,
                   widest_write=lambda n: 1, uses_block=False, needs_mask=False))
register_mode(Mode("diffusion", "block diffusion: denoise passes commit tokens of a block by a policy, then a "
                   "causal pass writes the block", diffusion_cycle, prefill_nfe=0, widest_write=lambda n: n,
                   has_policy=True, pass_cycle=diffusion_pass, pass_fields=block_fields, visible=visible_prefix))
register_mode(Mode("linear_spec", "linear self-speculation: a diffusion draft pass, then a causal verify pass; "
                   "equals AR at T=0", linear_cycle, prefill_nfe=1, widest_write=lambda n: n, min_block=2,
                   block_rule="one seed and at least one draft token"))
register_mode(Mode("quadratic_spec", "quadratic self-speculation: one forward over N + N*N tokens verifies the "
                   "drafts and drafts the next block; equals AR at T=0", quadratic_cycle, prefill_nfe=1,
                   widest_write=lambda n: n + n * n, min_block=2, max_block=MAX_QUADRATIC_BLOCK,
                   block_rule=f"the N(N+1) layout: one seed and at least one draft, at most "
                              f"{MAX_QUADRATIC_BLOCK * (MAX_QUADRATIC_BLOCK + 1)} tokens per forward",
                   init_fields=quadratic_fields))
