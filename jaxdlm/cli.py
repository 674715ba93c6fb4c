"""The ``jaxdlm`` command line.

``jaxdlm demo``   runs the embedded default model (a tiny random model until a trained one ships).
``jaxdlm info``   prints the devices, versions and, with ``--config``, a parsed model config.
``jaxdlm train``  trains / fine-tunes from a TOML or JSON experiment config (``jaxdlm.training``).
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


def tiny_demo_config():
    """The configuration of the tiny random demo model (NLD-shaped, untied head, YaRN)."""
    from jaxdlm.config import ModelConfig, RopeConfig

    return ModelConfig(
        model_type="nemotron_labs_diffusion", vocab_size=512, hidden_size=64, intermediate_size=128,
        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, mask_token_id=100, eos_token_ids=(11,),
        bos_token_id=1, block_size=32,
        rope=RopeConfig(rope_type="yarn", theta=1e6, factor=16.0, original_max_position_embeddings=16384,
                        beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0, llama4_scaling_beta=0.1))


def cmd_demo(args) -> int:
    import numpy as np

    from jaxdlm.model import Model

    cfg = tiny_demo_config()
    print("jaxdlm demo: no trained default model ships yet, so this runs a TINY RANDOM model "
          f"({cfg.num_params() / 1e6:.2f}M params) - its outputs are meaningless.")
    model = Model.init(cfg, seed=args.seed)
    tokens = np.random.default_rng(args.seed).integers(0, cfg.vocab_size, size=(1, 48))
    for kind, toks in (("causal", tokens), ("two_stream", np.concatenate([tokens, tokens], axis=1))):
        t0 = time.perf_counter()
        logits = model.logits(toks, kind=kind).block_until_ready()
        print(f"  {kind:>10}: logits {tuple(logits.shape)} in {time.perf_counter() - t0:.2f}s (incl. compile), "
              f"argmax of last position = {int(logits[0, -1].argmax())}")
    print(f"  {_versions()}")
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
    p = sub.add_parser("demo", help="run the embedded default model")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("info", help="devices, versions, and a parsed config.json")
    p.add_argument("--config", help="a Hugging Face config.json (file or folder)")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("train", help="train / fine-tune from a TOML or JSON experiment config")
    from jaxdlm.training.run import add_arguments as _train_arguments

    _train_arguments(p)
    p.set_defaults(func=cmd_train)
    return parser


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
