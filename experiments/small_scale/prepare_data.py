"""Corpus, tokenizer and model config for the small-scale AR -> block-diffusion reproduction.

Corpus: the ``.py`` files of the running interpreter's standard library (every machine has it offline),
without test suites, encodings tables and data-only packages.  Held out for evaluation: every top-level
module whose name has ``crc32(name) % 10 == 0`` (whole modules, so no file is split across the splits).

Tokenizer: byte-level BPE trained with the ``tokenizers`` library on the TRAIN split only; ids 0..3 are
``<pad> <bos> <eos> <mask>``.  Each file becomes one document ``<bos> ... <eos>``.

Writes into OUT (default ``experiments/small_scale/data``): ``tokenizer.json``, ``train.npy`` / ``eval.npy``
(1-D uint16 token streams), ``eval_files.txt``, ``model_config.json`` (the tiny NLD-shaped model) and
``data_stats.json``.

    python experiments/small_scale/prepare_data.py [--out DIR] [--vocab 4096] [--block-size 16] [--layers 4]

``--vocab 260`` (256 byte symbols + 4 specials) gives a pure byte-level tokenizer with no merges.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import sysconfig
import zlib

import numpy as np

from jaxdlm.training.data import SPECIAL_TOKENS

EXCLUDE_TOP = {"test", "encodings", "pydoc_data", "site-packages", "dist-packages", "idlelib", "lib2to3",
               "turtledemo", "tkinter", "ensurepip", "distutils"}
SPECIALS = list(SPECIAL_TOKENS)


def stdlib_files() -> list[tuple[str, str]]:
    """``(top_level_module, path)`` for every kept stdlib ``.py`` file, sorted by path."""
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        parts = [] if rel == "." else rel.split(os.sep)
        if parts and parts[0] in EXCLUDE_TOP or any(p in ("tests", "test", "idle_test", "__pycache__") for p in parts):
            dirnames[:] = []
            continue
        for f in filenames:
            if f.endswith(".py"):
                top = parts[0] if parts else f[:-3]
                if top in EXCLUDE_TOP:
                    continue
                out.append((top, os.path.join(dirpath, f)))
    return sorted(out, key=lambda x: x[1])


def is_eval(top: str) -> bool:
    return zlib.crc32(top.encode()) % 10 == 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "data"))
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=768)
    args = ap.parse_args(argv)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    os.makedirs(args.out, exist_ok=True)
    files = stdlib_files()
    texts = {}
    for top, path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            texts[path] = f.read()
    train_paths = [p for t, p in files if not is_eval(t)]
    eval_paths = [p for t, p in files if is_eval(t)]

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=args.vocab, special_tokens=SPECIALS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((texts[p] for p in train_paths), trainer=trainer)
    assert [tok.token_to_id(s) for s in SPECIALS] == [0, 1, 2, 3]
    tok.save(os.path.join(args.out, "tokenizer.json"))

    def encode(paths):
        ids = []
        for enc in tok.encode_batch([texts[p] for p in paths]):
            ids.extend([1] + enc.ids + [2])
        return np.asarray(ids, np.uint16)

    train, ev = encode(train_paths), encode(eval_paths)
    np.save(os.path.join(args.out, "train.npy"), train)
    np.save(os.path.join(args.out, "eval.npy"), ev)
    root = sysconfig.get_paths()["stdlib"]
    with open(os.path.join(args.out, "eval_files.txt"), "w") as f:
        f.write("\n".join(os.path.relpath(p, root) for p in eval_paths) + "\n")

    model = dict(model_type="nemotron_labs_diffusion", vocab_size=tok.get_vocab_size(), hidden_size=args.hidden,
                 intermediate_size=args.intermediate, num_layers=args.layers, num_heads=4, num_kv_heads=2, head_dim=64,
                 rms_norm_eps=1e-5, tie_word_embeddings=False, qk_norm=False,
                 rope=dict(rope_type="default", theta=10000.0), max_position_embeddings=4096,
                 mask_token_id=3, eos_token_ids=[2], bos_token_id=1, pad_token_id=0, block_size=args.block_size)
    with open(os.path.join(args.out, "model_config.json"), "w") as f:
        json.dump(model, f, indent=1)
    stats = {"python": sys.version.split()[0], "platform": platform.platform(), "stdlib": root,
             "train_files": len(train_paths), "eval_files": len(eval_paths),
             "train_modules": len({t for t, _ in files if not is_eval(t)}),
             "eval_modules": sorted({t for t, _ in files if is_eval(t)}),
             "train_tokens": int(len(train)), "eval_tokens": int(len(ev)),
             "train_bytes": sum(len(texts[p].encode()) for p in train_paths),
             "eval_bytes": sum(len(texts[p].encode()) for p in eval_paths),
             "vocab_size": tok.get_vocab_size()}
    with open(os.path.join(args.out, "data_stats.json"), "w") as f:
        json.dump(stats, f, indent=1)
    print(json.dumps({k: v for k, v in stats.items() if k != "eval_modules"}, indent=1))
    print(f"eval modules: {stats['eval_modules']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
