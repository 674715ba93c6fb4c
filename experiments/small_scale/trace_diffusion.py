"""Why block diffusion collapses on a weak model: a step-by-step trace of threshold decoding (issue 6 study).

Decodes with the deliberately plain reference decoder of the tests (``jaxdlm.testing``: one full uncached
forward per step, masks written from the rules of docs/attention.md), so every denoise pass can be printed:
which masked positions it commits, their bytes and confidences, and the confidence at the leftmost masked
position (what an AR model would have to predict next).

``--policy`` is one of ``jaxdlm.generate``'s diffusion commit policies (``confidence``, the default: the most
confident masked position and every one at or above ``--threshold``; ``margin`` with ``--margin``,
``entropy`` with ``--entropy-bound``, ``leftmost``: the leftmost masked position and the confident run after
it), decoded by the reference's plain rule (``jaxdlm.testing.commit_rule``).

    python experiments/small_scale/trace_diffusion.py [--run RUN_DIR] [--prompt-index 6] [--blocks 2]
        [--threshold 0.9] [--policy confidence|margin|entropy|leftmost] [--margin M] [--entropy-bound E]
                                                                  # trace one prompt
    python experiments/small_scale/trace_diffusion.py --measure [--policy ...] [--threshold ...]
                                                                  # TPF / agreement over the 16 package prompts,
                                                                  # plus linear-spec TPF

Without ``--run`` the embedded default model (``jaxdlm.load_default()``) is used; prompts are the package's
held-out snippets (``jaxdlm.default.heldout_prompts()``), byte-tokenized.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np



def decode_block(R, ctx, seed, block, threshold, policy, log=None, tok=None):
    """One block from ``[seed, MASK * (block - 1)]``: returns ``(block tokens, denoise passes)``."""
    from jaxdlm.testing import diffusion_block

    passes = [0]

    def show(blk, masked, x0, conf, commit, gap):
        passes[0] += 1
        left = min(commit + [i for i in range(block) if masked[i]])  # the leftmost position masked before
        text = "".join("·" if mk else tok.decode([t]) for t, mk in zip(blk, masked)).replace("\n", "⏎")
        picks = ", ".join(f"{i}:{tok.decode([int(x0[i])])!r}@{conf[i]:.2f}" for i in commit)
        log(f"  pass {passes[0]:2d} commit [{picks}]  leftmost masked {left}:{tok.decode([int(x0[left])])!r}@{conf[left]:.2f}  | {text}")

    return diffusion_block(R, ctx, seed, block, threshold, on_pass=show if log is not None else None, **policy)


def decode(R, prompt, new, block, threshold, policy, log=None, tok=None, blocks=None):
    """Whole continuation (no EOS): returns ``(tokens [new], nfe)`` counted as in docs/decoding.md."""
    ctx, nfe = list(prompt), 0
    seed = int(R.pick(R.causal(ctx)[-1])[0])
    out, b = [seed], 0
    while len(out) < new and (blocks is None or b < blocks):
        if log is not None:
            log(f"block {b} (seed {tok.decode([seed])!r})")
        blk, passes = decode_block(R, ctx, seed, block, threshold, policy, log, tok)
        seed = int(R.pick(R.causal(ctx + blk)[-1])[0])  # commit pass
        nfe += passes + 1
        ctx += blk
        out += blk[1:] + [seed]
        b += 1
    return out[:new], nfe


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default=None, help="a training run folder (default: the embedded default model)")
    ap.add_argument("--prompt-index", type=int, default=6)
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--policy", default="confidence", help="confidence, margin, entropy or leftmost")
    ap.add_argument("--margin", type=float, default=None, help="--policy margin's cut (default: generate()'s)")
    ap.add_argument("--entropy-bound", type=float, default=None, help="--policy entropy's bound in nats")
    ap.add_argument("--measure", action="store_true", help="TPF / agreement with AR over all 16 prompts")
    ap.add_argument("--new", type=int, default=128)
    args = ap.parse_args(argv)
    from jaxdlm.generation.options import DecodeOptions
    from jaxdlm.generation.policies import KNOB_DEFAULTS

    opts = DecodeOptions(threshold=args.threshold, policy=args.policy, margin=args.margin,
                         entropy_bound=args.entropy_bound)
    policy = dict(policy=args.policy, margin=KNOB_DEFAULTS["margin"] if args.margin is None else args.margin,
                  entropy_bound=KNOB_DEFAULTS["entropy_bound"] if args.entropy_bound is None else args.entropy_bound)
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    import jaxdlm
    from jaxdlm.testing import Reference
    from jaxdlm.default import heldout_prompts, load_default

    from eval_decode import repeat_frac

    if args.run:
        from jaxdlm.training.run import load_trained

        model = load_trained(args.run)
    else:
        model = load_default()
    opts.check(model.config)  # the policy and its knobs, as generate() checks them
    tok = load_default().tokenizer
    prompts = [tok(t)["input_ids"] for t in heldout_prompts()]
    if not 0 <= args.prompt_index < len(prompts):
        raise ValueError(f"--prompt-index={args.prompt_index} must lie in [0, {len(prompts) - 1}]")
    R = Reference(model)
    if not args.measure:
        p = prompts[args.prompt_index]
        print(f"prompt {args.prompt_index}: ...{tok.decode(p[-60:])!r}")
        out, nfe = decode(R, p, args.new, args.block, args.threshold, policy, print, tok, args.blocks)
        print(f"output {tok.decode(out)!r}  ({len(out)} bytes, nfe {nfe})")
        return 0
    ar = np.asarray(jaxdlm.generate(model, prompts, mode="ar", max_new_tokens=args.new, eos_token_id=(),
                                    temperature=0.0).tokens)
    outs, nfe = [], 0
    for p in prompts:
        o, n = decode(R, p, args.new, args.block, args.threshold, policy)
        outs.append(o)
        nfe += n
    outs = np.asarray(outs)
    spec = {}  # linear self-speculation on the same prompts (jaxdlm.generate), for comparison
    for lora in ((True, False) if model.lora is not None else (False,)):
        r = jaxdlm.generate(model, prompts, mode="linear_spec", use_lora=lora, max_new_tokens=args.new,
                            eos_token_id=(), temperature=0.0)
        spec["linear_spec_tpf" + ("_lora" if lora else "")] = round(float(r.lengths.sum() / r.nfe.sum()), 3)
    print(json.dumps({"run": args.run or "default", "threshold": args.threshold, **policy,
                      "tpf": round(outs.size / nfe, 3), "agree_ar": round(float(np.mean(outs == ar)), 3),
                      "rows_equal_ar": int(np.all(outs == ar, axis=1).sum()),
                      "repeat_frac": round(repeat_frac(outs), 3), "ar_repeat_frac": round(repeat_frac(ar), 3), **spec}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
