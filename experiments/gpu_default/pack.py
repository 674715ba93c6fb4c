"""Carries a trained model off the GPU machine: a jaxdlm checkpoint folder packed into at most 8 files of at most
16 MB (the device tool's limits), and back.

* ``checkpoint RUN_DIR CKPT_DIR --data DATA_DIR [--dtype bfloat16]``: the run's model (``load_trained``: params
  and its draft LoRA) with the tokenizer of ``DATA_DIR/tokenizer.json`` as a jaxdlm checkpoint folder
  (``jaxdlm.save``), cast to ``--dtype``; the data's ``heldout_prompts.json`` / ``data_stats.json`` and the
  train configs of the run chain (``runs.json``) ride along as extra files, for the card.
* ``pack SRC_DIR OUT_PREFIX [--max-files 5] [--chunk-mb 15]``: ``SRC_DIR`` as one uncompressed tar cut into
  ``OUT_PREFIX.tar.partK-of-N`` files (``K`` from 1); prints the tar's SHA-256.
* ``unpack OUT_PREFIX DEST_DIR [--sha256 HEX]``: joins the parts (all ``N`` must be present), checks the
  SHA-256 when given, and extracts into ``DEST_DIR`` (members must stay inside it).

    python experiments/gpu_default/pack.py pack /tmp/gd/ckpt $OUT/model
    python experiments/gpu_default/pack.py unpack results/model /tmp/gd_ckpt   # -> /tmp/gd_ckpt/ckpt
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import io
import json
import os
import re
import sys
import tarfile

MB = 1 << 20


def pack(src: str, prefix: str, max_files: int = 5, chunk_mb: float = 15) -> tuple[list[str], str]:
    """Writes ``src`` as ``prefix.tar.partK-of-N``; returns ``(paths, sha256 of the tar)``."""
    if not os.path.isdir(src):
        raise ValueError(f"pack: {src} is not a folder")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(src, arcname=os.path.basename(os.path.normpath(src)))
    data = buf.getvalue()
    chunk = int(chunk_mb * MB)
    n = max(1, -(-len(data) // chunk))
    if n > max_files:
        raise ValueError(f"pack: {src} is {len(data) / MB:.1f} MB, more than --max-files={max_files} parts of "
                         f"{chunk_mb} MB")
    for old in glob.glob(glob.escape(prefix) + ".tar.part*"):
        os.remove(old)
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    paths = []
    for k in range(n):
        p = f"{prefix}.tar.part{k + 1}-of-{n}"
        with open(p, "wb") as f:
            f.write(data[k * chunk:(k + 1) * chunk])
        paths.append(p)
    return paths, hashlib.sha256(data).hexdigest()


def _parts(prefix: str) -> list[str]:
    """The parts of ``prefix`` in order; ``ValueError`` when one is missing or the counts disagree."""
    found = {}
    for p in glob.glob(glob.escape(prefix) + ".tar.part*"):
        m = re.fullmatch(r".*\.tar\.part(\d+)-of-(\d+)", p)
        if m:
            found[(int(m.group(1)), int(m.group(2)))] = p
    if not found:
        raise ValueError(f"unpack: no {prefix}.tar.partK-of-N files")
    totals = {n for _, n in found}
    if len(totals) != 1:
        raise ValueError(f"unpack: parts of {prefix} disagree on their count: {sorted(totals)}")
    n = totals.pop()
    missing = [k for k in range(1, n + 1) if (k, n) not in found]
    if missing:
        raise ValueError(f"unpack: {prefix} lacks part(s) {missing} of {n}")
    return [found[(k, n)] for k in range(1, n + 1)]


def unpack(prefix: str, dest: str, sha256: str | None = None) -> list[str]:
    """Joins and extracts the parts of ``prefix`` into ``dest``; returns the top-level names extracted."""
    data = b"".join(open(p, "rb").read() for p in _parts(prefix))
    digest = hashlib.sha256(data).hexdigest()
    if sha256 and digest != sha256.lower():
        raise ValueError(f"unpack: SHA-256 of {prefix} is {digest}, expected {sha256}")
    os.makedirs(dest, exist_ok=True)
    root = os.path.realpath(dest)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
        for m in tar.getmembers():
            target = os.path.realpath(os.path.join(root, m.name))
            if not (target == root or target.startswith(root + os.sep)) or m.issym() or m.islnk():
                raise ValueError(f"unpack: refusing tar member {m.name!r} (outside {dest} or a link)")
        tar.extractall(root)
        return sorted({m.name.split("/")[0] for m in tar.getmembers()})


def save_checkpoint(run: str, out: str, data_dir: str, dtype: str = "bfloat16") -> int:
    """The run's model with the data's tokenizer as a jaxdlm checkpoint folder; returns its size in bytes."""
    import jaxdlm
    from jaxdlm.model import Model
    from jaxdlm.training.data import tokenizer_from_file
    from jaxdlm.training.run import load_trained, run_lineage

    tok = tokenizer_from_file(os.path.join(data_dir, "tokenizer.json"))
    m = load_trained(run)
    model = Model(m.config, m.graphdef, m.params, lora=m.lora, tokenizer=tok).astype(dtype)
    lineage = [{"run": os.path.basename(os.path.normpath(r)), "train_config": tc} for r, tc in run_lineage(run)]
    extra = {"runs.json": json.dumps(lineage, indent=1)}
    for name in ("heldout_prompts.json", "data_stats.json"):
        with open(os.path.join(data_dir, name), encoding="utf-8") as f:
            extra[name] = f.read()
    path = jaxdlm.save(model, out, overwrite=True, source=os.path.basename(os.path.normpath(run)), extra_files=extra)
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("checkpoint")
    c.add_argument("run")
    c.add_argument("out")
    c.add_argument("--data", required=True)
    c.add_argument("--dtype", default="bfloat16")
    p = sub.add_parser("pack")
    p.add_argument("src")
    p.add_argument("prefix")
    p.add_argument("--max-files", type=int, default=5)
    p.add_argument("--chunk-mb", type=float, default=15)
    u = sub.add_parser("unpack")
    u.add_argument("prefix")
    u.add_argument("dest")
    u.add_argument("--sha256", default=None)
    args = ap.parse_args(argv)
    if args.cmd == "checkpoint":
        size = save_checkpoint(args.run, args.out, args.data, args.dtype)
        print(f"wrote {args.out} ({size / 1e6:.1f} MB, {args.dtype})")
    elif args.cmd == "pack":
        paths, digest = pack(args.src, args.prefix, args.max_files, args.chunk_mb)
        print(json.dumps({"parts": [os.path.basename(p) for p in paths], "sha256": digest,
                          "bytes": sum(os.path.getsize(p) for p in paths)}))
    else:
        print(f"extracted {unpack(args.prefix, args.dest, args.sha256)} into {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
