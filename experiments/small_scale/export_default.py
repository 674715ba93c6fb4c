"""Packs a trained run of the byte-level study as the embedded default model (``jaxdlm/default_model/``).

Writes a regular jaxdlm checkpoint folder (float32 params, the draft LoRA when the run has one, the
byte-level tokenizer as a ``transformers`` fast tokenizer) plus

* ``heldout_prompts.json``: ``--prompts`` ASCII code snippets of ``--prompt-bytes`` bytes, each starting at
  a line start, cut at evenly spaced offsets of the held-out split's files (modules never trained on);
* ``card.json``: provenance (run folders and their configs, data stats, command) and the recommended
  decoding settings, with the figures of ``--decode-json`` (``eval_decode.py`` output) when given.

    python experiments/small_scale/export_default.py RUN_DIR [--out jaxdlm/default_model]
      [--data experiments/small_scale/data_bytes] [--prompts 16] [--prompt-bytes 128]
      [--threshold 0.9] [--decode-json experiments/results/small_scale_bytes_decode.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import sysconfig

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def heldout_snippets(data_dir: str, count: int, nbytes: int) -> tuple[list[str], list[str]]:
    """``count`` ASCII snippets of ``nbytes`` bytes from the held-out files, each starting at a line start."""
    with open(os.path.join(data_dir, "eval_files.txt"), encoding="utf-8") as f:
        rels = [line.strip() for line in f if line.strip()]
    stdlib = sysconfig.get_paths()["stdlib"]
    cands = []
    for rel in rels:
        with open(os.path.join(stdlib, rel), "rb") as f:
            raw = f.read()
        starts = [0] + [i + 1 for i, b in enumerate(raw) if b == 0x0A]
        for s in starts[::40]:
            chunk = raw[s:s + nbytes]
            if len(chunk) == nbytes and chunk.isascii() and chunk.strip() and not chunk.startswith(b"\n"):
                cands.append((rel, chunk.decode("ascii")))
    pick = np.linspace(0, len(cands) - 1, count).astype(np.int64)
    return [cands[i][1] for i in pick], sorted({cands[i][0] for i in pick})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run")
    ap.add_argument("--out", default=os.path.join(ROOT, "jaxdlm", "default_model"))
    ap.add_argument("--data", default=os.path.join(HERE, "data_bytes"))
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt-bytes", type=int, default=128)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--decode-json", default=None)
    ap.add_argument("--config-dir", default=os.path.join(HERE, "configs_bytes"),
                    help="folder the runs' configs live in (their model.init paths are relative to it)")
    args = ap.parse_args(argv)
    import jaxdlm
    from jaxdlm.model import Model
    from jaxdlm.training.data import tokenizer_from_file
    from jaxdlm.training.run import load_trained, run_lineage

    tok = tokenizer_from_file(os.path.join(args.data, "tokenizer.json"))
    m = load_trained(args.run)
    model = Model(m.config, m.graphdef, m.params, lora=m.lora, tokenizer=tok)

    def rel(p):
        return os.path.relpath(os.path.abspath(p), ROOT)

    prompts, files = heldout_snippets(args.data, args.prompts, args.prompt_bytes)
    with open(os.path.join(args.data, "data_stats.json"), encoding="utf-8") as f:
        stats = json.load(f)
    card = {
        "name": "jaxdlm default: byte-level Python code model (AR + block diffusion + draft LoRA)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "params": m.config.num_params(), "lora_rank": None if m.lora is None else m.lora.rank,
        "dtype": "float32", "tokenizer": "byte-level (256 byte symbols + <pad> <bos> <eos> <mask>), no merges",
        "recommended": {"block_length": m.config.block_size, "threshold": args.threshold,
                        "eos_token_id": "none (the model writes code until max_new_tokens; <eos> ends a file)"},
        "data": {k: stats[k] for k in ("python", "train_files", "eval_files", "train_tokens", "eval_tokens",
                                       "eval_modules")},
        "runs": [{"run": rel(r), "train_config": tc} for r, tc in run_lineage(args.run, args.config_dir)],
        "study": "experiments/results/small_scale_bytes.md",
        "command": "python " + " ".join([rel(__file__)] + (argv if argv is not None else sys.argv[1:])),
    }
    if args.decode_json:
        with open(args.decode_json, encoding="utf-8") as f:
            dec = json.load(f)
        run_name = os.path.basename(os.path.normpath(args.run))
        card["measured"] = {"source": rel(args.decode_json), "prompts": dec["prompts"],
                            "prompt_len": dec["prompt_len"], "max_new_tokens": dec["max_new_tokens"],
                            "modes": next(r["modes"] for r in dec["results"] if r["run"] == run_name)}
    held = {"source": "held-out stdlib modules of the study (never trained on)", "files": files, "prompts": prompts}
    path = jaxdlm.save(model, args.out, overwrite=True, source=rel(args.run),
                       extra_files={"heldout_prompts.json": json.dumps(held, indent=1),
                                    "card.json": json.dumps(card, indent=1)})
    total = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    print(f"wrote {path} ({total / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
