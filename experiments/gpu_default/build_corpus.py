"""Code corpus for the GPU-trained default model: the installed packages' Python sources, whole packages held out.

Collects the ``.py`` files under the running interpreter's site-packages (``--roots`` to name other folders;
``--stdlib`` adds the standard library minus the modules the current default held out, so both models can be
compared on those too), groups them by top-level package (the first path component under a root), and puts
every file of a held-out package in the eval split:

* always held out: every package jaxdlm imports (``ALWAYS_HELD_OUT``: jax, jaxlib, flax, optax, orbax,
  transformers, numpy, torch, safetensors, tokenizers, their plugin / companion packages, and jaxdlm);
* plus ``--holdout`` (default ``DEFAULT_EXTRA_HELD_OUT``), so held-out means code the model never saw.

A name matches a package equal to it or starting with ``name_`` (``jax`` covers ``jax_plugins``), case-
insensitively.  Files are deduplicated by content hash (the first path in sorted order wins; a duplicate of a
held-out file is dropped from train as well), files over ``--max-file-bytes`` are skipped, the train files are
shuffled (``--seed``) and cut at ``--max-bytes``, the eval files at ``--max-eval-bytes`` (round robin over the
held-out packages so that no package dominates).

Writes into OUT, in the formats the training library's ``[data]`` section and the study's scripts read
(``experiments/small_scale/prepare_data.py``): ``train.npy`` / ``eval.npy`` (1-D uint16 token streams, each file
``<bos> ... <eos>``), ``tokenizer.json``, ``model_config.json``, ``data_stats.json``, ``eval_files.txt`` and
``heldout_prompts.json`` (``--prompts`` ASCII snippets of ``--prompt-bytes`` bytes at line starts of held-out
files, spread over the held-out packages, each with its true continuation of ``--continuation-bytes``; the
format of ``jaxdlm/default_model/heldout_prompts.json`` plus ``continuations``).

Tokenizer: ``--tokenizer bytes`` (default) copies the current default model's byte-level tokenizer (256 byte
symbols + ``<pad> <bos> <eos> <mask>``) and encodes through a byte lookup table (checked against the tokenizer
on a sample); ``--tokenizer bpe --vocab N`` trains a byte-level BPE with ``tokenizers`` on (a sample of) the
train split, ids 0..3 the same specials.

    python experiments/gpu_default/build_corpus.py --out DIR [--stdlib] [--max-bytes 300000000]
      [--holdout networkx jinja2 ...] [--tokenizer bytes|bpe] [--vocab 8192] [--layers 8] [--hidden 384]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import shutil
import sys
import sysconfig
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from jaxdlm.training.data import SPECIAL_TOKENS

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
DEFAULT_TOKENIZER = os.path.join(ROOT, "jaxdlm", "default_model", "tokenizer.json")
SPECIALS = list(SPECIAL_TOKENS)
ALWAYS_HELD_OUT = ("jax", "jaxlib", "jax_plugins", "flax", "flaxlib", "flaxlib_src", "optax", "orbax",
                   "transformers", "numpy", "torch", "torchgen", "functorch", "safetensors", "tokenizers", "jaxdlm")
DEFAULT_EXTRA_HELD_OUT = ("networkx", "jinja2", "rich", "click", "pyparsing", "dateutil")
SKIP_DIRS = {"__pycache__", ".git"}
# stdlib folders that are not code to learn from (as prepare_data.py), plus installed packages
STDLIB_EXCLUDE = {"test", "encodings", "pydoc_data", "site-packages", "dist-packages", "idlelib", "lib2to3",
                  "turtledemo", "tkinter", "ensurepip", "distutils"}


def is_held_out(top: str, names) -> bool:
    """Whether top-level package ``top`` is one of ``names`` (equal, or ``name_...``), case-insensitively."""
    t = top.lower()
    return any(t == n.lower() or t.startswith(n.lower() + "_") for n in names)


def stdlib_default_eval(top: str) -> bool:
    """The current default's held-out stdlib modules (``prepare_data.is_eval``: crc32 % 10 == 0)."""
    return zlib.crc32(top.encode()) % 10 == 0


