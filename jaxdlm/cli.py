"""The ``jaxdlm`` command line.

``jaxdlm demo``       runs every decoding mode of the embedded default model (``jaxdlm.load_default()``).
``jaxdlm info``       prints the devices, versions and, with ``--config``, a parsed model config.
``jaxdlm generate``   generates text from a checkpoint (its tokenizer and chat template) in any mode.
``jaxdlm train``      trains / fine-tunes from a TOML or JSON experiment config (``jaxdlm.training``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def _versions() -> dict:
    import flax
    import jax

    return {"jax": jax.__version__, "flax": flax.__version__, "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()]}


def cmd_demo(args) -> int:
    """Every decoding mode on the embedded default model (held-out prompts), with nfe / TPF / agreement."""
    import numpy as np

    from jaxdlm.default import card, heldout_prompts, load_default
    from jaxdlm.generation import generate

    t0 = time.perf_counter()
    model = load_default()
    info = card()
    rec = info["recommended"]
    print(f"jaxdlm demo: the embedded default model ({info['name']}; {model.config.num_params() / 1e6:.1f}M params, "
          f"loaded in {time.perf_counter() - t0:.1f}s)")
    every = heldout_prompts()
    if not 0 <= args.prompt_index < len(every) or args.num_prompts < 1:
        raise ValueError(f"--prompt-index={args.prompt_index} / --num-prompts={args.num_prompts}: the index must "
                         f"lie in [0, {len(every) - 1}] and the count be at least 1")
    texts = every[args.prompt_index:args.prompt_index + args.num_prompts]
    tok = model.tokenizer
    prompts = [tok(t)["input_ids"] for t in texts]
    common = dict(max_new_tokens=args.max_new_tokens, block_length=rec["block_length"], eos_token_id=(),
                  temperature=0.0, seed=args.seed)
    print(f"prompt (held-out stdlib code, {len(prompts[0])} bytes):\n{texts[0]}\n" + "-" * 72)
    ar_tokens = None
    for mode, kw in (("ar", {}), ("diffusion", {"threshold": rec["threshold"]}), ("linear_spec", {}),
                     ("quadratic_spec", {})):
        t0 = time.perf_counter()
        res = generate(model, prompts, mode=mode, **common, **kw)
        dt = time.perf_counter() - t0
        toks = np.asarray(res.tokens)
        n, nfe = int(res.lengths.sum()), int(res.nfe.sum())
        if ar_tokens is None:
            ar_tokens = toks
        same = "identical to AR" if np.array_equal(toks, ar_tokens) else \
            f"{np.mean(toks == ar_tokens):.0%} of positions equal to AR"
        label = mode + (f" (threshold {kw['threshold']})" if "threshold" in kw else "")
        print(f"[{label}] {n} tokens, nfe {nfe}, TPF {n / max(nfe, 1):.2f}, {dt:.1f}s incl. compile, {same}")
        print(texts[0] + "\u2502" + tok.decode(toks[0].tolist()))
        print("-" * 72)
    print(f"  {_versions()}")
    return 0


GEN_MODES = ("ar", "diffusion", "linear_spec", "quadratic_spec")


def _encode_prompt(tokenizer, text: str, chat: bool) -> list:
    if chat:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                 tokenize=False)
        return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    return list(tokenizer(text)["input_ids"])


def run_generate(model, tokenizer, args, out=None) -> dict:
    """Encodes ``args.prompt`` (list of texts), generates, prints text and nfe / TPF / tokens per second.

    Separate from :func:`cmd_generate` so that it runs on any model + tokenizer (tests build both).
    Returns the figures printed (per row text, tokens, nfe, TPF, tokens/s).
    """
    from jaxdlm.generation import generate

    out = out or sys.stdout
    if tokenizer is None:
        raise ValueError("the checkpoint has no tokenizer (tokenizer.json / tokenizer_config.json): "
                         "jaxdlm generate needs one to encode --prompt")
    prompts = [_encode_prompt(tokenizer, p, args.chat) for p in args.prompt]
    eos = args.eos_token_id if args.eos_token_id else None
    kw = dict(mode=args.mode, max_new_tokens=args.max_new_tokens, block_length=args.block_length,
              threshold=None if args.threshold is not None and args.threshold < 0 else args.threshold,
              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
              spec_sampling=args.spec_sampling, eos_token_id=eos, max_thinking_tokens=args.max_thinking_tokens,
              end_think_token_id=args.end_think_token_id, policy=args.policy, margin=args.margin,
              entropy_bound=args.entropy_bound)
    if args.warmup:
        generate(model, prompts, **kw)
    t0 = time.perf_counter()
    res = generate(model, prompts, **kw)
    seconds = time.perf_counter() - t0
    rows = []
    for i, seq in enumerate(res.sequences()):
        text = tokenizer.decode(seq.tolist(), skip_special_tokens=False)
        rows.append(dict(text=text, tokens=int(res.lengths[i]), nfe=int(res.nfe[i]),
                         tpf=float(res.lengths[i] / max(int(res.nfe[i]), 1))))
        if len(prompts) > 1:
            print(f"--- [{i}]", file=out)
        print(text, file=out)
    total = int(res.lengths.sum())
    tps = total / seconds
    print(f"[mode={res.mode} tokens={total} nfe={int(res.nfe.sum())} "
          f"TPF={total / max(int(res.nfe.sum()), 1):.2f} tokens/s={tps:.1f} "
          f"({seconds:.2f}s{'' if args.warmup else ', incl. compile: pass --warmup to exclude it'})]", file=out)
    return dict(rows=rows, mode=res.mode, seconds=seconds, tokens_per_second=tps)


def cmd_generate(args) -> int:
    try:
        from jaxdlm.checkpoint import load
    except ImportError as e:  # the checkpoint module ships separately
        raise ValueError(f"loading checkpoints needs jaxdlm.checkpoint, which is not available here ({e})") from e
    if args.checkpoint is None:
        from jaxdlm.default import default_model_path

        args.checkpoint = default_model_path()
    model = load(args.checkpoint, dtype=args.dtype)
    run_generate(model, getattr(model, "tokenizer", None), args)
    return 0


def cmd_info(args) -> int:
    info = _versions()
    if args.config:
        from jaxdlm.config import ModelConfig

        cfg = ModelConfig.from_hf(args.config)
        info["config"] = cfg.to_dict()
        info["num_params"] = cfg.num_params()
    print(json.dumps(info, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxdlm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="run every decoding mode of the embedded default model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--num-prompts", type=int, default=1, help="held-out prompts decoded as one batch")
    p.add_argument("--prompt-index", type=int, default=6,
                   help="first held-out prompt to use (0-15; default 6: a typical one, TPF near the median)")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("info", help="devices, versions, and a parsed config.json")
    p.add_argument("--config", help="a Hugging Face config.json (file or folder)")
    p.set_defaults(func=cmd_info)
    add_generate_parser(sub)
    p = sub.add_parser("train", help="train / fine-tune from a TOML or JSON experiment config")
    from jaxdlm.training.run import add_arguments as _train_arguments

    _train_arguments(p)
    p.set_defaults(func=cmd_train)
    return parser


def add_generate_parser(sub):
    p = sub.add_parser("generate", help="generate text from a checkpoint",
                       description="Generate with a jaxdlm checkpoint (its tokenizer and chat template).")
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint folder (jaxdlm.checkpoint.load); default: the embedded default model")
    p.add_argument("--prompt", required=True, action="append", help="prompt text (repeat for a batch)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt with the tokenizer's chat template")
    p.add_argument("--mode", default="auto", choices=GEN_MODES + ("auto",))
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--threshold", type=float, default=0.9, help="diffusion threshold; negative = fixed schedule")
    p.add_argument("--policy", default="confidence",
                   help="diffusion commit policy: confidence (default), margin, entropy or leftmost")
    p.add_argument("--margin", type=float, default=None, help="--policy margin: top-1 minus top-2 probability cut")
    p.add_argument("--entropy-bound", type=float, default=None, help="--policy entropy: summed entropy bound (nats)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--spec-sampling", default="exact", choices=("exact", "rejection"))
    p.add_argument("--eos-token-id", type=int, action="append", help="default: the config's EOS ids")
    p.add_argument("--max-thinking-tokens", type=int, default=None)
    p.add_argument("--end-think-token-id", type=int, default=None)
    p.add_argument("--dtype", default=None, help="parameter dtype (e.g. bfloat16); default: as stored")
    p.add_argument("--warmup", action="store_true", help="run once first so that tokens/s excludes compilation")
    p.set_defaults(func=cmd_generate)
    return p


def cmd_train(args) -> int:
    from jaxdlm.training.run import run_command

    return run_command(args)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"jaxdlm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
