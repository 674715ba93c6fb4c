"""Diffusion commit policies (``generate(policy=...)``): every policy's commit rule equal to the plain rule of
jaxdlm.testing on synthetic scores, every policy token- and nfe-exact against the plain reference
decoder on ragged batches (with an early EOS), the policy and its knobs traced (no recompiles), and bad
policy arguments rejected.  The default ``policy="confidence"`` is what test_generation.py's diffusion cases
check; here it is checked through the same policy switch.
"""

import re

import jax
import numpy as np
import pytest

import jaxdlm
from jaxdlm.generation.diffusion import POLICIES, commit_mask
from jaxdlm.generation.knobs import Knobs
from jaxdlm.testing import (TINY_MASK as MASK, Reference, commit_gap, commit_rule, count_compilations,
                            eos_from_output, random_prompts, ref_diffusion, scores, tie_for, tiny_model)

MAX_NEW = 24

KNOB = {"confidence": "threshold", "margin": "margin", "entropy": "entropy_bound", "leftmost": "threshold"}
SAFE = 1e-4  # every score keeps this distance from a knob: float32 and float64 agree on each comparison


def _far_knob(rng, values, lo, hi):
    """A knob in ``[lo, hi]`` at least ``SAFE`` away from every value (redrawn until it is)."""
    while True:
        k = rng.uniform(lo, hi)
        if np.all(np.abs(np.asarray(values) - k) > SAFE):
            return float(k)


def test_commit_rules_match_the_plain_rules(rng):
    """``commit_mask`` (one jit, policy and knobs traced) against ``jaxdlm.testing.commit_rule`` on synthetic
    logits whose per-position sharpness varies, so the scores spread over their whole range and a pass
    commits some, all or only the forced position; masks are arbitrary (not only suffixes), and the first
    trial has a row with none."""
    r, b, v = 4, 16, 48
    fn = jax.jit(commit_mask, static_argnames="mask_id")
    partial = {p: 0 for p in POLICIES}
    forced = {p: 0 for p in POLICIES}
    for trial in range(12):
        sharpness = rng.uniform(0.2, 12.0, size=(r, b, 1))
        sharpness[1] = rng.uniform(0.01, 0.1, size=(b, 1))  # a flat row: nothing meets a knob, one is forced
        logits = (rng.normal(size=(r, b, v)) * sharpness).astype(np.float32)
        masked = rng.random((r, b)) < rng.uniform(0.3, 1.0)
        masked[0] = False if trial == 0 else masked[0]
        ref = [scores(logits[i], MASK) for i in range(r)]
        x0 = np.stack([t for t, _, _, _ in ref]).astype(np.int32)
        conf, marg = np.stack([c for _, c, _, _ in ref]), np.stack([m for _, _, m, _ in ref])
        ent = np.stack([e for _, _, _, e in ref])
        sums = [np.cumsum(np.sort(ent[i][masked[i]])) for i in range(r)]
        cuts = dict(threshold=_far_knob(rng, conf, 0.05, 0.95), margin=_far_knob(rng, marg, 0.0, 0.9),
                    entropy_bound=_far_knob(rng, np.concatenate(sums + [[0.0]]), 0.0, 6.0))
        knobs = Knobs.make(**cuts)
        for p, policy in enumerate(POLICIES):
            got = np.asarray(fn(np.int32(p), logits, x0, masked, knobs, mask_id=MASK))
            for i in range(r):
                want = commit_rule(policy, masked[i], conf[i], marg[i], ent[i], cuts["threshold"], cuts["margin"],
                                   cuts["entropy_bound"])
                assert np.flatnonzero(got[i]).tolist() == want, f"{policy} {cuts} row {i}"
                partial[policy] += 1 < len(want) < masked[i].sum()
                forced[policy] += len(want) == 1 < masked[i].sum()
    assert min(partial.values()) > 0 and min(forced.values()) > 0, (partial, forced)