def walk_py(root: str, prefix: str, exclude=frozenset()) -> list[tuple[str, str, str]]:
    """``(top, rel, path)`` for every ``.py`` file under ``root``; ``rel`` = ``prefix/relative path``."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        parts = [] if rel_dir == "." else rel_dir.split(os.sep)
        if parts and (parts[0] in exclude or parts[-1] in SKIP_DIRS or parts[0].endswith(".dist-info")):
            dirnames[:] = []
            continue
        dirnames.sort()
        for f in sorted(filenames):
            if f.endswith(".py"):
                top = parts[0] if parts else f[:-3]
                if top not in exclude:
                    out.append((top, f"{prefix}/{os.path.join(rel_dir, f) if parts else f}", os.path.join(dirpath, f)))
    return out


def default_roots() -> list[str]:
    """The interpreter's site-packages folders (purelib, platlib, site.getsitepackages()), existing, unique."""
    import site

    cands = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]] + list(site.getsitepackages())
    out = []
    for c in cands:
        c = os.path.realpath(c)
        if os.path.isdir(c) and c not in out:
            out.append(c)
    return out


def collect(roots, stdlib: bool) -> list[tuple[str, str, str]]:
    """Every candidate file ``(top, rel, path)``; stdlib files get top ``stdlib:<module>``."""
    files = []
    for i, r in enumerate(roots):
        files += walk_py(r, f"site{i}")
    if stdlib:
        root = sysconfig.get_paths()["stdlib"]
        for top, rel, path in walk_py(root, "stdlib", exclude=STDLIB_EXCLUDE):
            files.append((f"stdlib:{top}", rel, path))
    return files


def read_all(files, max_file_bytes: int, workers: int) -> dict[str, bytes]:
    """``{path: bytes}`` of the files no larger than ``max_file_bytes`` (read in parallel)."""
    def read(path):
        try:
            if os.path.getsize(path) > max_file_bytes:
                return path, None
            with open(path, "rb") as f:
                return path, f.read()
        except OSError:
            return path, None

    with ThreadPoolExecutor(workers) as ex:
        return {p: b for p, b in ex.map(read, [f[2] for f in files]) if b}


def split_files(files, texts, held_out, seed: int, max_bytes: int, max_eval_bytes: int):
    """``(train, eval)`` lists of ``(top, rel, path)``: deduplicated, held-out packages in eval, train shuffled
    and cut at ``max_bytes``, eval round robin over its packages and cut at ``max_eval_bytes``."""
    seen, train, ev = set(), [], {}
    for top, rel, path in sorted(files, key=lambda x: x[1]):
        raw = texts.get(path)
        if raw is None:
            continue
        h = hashlib.sha1(raw).digest()
        if h in seen:
            continue
        seen.add(h)
        stdlib_eval = top.startswith("stdlib:") and stdlib_default_eval(top[7:])
        if stdlib_eval:
            continue  # the current default's held-out stdlib modules: neither split (a fair comparison there)
        if is_held_out(top, held_out):
            ev.setdefault(top, []).append((top, rel, path))
        else:
            train.append((top, rel, path))
    random.Random(seed).shuffle(train)
    train = _cut(train, texts, max_bytes)
    rr = []
    queues = [ev[k] for k in sorted(ev)]
    while any(queues):
        for q in queues:
            if q:
                rr.append(q.pop(0))
    return train, _cut(rr, texts, max_eval_bytes)


def _cut(items, texts, limit: int):
    out, total = [], 0
    for it in items:
        n = len(texts[it[2]])
        if total + n > limit:
            continue
        out.append(it)
        total += n
    return out


def byte_lut(tok) -> np.ndarray:
    """``lut[b]`` = the byte-level tokenizer's id of byte ``b`` (256 entries)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = list(bs), 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    lut = np.zeros(256, np.uint16)
    for b, c in zip(bs, cs):
        i = tok.token_to_id(chr(c))
        if i is None:
            raise ValueError(f"the byte tokenizer has no entry for byte {b} ({chr(c)!r})")
        lut[b] = i
    return lut


def make_tokenizer(kind: str, vocab: int, train_texts, out_dir: str, sample_bytes: int):
    """The tokenizer (saved as ``out_dir/tokenizer.json``): the default's byte-level one, or a trained BPE."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = os.path.join(out_dir, "tokenizer.json")
    if kind == "bytes":
        shutil.copyfile(DEFAULT_TOKENIZER, path)
        return Tokenizer.from_file(path)
    if kind != "bpe":
        raise ValueError(f"--tokenizer={kind!r} is not supported; allowed: bytes, bpe")
    if vocab <= 260:
        raise ValueError(f"--vocab={vocab} must exceed 260 (256 byte symbols + 4 specials) for --tokenizer bpe")
    sample, total = [], 0
    for t in train_texts:
        if total >= sample_bytes:
            break
        sample.append(t)
        total += len(t)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(sample, trainer=trainer)
    tok.save(path)
    return tok


