"""The issue's bar on held-out code, for one or more models, and the row-by-row comparison of the first with the rest.

Each MODEL is ``default`` (the embedded ``jaxdlm.load_default()``), a jaxdlm checkpoint folder (``jaxdlm.json``)
or a training run folder (``model_config.json``; its tokenizer from ``--tokenizer``).  On the prompts of
``--prompts-json`` (``build_corpus.py``'s ``heldout_prompts.json``: text prompts and their true continuations
from packages no model trained on), greedy, float32, no EOS, ``--new`` tokens, block ``--block``:

* AR, then ``linear_spec`` (with the draft LoRA when the model has one): TPF and whether every row equals AR;
* every diffusion policy's knob sweep (``experiments/small_scale/eval_decode.py``'s ``sweep_policies``; ``--quick``
  uses fewer knob values): TPF, agreement, repeat fraction, the best point per policy within the repeat bound.

The bar: linear_spec TPF >= 2.0 with output equal to AR, and the best policy at diffusion TPF >= 1.5 with a repeat
fraction <= 1.5 x max(the truth's, AR's).  With two or more models, ``comparison`` lists the rows (linear_spec TPF,
rows equal to AR, each policy's best TPF within the bound, the best of them, AR agreement with the truth) and
whether the first model is at least as good as each other one on every row and meets the bar.

    python experiments/small_scale/eval_heldout.py MODEL [MODEL ...] --prompts-json DATA/heldout_prompts.json
      [--tokenizer DATA/tokenizer.json] [--new 128] [--block 32] [--quick] [--out eval.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import numpy as np

from eval_decode import POLICY_SWEEPS, _row, sweep_policies

LINEAR_SPEC_TPF = 2.0
QUICK_SWEEPS = {"confidence": ("threshold", [0.7, 0.9, 0.99]), "margin": ("margin", [0.5, 0.9]),
                "entropy": ("entropy_bound", [0.1, 0.6]), "leftmost": ("threshold", [0.5, 0.8, 0.95])}


def load_model(spec: str, tokenizer: str | None):
    """The model named by ``spec`` (``default``, a checkpoint folder or a run folder) with a tokenizer."""
    import jaxdlm

    if spec == "default":
        return jaxdlm.load_default()
    if os.path.isfile(os.path.join(spec, "jaxdlm.json")):
        return jaxdlm.load(spec, dtype="float32")
    if not os.path.isfile(os.path.join(spec, "model_config.json")):
        raise ValueError(f"MODEL {spec!r} is neither 'default', a jaxdlm checkpoint folder nor a run folder")
    if not tokenizer:
        raise ValueError(f"MODEL {spec!r} is a run folder: give --tokenizer (the data's tokenizer.json)")
    from jaxdlm.model import Model
    from jaxdlm.training.data import tokenizer_from_file
    from jaxdlm.training.run import load_trained

    m = load_trained(spec)
    return Model(m.config, m.graphdef, m.params, lora=m.lora, tokenizer=tokenizer_from_file(tokenizer))


def encode_prompts(tokenizer, held: dict, new: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompts ``[B, P]`` (each cut to the shortest prompt's length, from the left) and true continuations
    ``[B, new]`` (-1 past the stored continuation) in ``tokenizer``'s ids."""
    if len(held["prompts"]) != len(held.get("continuations", [])):
        raise ValueError("the prompts JSON needs one 'continuations' entry per prompt (build_corpus.py writes them)")
    ps = [tokenizer(p)["input_ids"] for p in held["prompts"]]
    n = min(len(p) for p in ps)
    truth = []
    for c in held["continuations"]:
        ids = tokenizer(c)["input_ids"][:new]
        truth.append(ids + [-1] * (new - len(ids)))
    return np.asarray([p[len(p) - n:] for p in ps], np.int32), np.asarray(truth, np.int32)


