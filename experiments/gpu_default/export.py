"""Packs the unpacked GPU checkpoint as the embedded default model folder (bf16, with ``card.json``), on the CPU.

Reads the jaxdlm checkpoint that ``pack.py checkpoint`` wrote on the GPU (params + draft LoRA + tokenizer, with
``heldout_prompts.json``, ``data_stats.json`` and ``runs.json``), and ``--eval-json`` (``eval_heldout.py``'s
output, candidate first); refuses unless the candidate beats the baseline on every row (``--force`` skips
that check); writes ``--out`` (bfloat16; refuses above ``--max-mb``).  Run it with ``--out`` in a scratch
folder first, then with ``--out jaxdlm/default_model`` (see experiments/gpu_default/README.md).

    python experiments/gpu_default/export.py CKPT_DIR --eval-json eval.json --out DIR [--threshold 0.9]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys


def card(ckpt: str, model, ev: dict, threshold: float) -> dict:
    """The model card: provenance, data, the measured bar and comparison, recommended settings."""
    def read(name):
        with open(os.path.join(ckpt, name), encoding="utf-8") as f:
            return json.load(f)

    stats = read("data_stats.json")
    return {"name": "jaxdlm default: Python code model trained on a GPU (AR + block diffusion + draft LoRA)",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "params": model.config.num_params(), "lora_rank": None if model.lora is None else model.lora.rank,
            "dtype": "bfloat16", "tokenizer": stats["tokenizer"],
            "recommended": {"block_length": model.config.block_size, "threshold": threshold,
                            "eos_token_id": "none (the model writes code until max_new_tokens; <eos> ends a file)"},
            "data": stats, "runs": read("runs.json"), "study": "experiments/gpu_default/README.md",
            "measured": {k: ev[k] for k in ("date", "device", "jax", "files", "comparison", "markdown")},
            "command": "python " + " ".join(sys.argv)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("ckpt")
    ap.add_argument("--eval-json", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--max-mb", type=float, default=40.0)
    ap.add_argument("--force", action="store_true", help="export even when the candidate does not beat the baseline")
    args = ap.parse_args(argv)
    import jaxdlm

    with open(args.eval_json, encoding="utf-8") as f:
        ev = json.load(f)
    comp = ev.get("comparison") or []
    if not args.force and not (comp and all(c["beats_on_every_row"] for c in comp)):
        raise SystemExit(f"{args.eval_json}: the candidate does not beat the baseline on every row (or there is no "
                         f"comparison); not exporting\n{ev.get('markdown', '')}")
    model = jaxdlm.load(args.ckpt, dtype="bfloat16")
    with open(os.path.join(args.ckpt, "heldout_prompts.json"), encoding="utf-8") as f:
        held = f.read()
    path = jaxdlm.save(model, args.out, overwrite=True, source="experiments/gpu_default",
                       extra_files={"heldout_prompts.json": held,
                                    "card.json": json.dumps(card(args.ckpt, model, ev, args.threshold), indent=1)})
    total = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6
    if total > args.max_mb:
        raise SystemExit(f"{path} is {total:.1f} MB, above --max-mb={args.max_mb}")
    print(f"wrote {path} ({total:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