def check_byte_lut(tok, sample: bytes) -> None:
    """Raises when the lookup-table encoding of ``sample`` differs from the tokenizer's own."""
    text = sample.decode("utf-8", errors="ignore").encode("utf-8")
    got = encode(tok, "bytes", [text]).tolist()[1:-1]
    want = tok.encode(text.decode("utf-8")).ids
    if got != want:
        raise RuntimeError(f"the byte lookup table disagrees with the byte-level tokenizer: {got[:8]} vs {want[:8]}")


def encode(tok, kind: str, blobs: list[bytes]) -> np.ndarray:
    """One uint16 stream ``<bos> ids <eos>`` per blob (bytes: lookup table; BPE: ``encode_batch``)."""
    if not blobs:
        return np.zeros(0, np.uint16)
    if kind == "bytes":
        lut = byte_lut(tok)
        parts = []
        for b in blobs:
            parts += [np.array([1], np.uint16), lut[np.frombuffer(b, np.uint8)], np.array([2], np.uint16)]
        return np.concatenate(parts)
    ids = []
    for enc in tok.encode_batch([b.decode("utf-8", errors="replace") for b in blobs]):
        ids.extend([1] + enc.ids + [2])
    return np.asarray(ids, np.uint16)


def heldout_prompts(ev, texts, count: int, nbytes: int, cont: int) -> dict:
    """``count`` ASCII snippets (line starts) of held-out files with their true continuations, spread over the
    held-out packages (candidates interleaved by package, then evenly spaced picks)."""
    by_top = {}
    for top, rel, path in ev:
        raw = texts[path]
        starts = [0] + [i + 1 for i, b in enumerate(raw) if b == 0x0A]
        for s in starts[::40]:
            chunk = raw[s:s + nbytes + cont]
            if len(chunk) == nbytes + cont and chunk.isascii() and chunk[:nbytes].strip() and not chunk.startswith(b"\n"):
                by_top.setdefault(top, []).append((rel, chunk.decode("ascii")))
    cands, queues = [], [by_top[k] for k in sorted(by_top)]
    while any(queues):
        for q in queues:
            if q:
                cands.append(q.pop(len(q) // 2))  # from the middle of each package's list first
    if len(cands) < count:
        raise ValueError(f"only {len(cands)} held-out snippets of {nbytes}+{cont} ASCII bytes; lower --prompts "
                         f"or hold out more packages")
    pick = np.linspace(0, len(cands) - 1, count).astype(np.int64)
    chosen = [cands[i] for i in pick]
    return {"source": "held-out packages of experiments/gpu_default/build_corpus.py (never trained on)",
            "files": [r for r, _ in chosen], "prompts": [t[:nbytes] for _, t in chosen],
            "continuations": [t[nbytes:] for _, t in chosen]}


def model_config(args, vocab: int) -> dict:
    """The NLD-shaped model config (as prepare_data.py, sizes from the CLI)."""
    if args.hidden % args.head_dim or args.heads * args.head_dim != args.hidden:
        raise ValueError(f"--heads={args.heads} x --head-dim={args.head_dim} must equal --hidden={args.hidden}")
    return dict(model_type="nemotron_labs_diffusion", vocab_size=vocab, hidden_size=args.hidden,
                intermediate_size=args.intermediate, num_layers=args.layers, num_heads=args.heads,
                num_kv_heads=args.kv_heads, head_dim=args.head_dim, rms_norm_eps=1e-5, tie_word_embeddings=False,
                qk_norm=False, rope=dict(rope_type="default", theta=10000.0), max_position_embeddings=4096,
                mask_token_id=3, eos_token_ids=[2], bos_token_id=1, pad_token_id=0, block_size=args.block_size)


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--roots", nargs="*", default=None, help="folders to collect (default: site-packages)")
    ap.add_argument("--stdlib", action="store_true", help="add the stdlib (minus the default's held-out modules)")
    ap.add_argument("--holdout", nargs="*", default=list(DEFAULT_EXTRA_HELD_OUT),
                    help="held-out packages besides ALWAYS_HELD_OUT")
    ap.add_argument("--max-bytes", type=int, default=300_000_000, help="train split cap (bytes of source)")
    ap.add_argument("--max-eval-bytes", type=int, default=8_000_000)
    ap.add_argument("--max-file-bytes", type=int, default=200_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", default="bytes", choices=["bytes", "bpe"])
    ap.add_argument("--vocab", type=int, default=8192, help="BPE vocabulary (--tokenizer bpe)")
    ap.add_argument("--bpe-sample-bytes", type=int, default=60_000_000)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt-bytes", type=int, default=128)
    ap.add_argument("--continuation-bytes", type=int, default=160)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--intermediate", type=int, default=1152)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=min(32, (os.cpu_count() or 1) * 2))
    args = ap.parse_args(argv)
    for name in ("max_bytes", "max_eval_bytes", "max_file_bytes", "prompts", "prompt_bytes", "layers", "hidden"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)} must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.time()
    os.makedirs(args.out, exist_ok=True)
    roots = args.roots if args.roots is not None else default_roots()
    held = list(ALWAYS_HELD_OUT) + list(args.holdout)
    files = collect(roots, args.stdlib)
    texts = read_all(files, args.max_file_bytes, args.workers)
    train, ev = split_files(files, texts, held, args.seed, args.max_bytes, args.max_eval_bytes)
    if not train or not ev:
        raise ValueError(f"empty split: {len(train)} train / {len(ev)} eval files under {roots}")
    tok = make_tokenizer(args.tokenizer, args.vocab, (texts[p].decode("utf-8", "replace") for _, _, p in train),
                         args.out, args.bpe_sample_bytes)
    if args.tokenizer == "bytes":  # the lookup table must agree with the tokenizer itself
        check_byte_lut(tok, texts[train[0][2]][:4000])
    tr = encode(tok, args.tokenizer, [texts[p] for _, _, p in train])
    es = encode(tok, args.tokenizer, [texts[p] for _, _, p in ev])
    np.save(os.path.join(args.out, "train.npy"), tr)
    np.save(os.path.join(args.out, "eval.npy"), es)
    held_json = heldout_prompts(ev, texts, args.prompts, args.prompt_bytes, args.continuation_bytes)
    write_outputs(args, roots, held, train, ev, texts, tok, tr, es, held_json, time.time() - t0)
    return 0


def write_outputs(args, roots, held, train, ev, texts, tok, tr, es, held_json, seconds) -> None:
    """``heldout_prompts.json``, ``eval_files.txt``, ``model_config.json`` and ``data_stats.json``."""
    with open(os.path.join(args.out, "heldout_prompts.json"), "w", encoding="utf-8") as f:
        json.dump(held_json, f, indent=1)
    with open(os.path.join(args.out, "eval_files.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(rel for _, rel, _ in ev) + "\n")
    mc = model_config(args, tok.get_vocab_size())
    with open(os.path.join(args.out, "model_config.json"), "w", encoding="utf-8") as f:
        json.dump(mc, f, indent=1)
    from jaxdlm.config import ModelConfig

    stats = {"python": sys.version.split()[0], "platform": platform.platform(), "roots": roots,
             "stdlib": args.stdlib, "held_out_names": held, "tokenizer": args.tokenizer,
             "vocab_size": tok.get_vocab_size(), "train_files": len(train), "eval_files": len(ev),
             "train_packages": len({t for t, _, _ in train}), "eval_modules": sorted({t for t, _, _ in ev}),
             "train_bytes": sum(len(texts[p]) for _, _, p in train), "eval_bytes": sum(len(texts[p]) for _, _, p in ev),
             "train_tokens": int(len(tr)), "eval_tokens": int(len(es)),
             "model_params": ModelConfig.from_dict(mc).num_params(), "seconds": round(seconds, 1)}
    with open(os.path.join(args.out, "data_stats.json"), "w", encoding="utf-8") as f:
        json.dump(stats, f, indent=1)
    print(json.dumps({k: v for k, v in stats.items() if k not in ("eval_modules", "held_out_names")}, indent=1))
    print(f"eval packages: {stats['eval_modules']}")


if __name__ == "__main__":
    sys.exit(main())