def test_commit_gap_bounds_what_float_noise_can_change(rng):
    """``commit_gap`` (how the reference tests keep float32 near-ties out): moving every score by just under
    half the gap (entropies: that over their count, as sums decide) never changes a pass's commits, for each
    policy and the fixed schedule; and the gap is not vacuous (positive, and moves of a few gaps do change
    decisions).  Knobs reach past every score, so forced commits are common."""
    changed, gaps = 0, []
    for trial in range(100):
        n = 8
        masked = rng.random(n) < 0.8
        masked[rng.integers(n)] = True
        conf, marg, ent = rng.uniform(0.2, 1.0, n), rng.uniform(0.0, 0.8, n), rng.uniform(0.0, 1.5, n)
        cut = dict(threshold=rng.uniform(0.3, 1.1), margin_cut=rng.uniform(0.1, 0.9), entropy_bound=rng.uniform(0, 4))
        for policy in POLICIES + ("fixed",):
            thr = None if policy == "fixed" else cut["threshold"]

            def rule(c, m, e):
                if thr is None:  # the reference's fixed schedule: the 2 most confident masked positions
                    return sorted(sorted(np.flatnonzero(masked), key=lambda i: -c[i])[:2])
                return commit_rule(policy, masked, c, m, e, thr, cut["margin_cut"], cut["entropy_bound"])

            commit = rule(conf, marg, ent)
            gap = commit_gap(policy, masked, conf, marg, ent, commit, thr, cut["margin_cut"], cut["entropy_bound"])
            gaps.append(gap)
            for scale, must_hold in ((0.49 / (n if policy == "entropy" else 1), True), (4.0, False)):
                step = min(gap, 1.0) * scale
                for _ in range(4):  # each score moved by +-step: the largest move of a pair's difference
                    moved = [x + step * rng.choice([-1.0, 1.0], n) for x in (conf, marg, ent)]
                    same = rule(*moved) == commit
                    assert same or not must_hold, (policy, trial, gap)
                    changed += not same
    assert np.median(gaps) > 1e-3 and changed > 0, (np.median(gaps), changed)

def calibrated_model(seed, prompt, block, top=0.75):
    """``(model, head scale)``: ``tiny_model(seed)`` with its head scaled so that the first denoise pass after
    ``prompt`` has a best masked confidence near ``top``: far from saturation (where float32 and float64
    probabilities round to different sides of 1) whatever the seed.  Logits are linear in the head scale, so
    one pass decides it."""
    R = Reference(tiny_model(seed, head_scale=1.0))
    seed_tok = int(R.pick(R.causal(list(prompt))[-1])[0])  # argmax: the same at every head scale
    logits = R.denoise(list(prompt), [seed_tok] + [MASK] * (block - 1))[1:]
    scales = np.geomspace(2.0, 400.0, 60)
    best = [scores(s * logits, MASK)[1].max() for s in scales]
    scale = float(scales[int(np.argmin(np.abs(np.asarray(best) - top)))])
    return tiny_model(seed, head_scale=scale), scale


def reference_runs(model, prompts, block, eos, policy, knob):
    """The plain reference decoder on every prompt: ``(outputs, nfes, passes)``, ``passes`` over all rows as
    ``(committed positions, positions masked before the pass, commit gap)``."""
    R = Reference(model)
    passes, outs, nfes = [], [], []

    def record(blk, masked, x0, conf, commit, gap):
        passes.append((commit, sorted(commit + [i for i, m in enumerate(masked) if m]), gap))

    own = {KNOB[policy]: knob} if KNOB[policy] != "threshold" else {}
    for p in prompts:
        out, nfe = ref_diffusion(R, p, MAX_NEW, tuple(eos), block, knob if not own else 0.9, policy=policy,
                                 on_pass=record, **own)
        outs.append(out), nfes.append(nfe)
    return outs, nfes, passes


def check_policy(model, prompts, block, eos, policy, knob, refs=None):
    """Every row of one batched call equals the reference decoder (output and nfe; ``refs``: its
    :func:`reference_runs`, when already run); returns the result."""
    res = jaxdlm.generate(model, prompts, mode="diffusion", max_new_tokens=MAX_NEW, block_length=block,
                          eos_token_id=eos, policy=policy, **{KNOB[policy]: knob})
    outs, nfes, _ = refs or reference_runs(model, prompts, block, eos, policy, knob)
    for i, (out, nfe) in enumerate(zip(outs, nfes)):
        got = res.tokens[i, :res.lengths[i]].tolist()
        assert got == out, f"{policy}={knob} row {i}: {got} != reference {out}"
        assert res.nfe[i] == nfe, f"{policy}={knob} row {i}: nfe {res.nfe[i]} != reference {nfe}"
        assert MASK not in res.tokens[i]
    return res


def first_pass_knob(model, prompt, block, policy, level):
    """``"all"``: a knob every masked position of the first pass meets (it commits B-1); ``"forced"``: one
    none meets (only the progress guarantee commits); ``"some"`` (entropy): a bound that admits 2..B-2."""
    R = Reference(model)
    seed_tok = int(R.pick(R.causal(list(prompt))[-1])[0])
    _, conf, marg, ent = R.scores(R.denoise(list(prompt), [seed_tok] + [MASK] * (block - 1)))
    conf, marg, ent = conf[1:], marg[1:], ent[1:]
    if policy == "entropy":
        sums = np.cumsum(np.sort(ent))  # a bound in [sums[k-1], sums[k]) commits k positions
        return {"forced": ent.min() / 2, "all": sums[-1] + 1.0, "some": (sums[1] + sums[2]) / 2}[level]
    score = marg if policy == "margin" else conf
    return {"forced": (score.max() + 1.0) / 2, "all": score.min() / 2}[level]


CASES = [("confidence", "forced", 8), ("margin", "all", 8), ("margin", "forced", 4), ("entropy", "some", 8),
         ("entropy", "forced", 4), ("leftmost", "all", 8), ("leftmost", "forced", 8)]


