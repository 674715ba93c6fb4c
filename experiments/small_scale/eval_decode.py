"""Decoding-mode study of the trained runs on held-out prompts (issue 6, part 3).

For each run folder, ``jaxdlm.generate`` (greedy, float32, no EOS) on the same held-out prompts in the modes
``ar``, ``diffusion`` (confidence-threshold sweep), ``linear_spec`` (with and without the draft LoRA when the
run has one) and ``quadratic_spec``, all at the study's block size. Per mode:

* ``tpf``: generated tokens / forward passes (``sum(lengths) / sum(nfe)``, nfe as in docs/decoding.md);
* ``agree_ar``: fraction of output positions equal to the same model's AR greedy output;
* ``agree_true``: fraction of output positions equal to the true continuation of the held-out text;
* ``equal_ar_rows``: rows whose whole output equals AR's (the self-speculative modes must reach all rows).

Prompts: ``--prompts`` windows of ``--prompt-len + --new`` tokens cut at evenly spaced offsets of the held-out
token stream (``data/eval.npy``), skipping windows that contain a special id (pad/bos/eos/mask), so every
prompt and its continuation lie inside one held-out file.

    python experiments/small_scale/eval_decode.py RUN_DIR [RUN_DIR ...] [--prompts 32] [--prompt-len 64]
      [--new 64] [--thresholds 0.5 0.7 0.9 0.99] [--out experiments/results/small_scale_decode.json]
      [--plot experiments/results/small_scale_threshold_sweep.png] [--replot]

``--policies`` instead sweeps every diffusion commit policy's knob (``generate(policy=...)``) on the embedded
default model (``jaxdlm.load_default()``) and its 16 package prompts (``jaxdlm.default.heldout_prompts()``;
their true continuations are read from the same stdlib files), 128 new bytes, greedy, block 32: TPF,
agreement with AR and with the truth, repeat fraction, for AR and the truth too; it writes
``small_scale_bytes_policies.{json,md}`` and one Pareto plot per policy
(``small_scale_bytes_policy_<name>.png``) to ``experiments/results/`` (``--replot``: from the JSON).

    python experiments/small_scale/eval_decode.py --policies [--replot]
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

HERE = os.path.dirname(os.path.abspath(__file__))
SPECIAL = (0, 1, 2, 3)  # <pad> <bos> <eos> <mask> (prepare_data.py)


def held_out_windows(stream: np.ndarray, count: int, prompt_len: int, new: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` prompts ``[count, prompt_len]`` and true continuations ``[count, new]`` from ``stream``."""
    win = prompt_len + new
    starts = np.linspace(0, len(stream) - win, count * 8).astype(np.int64)
    rows = []
    for s in starts:
        w = stream[s:s + win]
        if not np.isin(w, SPECIAL).any():
            rows.append(w)
    if len(rows) < count:
        raise ValueError(f"only {len(rows)} clean held-out windows of {win} tokens; ask for fewer --prompts")
    pick = np.linspace(0, len(rows) - 1, count).astype(np.int64)  # spread over the whole held-out split
    rows = np.stack([rows[i] for i in pick]).astype(np.int32)
    return rows[:, :prompt_len], rows[:, prompt_len:]


def repeat_frac(tokens: np.ndarray) -> float:
    """Fraction of positions ``1..T-1`` of ``tokens [B, T]`` that repeat the previous token: a degeneracy
    measure (runs of one token, e.g. a collapse into spaces); compare it with the true text's value.
    Negative ids mark missing positions (a true continuation cut by the end of its file): pairs with one
    are left out."""
    tokens = np.asarray(tokens)
    valid = (tokens[:, 1:] >= 0) & (tokens[:, :-1] >= 0)
    return float(np.sum((tokens[:, 1:] == tokens[:, :-1]) & valid) / np.sum(valid))


