"""Serving benchmark (issue 24): the slot engine under offered load, and offline, against ``generate``.

    python experiments/bench_serve.py                      # CPU: the default model, AR, 16 slots
    python experiments/bench_serve.py --smoke              # a small, quick version of the same
    python experiments/bench_serve.py --preset gpu8b --mode linear_spec   # 8B-shaped random bf16 model
    python experiments/bench_serve.py --preset gpu8b --tiny --smoke       # the GPU code path on a tiny model

Two parts, both on one :class:`jaxdlm.serving.Engine` (``--slots`` rows) driven in process the way the server's
worker drives it (insert waiting requests into free slots, step, hand out tokens; no HTTP):

* **offered load**: ``C`` closed-loop clients (concurrency 1 / 4 / 16 / 64), each sending its next request as
  soon as the previous one finishes; more clients than slots wait in the queue.  Output tokens/s, requests/s,
  TTFT (submit to first token) and inter-token latency (a step's tokens share its wait), p50 / p99.
* **offline**: ``--offline`` prompts with mixed output lengths (``max_tokens`` drawn from ``--caps``; EOS off so
  the lengths are the caps) through ``Engine.generate_many`` (continuous batching), side by side with sequential
  ``generate`` calls (one prompt at a time) and static batching (``generate`` on batches of ``--slots`` prompts
  with ``max_new_tokens`` = the batch's largest cap: every batch waits for its longest row; only each row's own
  cap counts as output).

Every program is compiled before it is timed.  Results (device, versions, date, figures) go to
``experiments/results/bench_serve_<preset>_<backend>[_smoke].json`` and a Markdown table to stdout.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def load_model(args):
    import jax.numpy as jnp

    if args.preset == "default":
        import jaxdlm

        return jaxdlm.load_default()
    from bench_generate import init_model, model_config

    return init_model(model_config("gpu8b", args.tiny), jnp.bfloat16)


def make_prompts(model, n: int, rng) -> list[np.ndarray]:
    """``n`` prompts of mixed lengths: held-out code cut at 16..200 bytes (default model), else random ids."""
    if getattr(model, "tokenizer", None) is not None:
        from jaxdlm.default import heldout_prompts

        texts = heldout_prompts()
        return [np.asarray(model.tokenizer(texts[i % len(texts)][: int(rng.integers(16, 200))])["input_ids"],
                           np.int32) for i in range(n)]
    v = model.config.vocab_size
    return [rng.integers(4, v - 1, size=int(rng.integers(16, 200))).astype(np.int32) for _ in range(n)]


def pct(xs, q):
    return float(np.percentile(xs, q)) if len(xs) else float("nan")


def drive(engine, prompts, caps, opts, concurrency: int, cycles: int = 1) -> dict:
    """Closed-loop clients over the engine: at most ``concurrency`` requests in the system; returns the figures."""
    n = len(prompts)
    waiting, submitted, first, last, owner = [], {}, {}, {}, {}
    ttft, itl, tokens = [], [], 0
    nxt = done = 0
    t0 = time.perf_counter()
    while done < n:
        now = time.perf_counter()
        while nxt < n and len(waiting) + len(owner) < concurrency:
            waiting.append(nxt)
            submitted[nxt] = now
            nxt += 1
        if waiting and engine.free:  # the waiting requests that fit, in one batched insert (as the server)
            take, waiting = waiting[:len(engine.free)], waiting[len(engine.free):]
            for slot, i in zip(engine.insert_many([(prompts[i], opts, caps[i]) for i in take]), take):
                owner[slot] = i
        out = engine.step(cycles)
        now = time.perf_counter()
        for slot, i in list(owner.items()):
            k = int(out.counts[slot])
            if k:
                if i not in first:
                    first[i] = now
                    ttft.append(now - submitted[i])
                else:
                    itl += [(now - last[i]) / k] * k
                last[i] = now
                tokens += k
            if out.done[slot]:
                del owner[slot]
                done += 1
    wall = time.perf_counter() - t0
    return dict(concurrency=concurrency, requests=n, tokens=tokens, seconds=wall, tokens_per_s=tokens / wall,
                requests_per_s=n / wall, ttft_p50=pct(ttft, 50), ttft_p99=pct(ttft, 99), itl_p50=pct(itl, 50),
                itl_p99=pct(itl, 99))


def offline(model, engine, prompts, caps, opts, args) -> dict:
    import jaxdlm

    from jaxdlm.generation import bucket_length

    gen = dict(mode=args.mode, block_length=args.block_length, options=opts)
    batches = [list(range(i, min(i + args.slots, len(prompts)))) for i in range(0, len(prompts), args.slots)]
    # compile everything first: one generate call per distinct program (rows, prompt bucket, max_new_tokens)
    seen = set()
    calls = [[i] for i in range(len(prompts))] + batches
    for b in calls:
        key = (len(b), bucket_length(max(len(prompts[i]) for i in b)), max(caps[i] for i in b))
        if key not in seen:
            seen.add(key)
            jaxdlm.generate(model, [prompts[i] for i in b], max_new_tokens=key[2], **gen)
    useful = int(sum(caps))

    t = time.perf_counter()
    for p, cap in zip(prompts, caps):
        jaxdlm.generate(model, [p], max_new_tokens=cap, **gen)
    seq = time.perf_counter() - t

    t = time.perf_counter()
    for b in batches:
        jaxdlm.generate(model, [prompts[i] for i in b], max_new_tokens=max(caps[i] for i in b), **gen)
    static = time.perf_counter() - t

    engine.generate_many(prompts[:2], opts, caps[:2], cycles=args.offline_cycles)
    t = time.perf_counter()
    res = engine.generate_many(prompts, opts, caps, cycles=args.offline_cycles)
    cont = time.perf_counter() - t
    assert sum(len(r.tokens) for r in res) == useful
    rows = {}
    for name, s in (("sequential generate", seq), ("static batches", static), ("continuous (engine)", cont)):
        rows[name] = dict(seconds=s, tokens_per_s=useful / s, requests_per_s=len(prompts) / s)
    return dict(prompts=len(prompts), output_tokens=useful, caps=sorted(set(caps)), runs=rows,
                continuous_over_static=static / cont, continuous_over_sequential=seq / cont)


def table(result) -> str:
    lines = [f"bench_serve: {result['preset']} {result['mode']}, {result['slots']} slots, {result['cycles']} / "
             f"{result['offline_cycles']} cycles per dispatch (load / offline), "
             f"{result['versions']['devices'][0]}, jax {result['versions']['jax']}, {result['date']}", "",
             "| concurrency | requests | tokens/s | requests/s | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in result["load"]:
        lines.append(f"| {r['concurrency']} | {r['requests']} | {r['tokens_per_s']:.1f} | {r['requests_per_s']:.2f} | "
                     f"{r['ttft_p50'] * 1e3:.0f} / {r['ttft_p99'] * 1e3:.0f} | "
                     f"{r['itl_p50'] * 1e3:.1f} / {r['itl_p99'] * 1e3:.1f} |")
    off = result["offline"]
    lines += ["", f"offline: {off['prompts']} prompts, {off['output_tokens']} output tokens, caps {off['caps']}", "",
              "| run | seconds | tokens/s | requests/s |", "|---|---:|---:|---:|"]
    for name, r in off["runs"].items():
        lines.append(f"| {name} | {r['seconds']:.1f} | {r['tokens_per_s']:.1f} | {r['requests_per_s']:.2f} |")
    lines += ["", f"continuous / static: {off['continuous_over_static']:.2f}x; continuous / sequential: "
                  f"{off['continuous_over_sequential']:.2f}x"]
    c = {r["concurrency"]: r["tokens_per_s"] for r in result["load"]}
    if 1 in c and 16 in c:
        lines.append(f"concurrency 16 / concurrency 1 tokens/s: {c[16] / c[1]:.2f}x")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=("default", "gpu8b"), default="default")
    p.add_argument("--tiny", action="store_true", help="gpu8b: the code path on a tiny model")
    p.add_argument("--mode", default="ar")
    p.add_argument("--block-length", type=int, default=None)
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--requests-per-client", type=int, default=4, help="requests per closed-loop client (>= 8 total)")
    p.add_argument("--offline", type=int, default=512, help="prompts of the offline run")
    p.add_argument("--caps", type=int, nargs="+", default=[16, 32, 64, 128], help="max_tokens choices")
    p.add_argument("--smoke", action="store_true", help="concurrency 1 / 4, 2 requests per client, 16 offline "
                                                         "prompts, caps 8 / 16 / 32")
    p.add_argument("--cycles", type=int, default=1, help="cycles per engine dispatch under load (the server's "
                                                          "--cycles-per-step)")
    p.add_argument("--offline-cycles", type=int, default=8, help="cycles per dispatch of the offline run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.smoke:
        args.concurrency, args.requests_per_client, args.offline = [1, 4], 2, 16
        args.caps, args.slots = [8, 16, 32], min(args.slots, 4)

    import jax

    from bench_generate import versions
    from jaxdlm.generation.options import DecodeOptions
    from jaxdlm.serving import Engine

    rng = np.random.default_rng(args.seed)
    model = load_model(args)
    opts = DecodeOptions(eos_token_id=())  # lengths = caps
    engine = Engine(model, mode=args.mode, slots=args.slots, max_len=256 + max(args.caps) + 64,
                    max_new=max(args.caps), block_length=args.block_length)
    from jaxdlm.testing import count_compilations

    ks = [1 << j for j in range(args.slots.bit_length()) if 1 << j < args.slots] + [args.slots]
    for n in (64, 128, 200) * 2:  # compile the batched insert of every prompt bucket (64, 128, 256) and row count,
        # and the steps (twice: an insert after a step's state may compile once more; `compiles` counts any left)
        for k in ks:
            engine.generate_many([np.full(n, 5, np.int32)] * k, opts, 2, cycles=args.cycles)
            engine.generate_many([np.full(n, 5, np.int32)] * k, opts, 2, cycles=args.offline_cycles)
    load = []
    for c in args.concurrency:
        n = max(8, c * args.requests_per_client)
        prompts = make_prompts(model, n, rng)
        caps = [int(x) for x in rng.choice(args.caps, size=n)]
        with count_compilations() as compiles:
            load.append(drive(engine, prompts, caps, opts, c, args.cycles))
        load[-1]["compiles"] = compiles.value
        print(json.dumps(load[-1]), flush=True)
    prompts = make_prompts(model, args.offline, rng)
    caps = [int(x) for x in rng.choice(args.caps, size=args.offline)]
    off = offline(model, engine, prompts, caps, opts, args)
    result = dict(benchmark="bench_serve", preset=args.preset, tiny=args.tiny, smoke=args.smoke, mode=args.mode,
                  slots=args.slots, cycles=args.cycles, offline_cycles=args.offline_cycles,
                  block_length=args.block_length or model.config.block_size,
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  versions=versions(), load=load, offline=off,
                  note="engine driven in process (no HTTP); EOS off so output lengths equal the caps")
    suffix = "_smoke" if args.smoke else ""
    out = args.out or os.path.join(HERE, "results", f"bench_serve_{args.preset}{'_tiny' if args.tiny else ''}_"
                                                    f"{jax.default_backend()}{suffix}.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(table(result))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
