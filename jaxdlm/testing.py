"""Helpers for testing code that uses jaxdlm (the project's own tests use them too).

``count_compilations()`` counts XLA compilations inside a ``with`` block (e.g. to check that changing a traced
knob does not recompile a generation program), from JAX's monitoring events.
"""

from __future__ import annotations

import contextlib

import jax

_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
_compiles = {"count": 0, "listening": False}


def _on_event(event: str, duration: float, **_) -> None:
    if event == _BACKEND_COMPILE:
        _compiles["count"] += 1


class _Count:
    value = 0


@contextlib.contextmanager
def count_compilations():
    """``with count_compilations() as n: ...`` then ``n.value`` = XLA compilations the block ran (a program
    found in the in-memory jit cache compiles nothing; one read from the persistent cache still counts)."""
    if not _compiles["listening"]:
        jax.monitoring.register_event_duration_secs_listener(_on_event)
        _compiles["listening"] = True
    counter = _Count()
    before = _compiles["count"]
    try:
        yield counter
    finally:
        counter.value = _compiles["count"] - before
