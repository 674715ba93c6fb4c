"""Serving: the slot engine (continuous batching, :class:`Engine`) and the OpenAI-compatible HTTP server
(:mod:`jaxdlm.serving.server`, ``jaxdlm serve``; docs/serving.md)."""

from jaxdlm.serving.engine import Completion, Engine, StepOutput

__all__ = ["Completion", "Engine", "StepOutput"]