def loop_frac(tokens: np.ndarray, n: int = 8) -> float:
    """Share of the ``n``-grams of each row of ``tokens [B, T]`` that already occurred earlier in the same row: a
    longer-range degeneracy measure than :func:`repeat_frac` (loops such as ``config_config_`` or ``the state
    of the state of``).  ``n``-grams holding a negative id (a missing position) are left out."""
    seen_total = total = 0
    for row in np.asarray(tokens):
        seen = set()
        for i in range(len(row) - n + 1):
            gram = tuple(row[i:i + n].tolist())
            if min(gram) < 0:
                continue
            total += 1
            seen_total += gram in seen
            seen.add(gram)
    return seen_total / total


def _row(name, res, ar_tokens, truth, seconds):
    new = truth.shape[1]
    toks = res.tokens[:, :new]
    gen = int(res.lengths.sum())
    nfe = int(res.nfe.sum())
    row = {"mode": name, "tokens": gen, "nfe": nfe, "tpf": gen / nfe,
           "agree_true": float(np.mean((toks == truth)[truth >= 0])), "repeat_frac": repeat_frac(toks),
           "loop_frac": loop_frac(toks),
           "seconds": round(seconds, 2)}
    if ar_tokens is not None:
        row["agree_ar"] = float(np.mean(toks == ar_tokens))
        row["equal_ar_rows"] = int(np.all(toks == ar_tokens, axis=1).sum())
    return row


def evaluate(run_dir: str, prompts: np.ndarray, truth: np.ndarray, thresholds, block: int | None) -> dict:
    import jaxdlm
    from jaxdlm.training.run import load_trained

    model = load_trained(run_dir)
    n = block or model.config.block_size
    new = truth.shape[1]
    common = dict(max_new_tokens=new, block_length=n, eos_token_id=(), temperature=0.0, seed=0)

    def gen(**kw):
        t0 = time.perf_counter()
        r = jaxdlm.generate(model, prompts, **{**common, **kw})
        if not np.all(r.lengths == new):
            raise RuntimeError(f"{run_dir}: {kw} produced lengths {r.lengths} (expected {new} without EOS)")
        return r, time.perf_counter() - t0

    rows = []
    ar, dt = gen(mode="ar")
    ar_tokens = ar.tokens[:, :new]
    rows.append(_row("ar", ar, ar_tokens, truth, dt))
    for th in thresholds:
        r, dt = gen(mode="diffusion", threshold=float(th))
        rows.append({**_row("diffusion", r, ar_tokens, truth, dt), "threshold": float(th)})
    if model.lora is not None:
        r, dt = gen(mode="linear_spec", use_lora=True)
        rows.append({**_row("linear_spec", r, ar_tokens, truth, dt), "lora": True})
    r, dt = gen(mode="linear_spec", use_lora=False)
    rows.append({**_row("linear_spec", r, ar_tokens, truth, dt), "lora": False})
    r, dt = gen(mode="quadratic_spec")
    rows.append(_row("quadratic_spec", r, ar_tokens, truth, dt))
    mismatches = [f"{x['mode']}{'+lora' if x.get('lora') else ''}: {len(prompts) - x['equal_ar_rows']} rows"
                  for x in rows if x["mode"] in ("linear_spec", "quadratic_spec")
                  and x["equal_ar_rows"] != len(prompts)]
    return {"run": os.path.basename(os.path.normpath(run_dir)), "block_length": n,
            "has_lora": model.lora is not None, "spec_mismatches": mismatches, "modes": rows}


