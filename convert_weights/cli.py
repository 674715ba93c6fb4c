"""Command line of the converter: one line on stderr per error, no traceback unless ``--debug``."""

from __future__ import annotations

import argparse
import os
import sys


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other error of this command
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from convert_weights.core import DTYPES, LORA_SUBFOLDER, QUANTIZE, __version__

    p = _Parser(
        prog="convert-weights",
        description="Convert a Hugging Face safetensors checkpoint (NLD, Ministral-3, Mistral, Llama, Qwen3) "
                    "into a jaxdlm checkpoint folder (Orbax arrays + config + tokenizer files) that "
                    "jaxdlm.load(OUT_DIR) reads. Streams one tensor at a time; atomic (OUT_DIR appears only "
                    "when complete).")
    p.add_argument("hf_dir", metavar="HF_DIR", help="folder with config.json and model.safetensors "
                   "(or shards + model.safetensors.index.json)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="output folder (must not exist unless --overwrite)")
    p.add_argument("--dtype", default="keep", choices=DTYPES,
                   help="parameter dtype of the output (default: keep the checkpoint's dtype; with --quantize: "
                        "bfloat16, said in one line when the checkpoint is not)")
    p.add_argument("--quantize", default=None, choices=QUANTIZE,
                   help="store every linear weight quantized: int8 (per output channel), int4 (groups of 128 "
                        "inputs) or fp8 (e4m3, per output channel); other arrays and the scales in bfloat16")
    p.add_argument("--quantize-head", action="store_true", help="with --quantize: quantize the output head too")
    p.add_argument("--lora", metavar="DIR", default=None,
                   help=f"PEFT draft LoRA adapter folder (o_proj only); default: HF_DIR/{LORA_SUBFOLDER} if present")
    p.add_argument("--overwrite", action="store_true", help="replace an existing jaxdlm checkpoint at OUT_DIR")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no status lines")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    p.add_argument("--version", action="version", version=f"convert_weights {__version__}")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # conversion runs on the host; never grab an accelerator
    try:
        from convert_weights.core import convert

        convert(args.hf_dir, args.out_dir, dtype=args.dtype, lora=args.lora, overwrite=args.overwrite,
                progress=False if args.quiet else None, log=None if args.quiet else print,
                quantize=args.quantize, quantize_head=args.quantize_head)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("convert-weights: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one line per error is the contract; --debug shows the traceback
        if args.debug:
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        if not isinstance(e, ValueError):
            msg = f"{type(e).__name__}: {msg}"
        print(f"convert-weights: error: {msg}", file=sys.stderr)
        return 2
    return 0
