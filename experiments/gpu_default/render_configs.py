"""Renders the GPU default model's training configs for one work folder, with optional size overrides.

Reads ``experiments/gpu_default/configs/{ar_pretrain,convert,distill,lora_draft}.toml``, replaces ``{work}`` in
every string by ``--work``, applies ``--tiny`` (the CPU dry-run sizes, ``TINY``) and then every
``--set NAME:section.key=VALUE`` (``VALUE`` a TOML value: ``1500``, ``3e-4``, ``"bfloat16"``), and writes
``OUT_DIR/NAME.toml``, each ready for ``python -m jaxdlm.training.run``.

    python experiments/gpu_default/render_configs.py --work DIR --out-dir DIR/cfg [--tiny]
      [--set ar_pretrain:optim.total_steps=1500 --set convert:optim.batch_size=32 ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import tomllib

HERE = os.path.dirname(os.path.abspath(__file__))
NAMES = ("ar_pretrain", "convert", "distill", "lora_draft")
# the CPU dry-run: a few steps of small batches, short sequences (the greedy rows of gen_greedy are 64 + 64)
TINY = {
    "ar_pretrain": {"optim.total_steps": 12, "optim.batch_size": 4, "optim.warmup_steps": 2,
                    "optim.decay_steps": 4, "data.seq_len": 128, "optim.compute_dtype": "float32",
                    "run.eval_every": 0, "run.checkpoint_every": 0, "run.eval_batches": 2, "run.log_every": 4},
    "convert": {"optim.total_steps": 6, "optim.batch_size": 4, "optim.warmup_steps": 1, "optim.decay_steps": 2,
                "data.seq_len": 128, "optim.compute_dtype": "float32", "run.eval_every": 0,
                "run.checkpoint_every": 0, "run.eval_batches": 2, "run.log_every": 2},
    "distill": {"optim.total_steps": 4, "optim.batch_size": 4, "optim.warmup_steps": 1, "optim.decay_steps": 2,
                "data.seq_len": 128, "optim.compute_dtype": "float32", "run.eval_every": 0,
                "run.checkpoint_every": 0, "run.eval_batches": 2, "run.log_every": 2},
    "lora_draft": {"optim.total_steps": 4, "optim.batch_size": 4, "optim.warmup_steps": 1, "optim.decay_steps": 2,
                   "data.seq_len": 128, "optim.compute_dtype": "float32", "run.eval_every": 0,
                   "run.checkpoint_every": 0, "run.eval_batches": 2, "run.log_every": 2},
}


def parse_set(item: str) -> tuple[str, str, str, object]:
    """``NAME:section.key=VALUE`` -> ``(name, section, key, value)``; ``ValueError`` naming a bad item."""
    try:
        target, raw = item.split("=", 1)
        name, dotted = target.split(":", 1)
        section, key = dotted.split(".", 1)
    except ValueError:
        raise ValueError(f"--set {item!r} must look like NAME:section.key=VALUE") from None
    if name not in NAMES:
        raise ValueError(f"--set {item!r}: config {name!r} is not one of {list(NAMES)}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        raise ValueError(f"--set {item!r}: {raw!r} is not a TOML value (quote strings: \"bfloat16\")") from None
    return name, section, key, value


def substitute(obj, work: str):
    """``obj`` with ``{work}`` replaced in every string."""
    if isinstance(obj, dict):
        return {k: substitute(v, work) for k, v in obj.items()}
    if isinstance(obj, str):
        return obj.replace("{work}", work)
    return obj


def toml_value(v) -> str:
    """One TOML value (strings, numbers, booleans, flat inline tables)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise ValueError(f"cannot write {v!r} ({type(v).__name__}) as a TOML value")


def dumps(cfg: dict) -> str:
    """A config of ``[section]`` tables as TOML text."""
    out = []
    for section, table in cfg.items():
        out.append(f"[{section}]")
        out += [f"{k} = {toml_value(v)}" for k, v in table.items()]
        out.append("")
    return "\n".join(out)


def render(work: str, tiny: bool, sets: list[str], config_dir: str = os.path.join(HERE, "configs")) -> dict[str, str]:
    """``{name: TOML text}`` of the four configs for ``work``."""
    work = os.path.abspath(work)
    parsed = [parse_set(s) for s in sets]
    out = {}
    for name in NAMES:
        with open(os.path.join(config_dir, f"{name}.toml"), "rb") as f:
            cfg = substitute(tomllib.load(f), work)
        changes = [(*k.split(".", 1), v) for k, v in (TINY[name].items() if tiny else ())]
        changes += [(sec, key, v) for n, sec, key, v in parsed if n == name]
        for sec, key, v in changes:
            cfg.setdefault(sec, {})[key] = v
        out[name] = dumps(cfg)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", required=True)
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--set", action="append", default=[], dest="sets", metavar="NAME:section.key=VALUE")
    args = ap.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    for name, text in render(args.work, args.tiny, args.sets).items():
        with open(os.path.join(args.out_dir, f"{name}.toml"), "w", encoding="utf-8") as f:
            f.write(text)
        print(f"wrote {os.path.join(args.out_dir, name + '.toml')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
