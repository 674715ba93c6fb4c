"""The embedded default model: a small byte-level Python-code model trained by the small-scale study.

It ships inside the package (``jaxdlm/default_model/``, a regular jaxdlm checkpoint folder stored in
float32, 13 MB, with its draft LoRA and tokenizer), so ``jaxdlm.load_default()`` and ``jaxdlm demo`` work offline
on a fresh machine.  Its provenance (training runs, token budgets, measured TPF) is in
``default_model/card.json``; the study is ``experiments/results/small_scale_bytes.md``.

    model = jaxdlm.load_default()                      # float32 compute by default
    prompts = jaxdlm.default.heldout_prompts()         # held-out stdlib code snippets (str)
    ids = model.tokenizer(prompts[0])["input_ids"]
    res = jaxdlm.generate(model, [ids], mode="linear_spec", max_new_tokens=128, eos_token_id=())
"""

from __future__ import annotations

import json
from pathlib import Path

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model"


def default_model_path() -> Path:
    """The folder of the embedded checkpoint; ``FileNotFoundError`` when the install lacks it."""
    if not (DEFAULT_MODEL_DIR / "jaxdlm.json").is_file():
        raise FileNotFoundError(
            f"the embedded default model is missing from {DEFAULT_MODEL_DIR} (expected jaxdlm.json there); "
            "reinstall jaxdlm (pip install -e .) from a complete checkout")
    return DEFAULT_MODEL_DIR


def card() -> dict:
    """Provenance and recommended decoding settings of the default model (``card.json``)."""
    with open(default_model_path() / "card.json", encoding="utf-8") as f:
        return json.load(f)


def heldout_prompts() -> list[str]:
    """Code snippets cut from the study's held-out stdlib modules (never trained on), as text."""
    with open(default_model_path() / "heldout_prompts.json", encoding="utf-8") as f:
        return list(json.load(f)["prompts"])


def heldout_source(rel: str) -> bytes:
    """The bytes of a held-out stdlib file, ``rel`` relative to this interpreter's stdlib folder (the study's data
    lists name them so); ``FileNotFoundError`` naming the path when this interpreter lacks it (the model was
    trained on CPython 3.11's stdlib)."""
    import sysconfig

    path = Path(sysconfig.get_paths()["stdlib"]) / rel
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the held-out texts are read from the CPython 3.11 stdlib")
    return path.read_bytes()


def load_default(*, dtype=None, **kwargs):
    """Loads the embedded default model.

    Args:
      dtype: dtype the float32-stored weights are cast to on restore (default float32, so
        self-speculative outputs equal AR outputs token for token at temperature 0; ``"bfloat16"`` halves
        memory; with ``quantize=`` the default is bfloat16, the compute dtype of quantized weights).
      **kwargs: passed to :func:`jaxdlm.load` (``mesh=``, ``sharding=``, ``tokenizer=``, ``quantize=``).

    Returns:
      a :class:`~jaxdlm.model.Model` with its draft LoRA and byte-level tokenizer.
    """
    from jaxdlm.checkpoint import load

    if dtype is None and kwargs.get("quantize") is None:
        dtype = "float32"
    return load(default_model_path(), dtype=dtype, **kwargs)