def evaluate(spec: str, args, held: dict) -> dict:
    """AR, linear_spec and the policy sweeps of one model, with its bar verdict."""
    import jaxdlm

    model = load_model(spec, args.tokenizer)
    prompts, truth = encode_prompts(model.tokenizer, held, args.new)
    block = args.block or model.config.block_size
    t0 = time.perf_counter()
    out = sweep_policies(model, prompts, truth, args.new, block, QUICK_SWEEPS if args.quick else POLICY_SWEEPS)
    common = dict(max_new_tokens=args.new, block_length=block, eos_token_id=(), temperature=0.0, seed=0)
    ar = jaxdlm.generate(model, prompts, mode="ar", **common)
    ar_tokens = ar.tokens[:, :args.new]
    t1 = time.perf_counter()
    lin = jaxdlm.generate(model, prompts, mode="linear_spec", use_lora=model.lora is not None, **common)
    out["linear_spec"] = {**_row("linear_spec", lin, ar_tokens, truth, time.perf_counter() - t1),
                          "lora": model.lora is not None}
    best_ok = [m for m in out["best"].values() if m["repeat_frac"] <= out["bar"]["repeat_frac"]]
    out["meets_bar"] = {
        "linear_spec": out["linear_spec"]["tpf"] >= LINEAR_SPEC_TPF and out["linear_spec"]["equal_ar_rows"] == len(prompts),
        "diffusion": any(m["meets_bar"] for m in out["best"].values())}
    out["best_diffusion_tpf"] = max((m["tpf"] for m in best_ok), default=0.0)
    out.update(model=spec, params=model.config.num_params(), has_lora=model.lora is not None,
               seconds=round(time.perf_counter() - t0, 1))
    return out


def rows_of(res: dict) -> dict:
    """The comparison rows of one model's result (higher is better on every row)."""
    bound = res["bar"]["repeat_frac"]
    rows = {"linear_spec TPF": res["linear_spec"]["tpf"],
            "linear_spec rows equal to AR": res["linear_spec"]["equal_ar_rows"]}
    for policy, m in res["best"].items():
        rows[f"diffusion {policy}: best TPF within the repeat bound"] = m["tpf"] if m["repeat_frac"] <= bound else 0.0
    rows["diffusion best TPF within the repeat bound"] = res["best_diffusion_tpf"]
    rows["AR agreement with the truth"] = res["rows"][0]["agree_true"]
    return rows


def compare(results: list[dict]) -> list[dict]:
    """The first result against each other one, row by row."""
    cand = rows_of(results[0])
    out = []
    for base in results[1:]:
        brow = rows_of(base)
        rows = [{"row": k, "candidate": cand[k], "baseline": brow[k], "at_least_as_good": cand[k] >= brow[k]}
                for k in cand]
        out.append({"candidate": results[0]["model"], "baseline": base["model"], "rows": rows,
                    "meets_bar": all(results[0]["meets_bar"].values()),
                    "beats_on_every_row": all(r["at_least_as_good"] for r in rows) and all(results[0]["meets_bar"].values())})
    return out


def markdown(out: dict) -> str:
    """The bar per model and the comparison table."""
    lines = ["| model | params | linear_spec TPF | = AR rows | best diffusion TPF (in bound) | meets bar |",
             "|---|---|---|---|---|---|"]
    for r in out["results"]:
        lines.append(f"| {r['model']} | {r['params']} | {r['linear_spec']['tpf']:.3f} | "
                     f"{r['linear_spec']['equal_ar_rows']}/{r['prompts']} | {r['best_diffusion_tpf']:.3f} | "
                     f"{r['meets_bar']} |")
    for c in out["comparison"]:
        lines += ["", f"{c['candidate']} vs {c['baseline']}: beats on every row = {c['beats_on_every_row']}", "",
                  "| row | candidate | baseline | >= |", "|---|---|---|---|"]
        lines += [f"| {r['row']} | {r['candidate']:.3f} | {r['baseline']:.3f} | {r['at_least_as_good']} |"
                  for r in c["rows"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--prompts-json", required=True)
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--block", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="fewer knob values per policy")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    with open(args.prompts_json, encoding="utf-8") as f:
        held = json.load(f)
    results = [evaluate(m, args, held) for m in args.models]
    out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": str(jax.devices()[0]), "platform": platform.platform(), "jax": jax.__version__,
           "dtype": "float32", "matmul_precision": "highest", "prompts_json": args.prompts_json,
           "files": held.get("files"), "command": "python " + " ".join(sys.argv if argv is None else [__file__] + argv),
           "results": results, "comparison": compare(results) if len(results) > 1 else []}
    md = markdown(out)
    out["markdown"] = md
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