def policy_case(seed, rng, policy, level, block, draws=10):
    """Prompts, a calibrated model, a knob and their :func:`reference_runs`, whose passes all keep a commit
    gap above ``tie_for(head scale)``.

    Masked positions of a tiny model often score within 1e-6 of each other (the MASK embedding dominates
    their hidden states), and a float32 decoder may then order them differently from the float64 reference
    (a forced commit at another position, the same tokens, another nfe): such draws are replaced, with
    another model seed every second draw.
    """
    for k in range(draws):
        prompts = random_prompts(rng, 3)
        model, scale = calibrated_model(seed + k // 2, prompts[0], block)
        knob = first_pass_knob(model, prompts[0], block, policy, level)
        refs = reference_runs(model, prompts, block, [], policy, knob)
        if min(gap for _, _, gap in refs[2]) > tie_for(scale):
            return prompts, model, knob, refs
    pytest.fail(f"no draw in {draws} keeps its commit gaps above tie_for(head scale)")


@pytest.mark.parametrize("policy,level,block", CASES)
def test_policy_matches_reference(policy, level, block, seed, rng):
    prompts, model, knob, refs = policy_case(seed, rng, policy, level, block)
    first, passes = check_policy(model, prompts, block, [], policy, knob, refs), refs[2]
    assert np.all(first.lengths == MAX_NEW)
    n_first = len(passes[0][0])  # the path the knob was chosen for is taken in row 0's first pass
    assert n_first == {"forced": 1, "all": block - 1, "some": 2}[level], (level, n_first)
    assert all(commit for commit, _, _ in passes)  # progress: every pass commits
    if policy == "leftmost":  # a contiguous run from the leftmost masked position
        assert all(c == list(range(before[0], before[0] + len(c))) for c, before, _ in passes)
    eos = eos_from_output(first, rng)  # an EOS the rows hit mid-output: the early stop, per row
    second = check_policy(model, prompts, block, eos, policy, knob)  # its passes: a prefix of each row's above
    assert second.lengths[0] < MAX_NEW and second.tokens[0, second.lengths[0] - 1] == eos[0]


def test_policy_and_knobs_are_traced(seed, rng):
    """Switching policy or knob reuses the compiled program, and the new values take effect: knobs that admit
    every mask give one denoise pass per block, a knob that admits none gives B-1 (one forced commit each)."""
    model = tiny_model(seed)
    prompts = random_prompts(rng, 3)
    b = 4
    kw = dict(mode="diffusion", max_new_tokens=MAX_NEW, block_length=b, eos_token_id=[])
    jaxdlm.generate(model, prompts, threshold=0.5, **kw)
    blocks = -(-(MAX_NEW - 1) // b)
    # (entropy 0 admits nothing but the forced commit: a float32 entropy is 0 only for a logit gap > 87)
    with count_compilations() as n:
        for policy, knobs, passes in (("confidence", dict(threshold=0.0), 1), ("margin", dict(margin=0.0), 1),
                                      ("entropy", dict(entropy_bound=1e9), 1),
                                      ("entropy", dict(entropy_bound=0.0), b - 1), ("leftmost", dict(threshold=0.0), 1)):
            res = jaxdlm.generate(model, prompts, policy=policy, **kw, **knobs)
            np.testing.assert_array_equal(res.nfe, (passes + 1) * blocks, err_msg=f"{policy} {knobs}")
    assert n.value == 0


@pytest.mark.parametrize("kwargs,match", [
    (dict(policy="greedy"), "policy='greedy'"),
    (dict(policy="margin", margin=1.5), "margin=1.5"),
    (dict(policy="margin", margin=-0.1), "margin=-0.1"),
    (dict(policy="entropy", entropy_bound=-1.0), "entropy_bound=-1.0"),
    (dict(policy="entropy", entropy_bound=float("nan")), "entropy_bound=nan"),
    (dict(policy="margin", mode="ar"), "mode='ar'"),
    (dict(policy="entropy", mode="linear_spec"), "mode='linear_spec'"),
    (dict(policy="leftmost", mode="quadratic_spec", block_length=4), "mode='quadratic_spec'"),
    (dict(margin=0.5), "margin=0.5"),                                  # the knob of another policy
    (dict(policy="margin", entropy_bound=0.5), "entropy_bound=0.5"),
    (dict(policy="leftmost", threshold=None), "threshold=None"),       # the fixed schedule is confidence's
    (dict(policy="entropy", steps_per_block=2), "steps_per_block=2"),
])
def test_bad_policy_arguments_raise(kwargs, match):
    kwargs = dict(kwargs)
    kwargs.setdefault("mode", "diffusion")
    with pytest.raises(ValueError, match=re.escape(match)):
        jaxdlm.generate(tiny_model(0), [[5, 6, 7]], max_new_tokens=8, **kwargs)
