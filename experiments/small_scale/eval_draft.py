"""Teacher-forced draft quality of trained runs on the held-out split (no decoder needed).

For each run folder: the held-out AR loss (causal pass), and for every block of ``n`` tokens of held-out
sequences one draft pass over ``[x_0[j n], MASK * (n-1)]`` against the clean causal context of earlier
blocks (LoRA on when the run trained one; otherwise the plain denoise pass):

* ``acc_true``: fraction of drafted tokens equal to the true token (one-step diffusion accuracy);
* ``match_ar``: fraction equal to the AR argmax at the previous position (what linear-spec verification
  checks, under teacher forcing);
* ``accept``: mean accepted draft prefix per block (verification stops at the first mismatch), so a
  linear-spec cycle would emit ``accept + 1`` tokens for 2 forwards (draft + verify).

    python experiments/small_scale/eval_draft.py RUN_DIR [RUN_DIR ...] [--sequences 64]
      [--out experiments/results/small_scale_draft.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def evaluate(run_dir: str, tokens: np.ndarray, batch: int = 8) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxdlm.lora import OProjLoRA
    from jaxdlm.training import lora as lora_lib
    from jaxdlm.training.losses import ar_loss
    from jaxdlm.training.run import load_trained

    model = load_trained(run_dir)
    cfg = model.config
    lora = model.lora
    if lora is None:
        lora = OProjLoRA.init(cfg, 1, 1.0, jax.random.PRNGKey(0))  # b = 0: the plain denoise pass
    n = cfg.block_size

    @jax.jit
    def stats(params, lora, toks):
        module = nnx.merge(model.graphdef, params)
        draft, ar = lora_lib.draft_and_verify_logits(module, toks, lora)
        d_arg = jnp.argmax(draft, -1)
        ar_prev = jnp.concatenate([jnp.zeros_like(toks[:, :1]), jnp.argmax(ar, -1)[:, :-1]], axis=1)
        pos = jnp.arange(toks.shape[1]) % n != 0
        hit_ar = (d_arg == ar_prev) & pos
        b, l = toks.shape
        acc = jnp.sum(jnp.cumprod(hit_ar.reshape(b, l // n, n)[:, :, 1:].astype(jnp.int32), -1), -1)
        return {"acc_true": jnp.sum((d_arg == toks) & pos), "match_ar": jnp.sum(hit_ar), "n": jnp.sum(pos) * b,
                "accept": jnp.sum(acc), "blocks": b * (l // n), "ar_loss": ar_loss(module, toks)[0]}

    tot = {}
    for i in range(0, len(tokens) - batch + 1, batch):
        out = stats(model.params, lora, jnp.asarray(tokens[i:i + batch]))
        for k, v in out.items():
            tot[k] = tot.get(k, 0.0) + float(v)
    nb = len(tokens) // batch
    return {"run": os.path.basename(os.path.normpath(run_dir)), "lora": model.lora is not None,
            "sequences": nb * batch, "ar_loss": tot["ar_loss"] / nb, "acc_true": tot["acc_true"] / tot["n"],
            "match_ar": tot["match_ar"] / tot["n"], "accept": tot["accept"] / tot["blocks"],
            "tokens_per_cycle": 1 + tot["accept"] / tot["blocks"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--sequences", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval", default=os.path.join(HERE, "data", "eval.npy"))
    ap.add_argument("--out", default=os.path.join(HERE, "..", "results", "small_scale_draft.json"))
    args = ap.parse_args(argv)
    import jax

    stream = np.load(args.eval).astype(np.int32)
    rows = stream[: len(stream) // args.seq_len * args.seq_len].reshape(-1, args.seq_len)[: args.sequences]
    results = [evaluate(r, rows) for r in args.runs]
    out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": str(jax.devices()[0]), "jax": jax.__version__, "seq_len": args.seq_len, "results": results}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)
    for r in results:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
