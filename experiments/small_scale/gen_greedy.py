"""Self-distillation data for the draft LoRA: the model's own greedy AR continuations of training prompts.

Linear self-speculation accepts a drafted token only when it equals the verifier's (the same model's) AR
argmax, so the ideal draft predicts the model's own greedy text, not the corpus.  This script cuts
``--rows`` windows of ``--prompt-len`` tokens from the TRAIN split (random offsets, ``--seed``, no special
ids), continues each with ``jaxdlm.generate(mode="ar")`` greedily for ``--new`` tokens and writes the rows
``prompt + continuation`` as ``int32 [rows, prompt_len + new]`` (a 2-D token file for ``[data] train``;
``prompt_len + new`` must be a multiple of the block size).

    python experiments/small_scale/gen_greedy.py RUN_DIR OUT.npy [--rows 1024] [--prompt-len 128] [--new 384]
      [--train experiments/small_scale/data_bytes/train.npy] [--batch 64] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from eval_decode import SPECIAL  # <pad> <bos> <eos> <mask> ids (prepare_data.py)

HERE = os.path.dirname(os.path.abspath(__file__))


def train_prompts(stream: np.ndarray, rows: int, prompt_len: int, seed: int) -> np.ndarray:
    """``rows`` windows ``[rows, prompt_len]`` of ``stream`` at random offsets, none with a special id."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(rows * 50):
        s = int(rng.integers(0, len(stream) - prompt_len))
        w = stream[s:s + prompt_len]
        if not np.isin(w, SPECIAL).any():
            out.append(w)
            if len(out) == rows:
                return np.stack(out).astype(np.int32)
    raise ValueError(f"found only {len(out)} clean windows of {prompt_len} tokens; ask for fewer --rows")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run")
    ap.add_argument("out")
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new", type=int, default=384)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train", default=os.path.join(HERE, "data_bytes", "train.npy"))
    args = ap.parse_args(argv)
    if args.rows % args.batch:
        raise ValueError(f"--rows={args.rows} must be a multiple of --batch={args.batch}")
    import jax
    from tqdm import tqdm

    import jaxdlm
    from jaxdlm.training.run import load_trained

    jax.config.update("jax_default_matmul_precision", "highest")
    model = load_trained(args.run)
    total = args.prompt_len + args.new
    if total % model.config.block_size:
        raise ValueError(f"--prompt-len + --new = {total} must be a multiple of block_size={model.config.block_size}")
    prompts = train_prompts(np.load(args.train).astype(np.int32), args.rows, args.prompt_len, args.seed)
    rows = []
    for i in tqdm(range(0, args.rows, args.batch), desc="greedy AR"):
        p = prompts[i:i + args.batch]
        r = jaxdlm.generate(model, p, mode="ar", max_new_tokens=args.new, eos_token_id=(), temperature=0.0)
        rows.append(np.concatenate([p, np.asarray(r.tokens)], axis=1))
    data = np.concatenate(rows).astype(np.int32)
    tmp = args.out + ".tmp.npy"
    np.save(tmp, data)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}: {data.shape}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
