"""Helpers for testing code that uses jaxdlm; the project's own tests and experiments use them too.

* :func:`count_compilations` counts XLA compilations inside a ``with`` block (e.g. to check that changing a traced
  knob does not recompile a generation program), from JAX's monitoring events.
* :func:`tiny_config`, :func:`tiny_model`, :func:`random_lora`, :func:`random_prompts`: small random models for
  tests (seconds to compile on a CPU); :data:`NLD_ROPE` is NLD's RoPE setting (YaRN, factor 16, Llama-4 query
  scaling), for tests and benchmarks of the real shapes.
* The plain reference decoders (:class:`Reference`, :func:`ref_ar`, :func:`ref_diffusion`, :func:`ref_linear`,
  :func:`ref_quadratic`): deliberately plain oracles of every decoding mode at T = 0 (docs/decoding.md).  One row
  at a time, Python loops, and a FULL UNCACHED forward over the whole sequence at every step, with the mask
  metadata written here from the visibility rules of docs/attention.md (clean tokens: causal; a noisy block: its
  own tokens bidirectionally plus clean tokens of strictly earlier blocks).  Nothing here uses
  ``jaxdlm.generation``; the only shared pieces are the model itself and its mask predicate.  The sequence is
  padded to a multiple of 64 (padding keys invalid) so that one compiled forward serves many steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdlm.attention.masks import CLEAN, NOISY, TokenInfo
from jaxdlm.config import ModelConfig, RopeConfig
from jaxdlm.lora import OProjLoRA

# ---------------------------------------------------------------------------------------------------
# counting compilations

_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
_compiles = {"count": 0, "listening": False}


def _on_event(event: str, duration: float, **_) -> None:
    if event == _BACKEND_COMPILE:
        _compiles["count"] += 1


class _Count:
    value = 0


@contextlib.contextmanager
def count_compilations():
    """``with count_compilations() as n: ...`` then ``n.value`` = XLA compilations the block ran (a program
    found in the in-memory jit cache compiles nothing; one read from the persistent cache still counts)."""
    if not _compiles["listening"]:
        jax.monitoring.register_event_duration_secs_listener(_on_event)
        _compiles["listening"] = True
    counter = _Count()
    before = _compiles["count"]
    try:
        yield counter
    finally:
        counter.value = _compiles["count"] - before


# ---------------------------------------------------------------------------------------------------
# tiny random models

#: NLD's RoPE (docs/model.md): YaRN with factor 16 over 16384 original positions, Llama-4 query scaling
NLD_ROPE = RopeConfig(rope_type="yarn", theta=1e6, factor=16.0, original_max_position_embeddings=16384,
                      beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0, llama4_scaling_beta=0.1)
TINY_MASK = 3  # the MASK id of tiny_config() (ids 0..3 are special: pad, bos, eos, mask)


def tiny_config(**overrides) -> ModelConfig:
    """A 2-layer Ministral-3 config (vocab 64, hidden 32, 4 / 2 heads of 16, MASK 3, EOS 2, block 4); keyword
    arguments override fields."""
    base = dict(model_type="ministral3", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                num_heads=4, num_kv_heads=2, head_dim=16, mask_token_id=TINY_MASK, eos_token_ids=(2,), block_size=4)
    base.update(overrides)
    return ModelConfig(**base)


def random_lora(config: ModelConfig, rank: int, seed: int, std: float = 0.3, scale: float = 4.0) -> OProjLoRA:
    """An o_proj draft LoRA with normal(0, ``std``) factors (not zero: drafts then differ from the base model)."""
    ka, kb = jax.random.split(jax.random.PRNGKey(seed))
    c = config
    return OProjLoRA(std * jax.random.normal(ka, (c.num_layers, c.num_heads * c.head_dim, rank)),
                     std * jax.random.normal(kb, (c.num_layers, rank, c.hidden_size)), jnp.float32(scale))


def tiny_model(seed: int, config: ModelConfig | None = None, head_scale: float = 60.0, lora_rank: int | None = None):
    """A tiny random :class:`jaxdlm.Model` whose output head is scaled by ``head_scale``.

    The default 60 makes distributions peaked (top-1 probability around 0.7), so diffusion thresholds in
    0.3..1.0 matter and float32 argmax ties are practically absent; a smaller scale gives flatter distributions
    (sampling tests).  ``lora_rank``: attach a :func:`random_lora` (seeded ``seed + 1``).
    """
    from jaxdlm.hf import model_from_pure_dict
    from jaxdlm.model import Model

    config = config or tiny_config()
    pure = nnx.to_pure_dict(Model.init(config, seed=seed).params)
    pure["head"] = pure["head"] * head_scale
    lora = random_lora(config, lora_rank, seed + 1) if lora_rank else None
    return model_from_pure_dict(config, pure, lora=lora)


def random_prompts(rng, batch: int, lo: int = 2, hi: int = 20, vocab: int = 64) -> list[np.ndarray]:
    """``batch`` prompts of random lengths ``lo..hi`` with ids ``4..vocab-1`` (no special ids)."""
    return [rng.integers(4, vocab, size=int(n)) for n in rng.integers(lo, hi + 1, size=batch)]


def eos_from_output(res, rng) -> list[int]:
    """An EOS id that a previous run emitted in the first half of row 0's output (so a rerun with it stops early)."""
    row = res.tokens[0, :res.lengths[0]]
    return [int(row[rng.integers(1, max(2, len(row) // 2))])]


# ---------------------------------------------------------------------------------------------------
# the plain reference decoders


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _dense_forward(graphdef, params, lora, tokens, pos, block, stream, valid):
    module = nnx.merge(graphdef, params)
    info = TokenInfo(pos, block, stream, valid)
    logits, _ = module(tokens, pos, info, info, lora=lora)
    return logits


class Reference:
    """Reference decoders for one model (``mask_id``: the MASK token, never chosen)."""

    def __init__(self, model):
        self.model = model
        self.mask = model.config.mask_token_id

    def run(self, toks, pos, block, stream, lora=None, lora_from=0):
        """Logits ``[N, V]`` (float64) of one uncached forward over tokens with explicit metadata.

        ``lora`` acts on tokens ``lora_from..`` only (a per-token LoRA scale): in a draft pass the
        context K/V are the base model's (they come from LoRA-free passes), only the block is drafted.
        """
        n = len(toks)
        size = -(-n // 64) * 64
        pad = size - n
        arr = lambda x, fill: np.asarray(list(x) + [fill] * pad, np.int32)[None]  # noqa: E731
        valid = np.asarray([True] * n + [False] * pad)[None]
        if lora is not None:
            on = (np.arange(size) >= lora_from) & (np.arange(size) < n)
            lora = dataclasses.replace(lora, scale=lora.scale * jnp.asarray(on, jnp.float32)[None, :, None])
        out = _dense_forward(self.model.graphdef, self.model.params, lora, arr(toks, 0), arr(pos, 10**6),
                             arr(block, 0), arr(stream, CLEAN), valid)
        return np.asarray(out, np.float64)[0, :n]  # slicing on the host: a jax slice compiles per length

    def causal(self, seq):
        n = len(seq)
        return self.run(seq, range(n), [0] * n, [CLEAN] * n)

    def denoise(self, ctx, blk, lora=None):
        """Logits of ``blk`` (NOISY block 1 after the CLEAN context ``ctx`` in block 0)."""
        c, b = len(ctx), len(blk)
        return self.run(list(ctx) + list(blk), range(c + b), [0] * c + [1] * b, [CLEAN] * c + [NOISY] * b,
                        lora=lora, lora_from=c)[c:]

    def pick(self, logits):
        """Argmax with the MASK id excluded; confidence = softmax (MASK included) of the pick."""
        x = np.array(logits, np.float64)
        x[..., self.mask] = -np.inf
        tok = np.argmax(x, axis=-1)
        z = logits - logits.max(-1, keepdims=True)
        p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
        return tok, np.take_along_axis(p, tok[..., None], -1)[..., 0]

    def scores(self, logits):
        """``pick`` plus the margin and entropy of :func:`scores` (arrays ``[N]``)."""
        return scores(logits, self.mask)


def scores(logits, mask):
    """Per row of ``logits [N, V]``: the argmax with ``mask`` excluded, and from the full-vocabulary softmax
    ``p`` (MASK included): its confidence ``p[tok]``, its margin ``p[tok]`` minus the largest ``p`` of another
    non-MASK token, and the entropy ``-sum(p log p)`` in nats."""
    logits = np.asarray(logits, np.float64)
    n, v = logits.shape
    tok, conf, margin, ent = np.zeros(n, np.int64), np.zeros(n), np.zeros(n), np.zeros(n)
    for i in range(n):
        z = np.exp(logits[i] - logits[i].max())
        p = z / z.sum()
        tok[i] = max((t for t in range(v) if t != mask), key=lambda t: logits[i, t])  # first maximum
        conf[i] = p[tok[i]]
        margin[i] = conf[i] - max(p[t] for t in range(v) if t not in (tok[i], mask))
        ent[i] = -sum(q * np.log(q) for q in p if q > 0)
    return tok, conf, margin, ent


def commit_rule(policy, masked, conf, margin, ent, threshold, margin_cut=None, entropy_bound=None):
    """The positions one denoise pass commits under ``policy`` (a sorted list), from per-position scores.

    confidence / margin: the best masked position (first maximum) and every masked one at or above the cut;
    entropy: masked positions by increasing entropy (then index) while the running sum stays within the
    bound, at least one; leftmost: the leftmost masked position, then rightwards while masked and confident.
    """
    cand = [i for i, m in enumerate(masked) if m]
    if not cand:
        return []
    if policy in ("confidence", "margin"):
        score, cut = (conf, threshold) if policy == "confidence" else (margin, margin_cut)
        return sorted({max(cand, key=lambda i: score[i])} | {i for i in cand if score[i] >= cut})
    if policy == "entropy":
        commit, total = [], 0.0
        for i in sorted(cand, key=lambda i: (ent[i], i)):
            total += ent[i]
            if commit and total > entropy_bound:
                break
            commit.append(i)
        return sorted(commit)
    if policy == "leftmost":
        commit = [cand[0]]
        while commit[-1] + 1 < len(masked) and masked[commit[-1] + 1] and conf[commit[-1] + 1] >= threshold:
            commit.append(commit[-1] + 1)
        return commit
    raise ValueError(f"unknown policy {policy!r}")


def commit_gap(policy, masked, conf, margin, ent, commit, threshold, margin_cut=None, entropy_bound=None) -> float:
    """How close one denoise pass came to another decision: the smallest distance between two scores (or a
    score and its knob) whose order decides which positions commit or which token each takes.

    A float32 decoder can take another path than this float64 reference only where the gap is within its
    rounding (:func:`tie_for`); tests that compare the two redraw such cases.  ``threshold=None``: the fixed
    schedule.
    """
    cand = [i for i, m in enumerate(masked) if m]
    gaps = [margin[i] for i in commit]  # the token each committed position takes: its argmax over the runner-up
    if threshold is None or policy == "entropy":
        score = conf if threshold is None else -np.asarray(ent)
        order = sorted(cand, key=lambda i: -score[i])
        k = len(commit)
        gaps += [score[order[k - 1]] - score[order[k]]] if k < len(order) else []  # the last in, the first out
    if policy == "entropy" and threshold is not None:
        sums = np.cumsum(np.sort([ent[i] for i in cand]))
        gaps += [abs(s - entropy_bound) for s in sums[1:]]
    elif policy in ("confidence", "margin", "leftmost") and threshold is not None:
        score, cut = (margin, margin_cut) if policy == "margin" else (conf, threshold)
        gaps += [abs(score[i] - cut) for i in cand]
        best = sorted((score[i] for i in cand), reverse=True)
        if policy != "leftmost" and len(best) > 1 and best[0] < cut:  # a forced commit: the best of the rest
            gaps.append(best[0] - best[1])
    return float(min(gaps, default=np.inf))


def finished(out, max_new, eos):
    return any(t in eos for t in out[:max_new]) or len(out) >= max_new


def final(out, max_new, eos):
    out = list(out[:max_new])
    for i, t in enumerate(out):
        if t in eos:
            return out[:i + 1]
    return out


def ref_ar(R: Reference, prompt, max_new, eos):
    seq, out, nfe = list(prompt), [], 0
    while True:
        tok, _ = R.pick(R.causal(seq)[-1])
        nfe += 1
        out.append(int(tok))
        seq.append(int(tok))
        if finished(out, max_new, eos):
            return final(out, max_new, eos), nfe


def diffusion_block(R: Reference, ctx, seed, block, threshold, eos=(), steps=None, policy="confidence",
                    margin=None, entropy_bound=None, on_pass=None):
    """Denoise one block ``[seed, MASK * (block-1)]`` after ``ctx``: ``(block tokens, denoise passes)``.

    ``policy`` picks the commit rule of a pass (``threshold=None``: the fixed schedule of ``steps``
    steps, by confidence); ``on_pass(blk, masked, x0, conf, commit, gap)`` sees every pass after its commits
    (``gap``: :func:`commit_gap` of the pass).
    """
    blk = [seed] + [R.mask] * (block - 1)
    masked = [False] + [True] * (block - 1)
    step = 0
    while any(masked):
        x0, conf, marg, ent = R.scores(R.denoise(ctx, blk))
        if threshold is None:
            cand = [i for i in range(block) if masked[i]]
            base, rem = divmod(block - 1, steps)
            commit = sorted(cand, key=lambda i: -conf[i])[:base + (step < rem)]
        else:
            commit = commit_rule(policy, masked, conf, marg, ent, threshold, margin, entropy_bound)
        if on_pass is not None:
            gap = commit_gap(policy, masked, conf, marg, ent, commit, threshold, margin, entropy_bound)
        for i in commit:
            blk[i], masked[i] = int(x0[i]), False
        step += 1
        if on_pass is not None:
            on_pass(blk, masked, x0, conf, sorted(commit), gap)
        first_mask = masked.index(True) if any(masked) else block
        if any(blk[i] in eos for i in range(first_mask)):
            break
    return blk, step


def ref_diffusion(R: Reference, prompt, max_new, eos, block, threshold, steps=None, **policy):
    """Block diffusion of one prompt: ``(output, nfe)``; ``policy``: ``diffusion_block``'s policy arguments."""
    ctx, nfe = list(prompt), 0
    seed = int(R.pick(R.causal(ctx)[-1])[0])
    out = [seed]
    while not finished(out, max_new, eos):
        blk, passes = diffusion_block(R, ctx, seed, block, threshold, eos, steps, **policy)
        nfe += passes
        seed = int(R.pick(R.causal(ctx + blk)[-1])[0])  # commit pass
        nfe += 1
        ctx += blk
        out += blk[1:] + [seed]
    return final(out, max_new, eos), nfe


#: how far a float32 decoder's probabilities may part from the float64 reference's, per unit of head scale:
#: measured on tiny models (heads 8..150), the order of two masked positions' confidences shifted by at most
#: 3e-8..5e-8 x the head scale (docs/decoding.md section 12)
TIE_PER_HEAD = 5e-8


def tie_for(head_scale: float) -> float:
    """The smallest commit gap a float32 decoder resolves like the reference, for a :func:`tiny_model` head."""
    return TIE_PER_HEAD * head_scale


def diffusion_gap(R: Reference, prompt, max_new, block, threshold, steps=None, **policy) -> float:
    """The smallest :func:`commit_gap` over the reference's block diffusion of ``prompt`` (no EOS: a run with
    an EOS takes a prefix of these passes)."""
    gaps = [np.inf]
    ref_diffusion(R, prompt, max_new, (), block, threshold, steps, on_pass=lambda *a: gaps.append(a[-1]),
                  **policy)
    return min(gaps)


def separated_case(models, rng, batch: int, gap_fn, tie: float, draws: int = 10, **kw):
    """``(model, prompts)``: the first of ``models`` (an iterable, drawn lazily) for which ``batch`` of at most
    ``draws * batch`` :func:`random_prompts` keep ``gap_fn(Reference(model), prompt)`` above ``tie``.

    Prompts whose reference passes are decided by a float32 coin flip are replaced; a model whose masked
    positions tie on most prompts is replaced by the next.
    """
    for model in models:
        R, prompts = Reference(model), []
        for _ in range(draws * batch):
            (prompt,) = random_prompts(rng, 1, **kw)
            if gap_fn(R, prompt) > tie:
                prompts.append(prompt)
            if len(prompts) == batch:
                return model, prompts
    raise AssertionError(f"no model keeps the commit gaps of {batch} prompts above {tie}")


def ref_linear(R: Reference, prompt, max_new, eos, block, lora=None):
    ctx, nfe = list(prompt), 1
    seed = int(R.pick(R.causal(ctx)[-1])[0])
    out = [seed]
    while not finished(out, max_new, eos):
        draft = [int(t) for t in R.pick(R.denoise(ctx, [seed] + [R.mask] * (block - 1), lora=lora)[1:])[0]]
        nfe += 1
        blk = [seed] + draft
        ar = [int(t) for t in R.pick(R.causal(ctx + blk)[len(ctx):])[0]]
        nfe += 1
        a = 0
        while a < block - 1 and ar[a] == draft[a]:
            a += 1
        out += draft[:a] + [ar[a]]
        ctx += blk[:a + 1]
        seed = ar[a]
    return final(out, max_new, eos), nfe


def ref_quadratic(R: Reference, prompt, max_new, eos, block):
    ctx, nfe = list(prompt), 1
    seed = int(R.pick(R.causal(ctx)[-1])[0])
    out, draft = [seed], [R.mask] * (block - 1)
    while not finished(out, max_new, eos):
        c = len(ctx)
        toks, pos, blk, stream = list(ctx), list(range(c)), [0] * c, [CLEAN] * c
        for j, d in enumerate([seed] + draft):          # d_j: clean, position c+j, block j+1
            toks.append(d), pos.append(c + j), blk.append(j + 1), stream.append(CLEAN)
        for j in range(block):                          # group j: B masks at c+j+1.., noisy block j+2
            for i in range(block):
                toks.append(R.mask), pos.append(c + j + 1 + i), blk.append(j + 2), stream.append(NOISY)
        logits = R.run(toks, pos, blk, stream)
        nfe += 1
        ar = [int(t) for t in R.pick(logits[c:c + block])[0]]
        a = 0
        while a < block - 1 and ar[a] == draft[a]:
            a += 1
        group = logits[c + block + a * block: c + block + (a + 1) * block]
        new_draft = [int(t) for t in R.pick(group[1:])[0]]
        out += draft[:a] + [ar[a]]
        ctx += ([seed] + draft)[:a + 1]
        seed, draft = ar[a], new_draft
    return final(out, max_new, eos), nfe
