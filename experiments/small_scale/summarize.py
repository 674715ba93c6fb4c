"""Collects the eval records of the small-scale runs into results JSON + a markdown table.

For every run folder under ``runs/`` with a ``log.jsonl``: the held-out eval at the first logged step
(for a conversion run: the AR model BEFORE conversion) and at the last step, the number of steps and
tokens, and the wall time between the first and last record.

    python experiments/small_scale/summarize.py [--runs DIR] [--out experiments/results/small_scale_losses]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
KEYS = ("ar_loss", "diff_loss", "loss", "match", "accept")


def summarize_run(path: str) -> dict | None:
    log = os.path.join(path, "log.jsonl")
    if not os.path.exists(log):
        return None
    recs = [json.loads(line) for line in open(log, encoding="utf-8") if line.strip()]
    evals = [r for r in recs if r["kind"] == "eval"]
    trains = [r for r in recs if r["kind"] == "train"]
    if not evals:
        return None
    with open(os.path.join(path, "train_config.json"), encoding="utf-8") as f:
        tc = json.load(f)
    o = tc["optim"]
    first, last = evals[0], evals[-1]
    step = last["step"]
    return {
        "run": os.path.basename(path),
        "objective": tc["objective"]["objective"] if not tc["lora"]["enabled"] else "draft_lora",
        "schedule": tc["objective"]["schedule"], "bidirectional": tc["objective"]["bidirectional"],
        "init": tc["model"]["init"], "steps": step, "total_steps": o["total_steps"],
        "tokens": step * o["batch_size"] * o["accum"] * tc["data"]["seq_len"],
        "wall_s": round(recs[-1]["time"] - recs[0]["time"], 1),
        "eval_first": {"step": first["step"], **{k: first[k] for k in KEYS if k in first}},
        "eval_last": {"step": step, **{k: last[k] for k in KEYS if k in last}},
        "train_last": {k: trains[-1][k] for k in KEYS if trains and k in trains[-1]},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", default=os.path.join(HERE, "runs"))
    ap.add_argument("--out", default=os.path.join(HERE, "..", "results", "small_scale_losses"))
    args = ap.parse_args(argv)
    import jax

    runs = [r for r in (summarize_run(os.path.join(args.runs, d)) for d in sorted(os.listdir(args.runs))
                        if os.path.isdir(os.path.join(args.runs, d))) if r]
    stats_path = os.path.join(HERE, "data", "data_stats.json")
    stats = json.load(open(stats_path)) if os.path.exists(stats_path) else {}
    out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": str(jax.devices()[0]), "cpu_count": os.cpu_count(), "platform": platform.platform(),
           "python": sys.version.split()[0], "jax": jax.__version__,
           "data": {k: v for k, v in stats.items() if k != "eval_modules"},
           "eval_modules": stats.get("eval_modules"), "runs": runs}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)
    lines = ["| run | objective | masking | attention | steps | tokens | eval AR loss (first -> last) | "
             "eval diff loss (first -> last) | draft match / accept | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def fmt(d, k):
        return f"{d[k]:.3f}" if k in d else "-"

    for r in runs:
        a, b = r["eval_first"], r["eval_last"]
        lines.append(
            f"| {r['run']} | {r['objective']} | {r['schedule'] if r['objective'] == 'joint' else '-'} | "
            f"{('bidirectional' if r['bidirectional'] else 'block-causal') if r['objective'] == 'joint' else '-'} | "
            f"{r['steps']} | {r['tokens']} | {fmt(a, 'ar_loss')} -> {fmt(b, 'ar_loss')} | "
            f"{fmt(a, 'diff_loss')} -> {fmt(b, 'diff_loss')} | {fmt(b, 'match')} / {fmt(b, 'accept')} | {r['wall_s']} |")
    with open(args.out + ".md", "w", encoding="utf-8") as f:
        f.write(f"Held-out eval losses (nats/token), {out['date']}, {out['device']}, jax {out['jax']}\n\n")
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