def plot(results: list[dict], path: str) -> None:
    """One panel per run: TPF vs agreement of the diffusion threshold sweep (solid: with the AR greedy
    output, dashed: with the true continuation; labels = thresholds) and the self-speculative modes as marks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(results))
    nrows = -(-len(results) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 4.2 * nrows), squeeze=False, sharey=True)
    for ax, res in zip(axes.flat, results):
        d = [m for m in res["modes"] if m["mode"] == "diffusion"]
        for key, style, color, label in (("agree_ar", "o-", "C0", "diffusion vs AR output"),
                                         ("agree_true", "o--", "C1", "diffusion vs true text")):
            ax.plot([m[key] for m in d], [m["tpf"] for m in d], style, color=color, label=label)
            for j, m in enumerate(d):
                ax.annotate(f"{m['threshold']:g}", (m[key], m["tpf"]), textcoords="offset points",
                            xytext=(5, 6 if j % 2 else -10), fontsize=7, color=color)
        for m in res["modes"]:
            if m["mode"] == "linear_spec":
                ax.plot(m["agree_ar"], m["tpf"], "D" if m.get("lora") else "s", color="C2" if m.get("lora") else "C3",
                        mfc="none", ms=8, label="linear_spec + LoRA" if m.get("lora") else "linear_spec")
            elif m["mode"] == "quadratic_spec":
                ax.plot(m["agree_ar"], m["tpf"], "^", color="C4", mfc="none", ms=8, label="quadratic_spec")
        ax.axhline(1.0, color="grey", lw=0.8, ls=":")
        ax.set_xlim(-0.02, 1.05)
        ax.set_title(res["run"], fontsize=10)
        ax.set_xlabel("agreement (fraction of positions)")
        ax.set_ylabel("tokens per forward (TPF)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper center")
    for ax in list(axes.flat)[len(results):]:
        ax.axis("off")
    fig.suptitle("Held-out decoding: diffusion threshold sweep (labels = threshold)\n"
                 "and self-speculative modes "
                 "(equal to AR, agreement 1)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(out: dict) -> str:
    """One row per run: AR, diffusion at the sweep's ends and 0.9, the self-speculative TPFs."""
    ths = out["thresholds"]
    show = sorted({ths[0], 0.5 if 0.5 in ths else ths[len(ths) // 2], 0.9 if 0.9 in ths else ths[-1], ths[-1]})
    head = ["run", "AR agree w/ truth"] + [f"diffusion t={t:g}: TPF / agree AR / agree truth" for t in show] + [
        "linear_spec TPF", "linear_spec + LoRA TPF", "quadratic_spec TPF", "spec rows = AR"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for res in out["results"]:
        by = {}
        for m in res["modes"]:
            key = (m["mode"], m.get("threshold"), m.get("lora"))
            by[key] = m
        cells = [res["run"], f"{by[('ar', None, None)]['agree_true']:.3f}"]
        for t in show:
            m = by[("diffusion", t, None)]
            cells.append(f"{m['tpf']:.2f} / {m['agree_ar']:.3f} / {m['agree_true']:.3f}")
        lin, lin_l, quad = by[("linear_spec", None, False)], by.get(("linear_spec", None, True)), by[
            ("quadratic_spec", None, None)]
        cells += [f"{lin['tpf']:.3f}", f"{lin_l['tpf']:.3f}" if lin_l else "-", f"{quad['tpf']:.3f}"]
        spec = [lin, quad] + ([lin_l] if lin_l else [])
        cells.append(f"{sum(m['equal_ar_rows'] for m in spec)}/{len(spec) * out['prompts']}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown(out: dict) -> str:
    lines = [f"{out['prompts']} held-out prompts x {out['prompt_len']} tokens, {out['max_new_tokens']} new tokens, "
             f"greedy float32, no EOS, block {out['results'][0]['block_length']}. TPF = generated tokens / "
             f"forward passes (docs/decoding.md counting).", "",
             "| run | mode | TPF | agree with AR | agree with truth | repeat frac | rows equal to AR |",
             "|---|---|---|---|---|---|---|"]
    for res in out["results"]:
        for m in res["modes"]:
            name = m["mode"]
            if name == "diffusion":
                name += f" t={m['threshold']:g}"
            if name == "linear_spec":
                name += " + LoRA" if m.get("lora") else (" (LoRA off)" if res["has_lora"] else "")
            rep = f"{m['repeat_frac']:.3f}" if "repeat_frac" in m else "-"
            lines.append(f"| {res['run']} | {name} | {m['tpf']:.3f} | {m['agree_ar']:.3f} | {m['agree_true']:.3f} "
                         f"| {rep} | {m['equal_ar_rows']}/{out['prompts']} |")
    rep_note = ""
    if "truth_repeat_frac" in out:
        rep_note = (f"\n\"repeat frac\" = fraction of output positions repeating the previous token (a degeneracy "
                    f"measure); the true continuations have {out['truth_repeat_frac']:.3f}.\n")
    return lines[0] + "\n\n" + summary(out) + "\nAll modes:\n" + rep_note + "\n" + "\n".join(lines[2:]) + "\n"


# --policies: the knob swept per policy (the knob's generate() argument and its values)
POLICY_SWEEPS = {
    "confidence": ("threshold", [0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0]),
    "margin": ("margin", [0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99]),
    "entropy": ("entropy_bound", [0.01, 0.05, 0.1, 0.2, 0.3, 0.6, 1.0, 2.0, 4.0]),
    "leftmost": ("threshold", [0.0, 0.3, 0.5, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.99, 1.0]),
}
BAR_TPF, BAR_REPEAT = 1.5, 1.5  # TPF >= 1.5 with a repeat fraction <= 1.5 x max(truth's, AR's)


def package_prompts(model, new: int) -> tuple[np.ndarray, np.ndarray]:
    """The 16 package prompts ``[16, 128]`` and their true continuations ``[16, new]`` (byte ids), each read
    after the prompt's first occurrence in the held-out stdlib file it was cut from; -1 past the file's end
    (one prompt ends 26 bytes before its file does)."""
    from jaxdlm.default import default_model_path, heldout_prompts, heldout_source

    with open(default_model_path() / "heldout_prompts.json", encoding="utf-8") as f:
        files = json.load(f)["files"]
    raws = [heldout_source(rel) for rel in files]
    prompts, truth = [], []
    for text in heldout_prompts():
        enc = text.encode("utf-8")
        hits = [r for r in raws if enc in r]
        if not hits:
            raise ValueError(f"prompt {text[:40]!r}... is not in any of {files}")
        at = hits[0].index(enc) + len(enc)
        cont = hits[0][at:at + new + 8].decode("utf-8", errors="ignore")  # + slack for a cut UTF-8 byte run
        ids = model.tokenizer(cont)["input_ids"][:new]
        prompts.append(model.tokenizer(text)["input_ids"])
        truth.append(ids + [-1] * (new - len(ids)))
    return np.asarray(prompts, np.int32), np.asarray(truth, np.int32)


def policy_sweep(new: int, block: int) -> dict:
    """Every policy's knob sweep on the default model (rows as :func:`_row`, plus ``policy`` and ``knob``)."""
    import jaxdlm

    model = jaxdlm.load_default()
    prompts, truth = package_prompts(model, new)
    return sweep_policies(model, prompts, truth, new, block)


def sweep_policies(model, prompts: np.ndarray, truth: np.ndarray, new: int, block: int, sweeps=None) -> dict:
    """Every policy's knob sweep (``sweeps``: ``{policy: (knob, values)}``, default ``POLICY_SWEEPS``) on ``model``
    and ``prompts [B, P]`` with true continuations ``truth [B, new]`` (-1 = missing): AR, every point, the truth's
    row, the bar and the best point per policy."""
    import jaxdlm

    sweeps = POLICY_SWEEPS if sweeps is None else sweeps
    common = dict(max_new_tokens=new, block_length=block, eos_token_id=(), temperature=0.0, seed=0)
    t0 = time.perf_counter()
    ar = jaxdlm.generate(model, prompts, mode="ar", **common)
    ar_tokens = ar.tokens[:, :new]
    rows = [{**_row("ar", ar, ar_tokens, truth, time.perf_counter() - t0), "policy": None}]
    for policy, (knob, values) in sweeps.items():
        for v in values:
            t0 = time.perf_counter()
            r = jaxdlm.generate(model, prompts, mode="diffusion", policy=policy, **{knob: v}, **common)
            if not np.all(r.lengths == new):
                raise RuntimeError(f"{policy} {knob}={v}: lengths {r.lengths} (expected {new} without EOS)")
            rows.append({**_row("diffusion", r, ar_tokens, truth, time.perf_counter() - t0), "policy": policy,
                         "knob": knob, "value": v})
            print(json.dumps(rows[-1]), flush=True)
    truth_row = {"mode": "truth", "agree_ar": float(np.mean((truth == ar_tokens)[truth >= 0])),
                 "repeat_frac": repeat_frac(truth), "loop_frac": loop_frac(truth), "bytes": int(np.sum(truth >= 0))}
    bar_repeat = BAR_REPEAT * max(truth_row["repeat_frac"], rows[0]["repeat_frac"])
    best = {}
    for policy in sweeps:
        pts = [m for m in rows if m["policy"] == policy]
        ok = [m for m in pts if m["repeat_frac"] <= bar_repeat]
        # best point: the fastest within the repeat bound, else the least repetitive
        pick = max(ok, key=lambda m: m["tpf"]) if ok else min(pts, key=lambda m: (m["repeat_frac"], -m["tpf"]))
        best[policy] = {**pick, "meets_bar": bool(ok) and pick["tpf"] >= BAR_TPF}
    return {"prompts": len(prompts), "prompt_len": int(prompts.shape[1]), "max_new_tokens": new,
            "block_length": block, "truth": truth_row, "bar": {"tpf": BAR_TPF, "repeat_frac": bar_repeat},
            "sweeps": {p: {"knob": k, "values": v} for p, (k, v) in sweeps.items()}, "rows": rows,
            "best": best}


def policy_markdown(out: dict) -> str:
    """The best point per policy, then every point of every sweep."""
    ar = out["rows"][0]
    bar = out["bar"]
    lines = [f"Default model (`jaxdlm.load_default()`), its {out['prompts']} package prompts x {out['prompt_len']} "
             f"bytes, {out['max_new_tokens']} new bytes, greedy float32, no EOS, block {out['block_length']}; "
             f"{out['device']}, jax {out['jax']}. TPF = bytes / forward passes (diffusion: denoise + commit "
             f"passes). \"repeat\" = share of output bytes equal to the previous byte; \"8-gram loops\" = share of "
             f"a row's 8-byte n-grams that already occurred earlier in the row (not part of the bar).", "",
             f"References: AR repeat {ar['repeat_frac']:.3f}, 8-gram loops {ar['loop_frac']:.3f}, agreement with "
             f"the truth {ar['agree_true']:.3f}; the true continuation: repeat {out['truth']['repeat_frac']:.3f}, "
             f"8-gram loops {out['truth']['loop_frac']:.3f}, agreement with AR {out['truth']['agree_ar']:.3f} "
             f"({out['truth']['bytes']} bytes: one prompt ends 26 bytes before its file). Bar: TPF >= {bar['tpf']} "
             f"with repeat <= "
             f"{BAR_REPEAT} x max(truth, AR) = {bar['repeat_frac']:.3f}.", "",
             "Best point per policy (the highest TPF within the repeat bound; where no point is within it, the "
             "least repetitive):", "",
             "| policy | knob | TPF | agree with AR | agree with truth | repeat | 8-gram loops | meets the bar |",
             "|---|---|---|---|---|---|---|---|"]
    for policy, m in out["best"].items():
        lines.append(f"| {policy} | {m['knob']}={m['value']:g} | {m['tpf']:.3f} | {m['agree_ar']:.3f} | "
                     f"{m['agree_true']:.3f} | {m['repeat_frac']:.3f} | {m['loop_frac']:.3f} | "
                     f"{'yes' if m['meets_bar'] else 'no'} |")
    t = out["truth"]
    lines += ["", "Every point:", "", "| policy | knob | TPF | agree with AR | agree with truth | repeat | 8-gram loops |",
              "|---|---|---|---|---|---|---|",
              f"| ar | - | {ar['tpf']:.3f} | 1 | {ar['agree_true']:.3f} | {ar['repeat_frac']:.3f} | {ar['loop_frac']:.3f} |",
              f"| true continuation | - | - | {t['agree_ar']:.3f} | 1 | {t['repeat_frac']:.3f} | {t['loop_frac']:.3f} |"]
    for m in out["rows"][1:]:
        lines.append(f"| {m['policy']} | {m['knob']}={m['value']:g} | {m['tpf']:.3f} | {m['agree_ar']:.3f} | "
                     f"{m['agree_true']:.3f} | {m['repeat_frac']:.3f} | {m['loop_frac']:.3f} |")
    return "\n".join(lines) + "\n"


def policy_plots(out: dict, folder: str) -> list[str]:
    """One PNG per policy: TPF (log scale) against agreement with AR, against the repeat fraction (the bar's
    region shaded) and against the 8-gram loop share; the sweep labelled with its knob values, AR and the
    true continuation as references."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    ar, truth, bar = out["rows"][0], out["truth"], out["bar"]
    paths = []
    for policy, sweep in out["sweeps"].items():
        pts = [m for m in out["rows"] if m["policy"] == policy]
        top = max(4.0, max(m["tpf"] for m in pts) * 1.3)
        fig, axes = plt.subplots(1, 3, figsize=(14, 4.3), sharey=True)
        panels = (("agree_ar", "agreement with AR output", 1.0, None),
                  ("repeat_frac", "repeat fraction (byte = previous byte)", ar["repeat_frac"], truth["repeat_frac"]),
                  ("loop_frac", "8-gram loop share (n-gram seen earlier in the row)", ar["loop_frac"], truth["loop_frac"]))
        for ax, (key, label, ar_x, truth_x) in zip(axes, panels):
            ax.plot([m[key] for m in pts], [m["tpf"] for m in pts], "o-", color="C0", label=f"diffusion, {policy}")
            for j, m in enumerate(pts):
                ax.annotate(f"{m['value']:g}", (m[key], m["tpf"]), textcoords="offset points",
                            xytext=(5, 5 if j % 2 else -9), fontsize=7, color="C0")
            ax.plot(ar_x, ar["tpf"], "s", color="C3", ms=8, label="AR")
            if truth_x is not None:
                ax.axvline(truth_x, color="C2", ls="--", lw=1, label="true continuation")
            if key == "repeat_frac":
                ax.fill_between([0, bar["repeat_frac"]], bar["tpf"], top, color="C2", alpha=0.12,
                                label=f"bar: TPF >= {bar['tpf']:g}, repeat <= {bar['repeat_frac']:.3f}")
            ax.axhline(bar["tpf"], color="C1", ls=":", lw=1)
            ax.set_yscale("log", base=2)
            ax.set_ylim(0.8, top)
            ax.set_xlim(-0.02, 1.02)
            ax.set_xlabel(label)
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7, loc="upper left")
        axes[0].set_ylabel("bytes per forward, TPF (log scale)")
        axes[0].yaxis.set_major_formatter(ScalarFormatter())
        fig.suptitle(f"Default model, {out['prompts']} package prompts, {out['max_new_tokens']} new bytes, block "
                     f"{out['block_length']}, greedy: policy={policy!r} (labels = {sweep['knob']})", fontsize=10)
        fig.tight_layout()
        path = os.path.join(folder, f"small_scale_bytes_policy_{policy}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main_policies(args, argv) -> int:
    out_json = os.path.join(HERE, "..", "results", "small_scale_bytes_policies.json")
    if args.replot:
        with open(out_json, encoding="utf-8") as f:
            out = json.load(f)
    else:
        import jax

        jax.config.update("jax_default_matmul_precision", "highest")
        t0 = time.perf_counter()
        out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "device": f"CPU, {len(os.sched_getaffinity(0))} cores" if jax.devices()[0].platform == "cpu"
               else str(jax.devices()[0]), "platform": platform.platform(),
               "jax": jax.__version__, "dtype": "float32", "matmul_precision": "highest",
               "command": "python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])),
               **policy_sweep(args.new, args.block or 32)}
        out["seconds"] = round(time.perf_counter() - t0, 1)
        tmp = out_json + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
        os.replace(tmp, out_json)
    md = policy_markdown(out)
    with open(os.path.splitext(out_json)[0] + ".md", "w", encoding="utf-8") as f:
        f.write(md)
    print(md)
    policy_plots(out, os.path.dirname(os.path.abspath(out_json)))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="*")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new", type=int, default=None, help="new tokens per prompt (default 64; --policies: 128)")
    ap.add_argument("--block", type=int, default=None, help="default: the model config's block_size")
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 0.7, 0.9, 0.99])
    ap.add_argument("--eval", default=os.path.join(HERE, "data", "eval.npy"))
    ap.add_argument("--out", default=os.path.join(HERE, "..", "results", "small_scale_decode.json"))
    ap.add_argument("--plot", default=os.path.join(HERE, "..", "results", "small_scale_threshold_sweep.png"))
    ap.add_argument("--replot", action="store_true", help="only rewrite the .md table and --plot from the existing --out JSON")
    ap.add_argument("--policies", action="store_true",
                    help="sweep the diffusion policies on the default model (--new defaults to 128 here)")
    args = ap.parse_args(argv)
    if args.policies:
        if args.runs:
            ap.error("--policies measures the embedded default model: give no RUN_DIR")
        args.new = args.new or 128
        return main_policies(args, argv)
    args.new = args.new or 64
    if args.replot:
        with open(args.out, encoding="utf-8") as f:
            out = json.load(f)
        with open(os.path.splitext(args.out)[0] + ".md", "w", encoding="utf-8") as f:
            f.write(markdown(out))
        plot(out["results"], args.plot)
        return 0
    if not args.runs:
        ap.error("give at least one RUN_DIR (or --replot)")
    for t in args.thresholds:
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"--thresholds value {t} must lie in [0, 1]")
    import flax
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    stream = np.load(args.eval).astype(np.int32)
    prompts, truth = held_out_windows(stream, args.prompts, args.prompt_len, args.new)
    from tqdm import tqdm

    results = []
    for r in tqdm(args.runs, desc="runs"):
        results.append(evaluate(r, prompts, truth, args.thresholds, args.block))
        print(json.dumps(results[-1]), flush=True)
    out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": str(jax.devices()[0]), "platform": platform.platform(), "python": platform.python_version(),
           "jax": jax.__version__, "flax": flax.__version__, "dtype": "float32", "matmul_precision": "highest",
           "command": "python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])),
           "seeds": {"generate": 0, "sampling": "greedy (temperature 0)",
                     "prompts": "deterministic: evenly spaced clean windows of data/eval.npy"},
           "prompts": args.prompts, "prompt_len": args.prompt_len, "max_new_tokens": args.new,
           "thresholds": args.thresholds, "truth_repeat_frac": repeat_frac(truth), "results": results}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)
    os.replace(tmp, args.out)
    md = os.path.splitext(args.out)[0] + ".md"
    with open(md, "w", encoding="utf-8") as f:
        f.write(markdown(out))
    print(markdown(out))
    if args.plot:
        try:
            plot(results, args.plot)
        except ImportError:
            print("matplotlib is not installed (pip install '.[experiments]'): no plot written", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
