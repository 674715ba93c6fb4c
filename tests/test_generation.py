"""Generation engine: every mode against the plain reference decoders of jaxdlm.testing (T=0, float32,
token for token, equal nfe), self-speculation equal to AR, batch parity, no recompiles, sampling,
thinking budget, streaming, and bad-input errors.

Compiled programs are shared across cases: the generation program's static key is the model shape and
the plan (mode, batch, bucketed prompt length, max_new_tokens, block length), so the cases below vary
prompts, thresholds and EOS ids inside a few plans.
"""

import jax
import numpy as np
import pytest
from flax import nnx

import jaxdlm
from jaxdlm.hf import model_from_pure_dict
from jaxdlm.testing import (TINY_MASK as MASK, Reference, count_compilations, diffusion_gap, eos_from_output,
                            random_prompts, ref_ar, ref_diffusion, ref_linear, ref_quadratic, separated_case,
                            tie_for, tiny_config, tiny_model)

MAX_NEW = 24
CFG = tiny_config()


def run_reference(mode, R, prompt, eos, block, threshold, lora=None):
    if mode == "ar":
        return ref_ar(R, prompt, MAX_NEW, eos)
    if mode == "diffusion":
        steps = block - 1 if threshold is None else None  # the reference's fixed schedule: one token per step
        return ref_diffusion(R, prompt, MAX_NEW, eos, block, threshold, steps)
    if mode == "linear_spec":
        return ref_linear(R, prompt, MAX_NEW, eos, block, lora=lora)
    return ref_quadratic(R, prompt, MAX_NEW, eos, block)


def check_against_reference(model, mode, prompts, block, threshold, eos, lora=None):
    res = jaxdlm.generate(model, prompts, mode=mode, max_new_tokens=MAX_NEW, block_length=block,
                          threshold=threshold, eos_token_id=eos)
    R = Reference(model)
    for i, p in enumerate(prompts):
        ref_out, ref_nfe = run_reference(mode, R, p, tuple(eos), block, threshold, lora=lora)
        got = res.tokens[i, :res.lengths[i]].tolist()
        assert got == ref_out, f"{mode} row {i}: {got} != reference {ref_out}"
        assert res.nfe[i] == ref_nfe, f"{mode} row {i}: nfe {res.nfe[i]} != reference {ref_nfe}"
        assert MASK not in got
        assert np.all(res.tokens[i, res.lengths[i]:] != MASK)
    return res


# (mode, block, threshold, batch): 4 modes x blocks 4..32 x thresholds 0.3..0.99 and None; each case
# runs twice (no EOS, then an EOS taken from the first output), comparing every row with the reference.
# (Not threshold 1.0: with these peaked heads float32 confidences saturate to exactly 1.0 in one
# implementation and to 1 - 6e-8 in the other, so "conf >= 1.0" is a coin flip between two correct
# implementations - seen with JAXDLM_TEST_SEED=75519486.)
CASES = [
    ("ar", 4, None, 3), ("ar", 32, None, 1),
    ("diffusion", 4, 0.3, 3), ("diffusion", 4, None, 3), ("diffusion", 8, 0.5, 3), ("diffusion", 8, 0.9, 3),
    ("diffusion", 8, None, 3), ("diffusion", 32, 0.7, 3), ("diffusion", 32, 0.99, 3), ("diffusion", 4, 0.95, 1),
    ("linear_spec", 4, None, 3), ("linear_spec", 8, None, 3), ("linear_spec", 32, None, 3),
    ("quadratic_spec", 4, None, 3), ("quadratic_spec", 8, None, 3), ("quadratic_spec", 16, None, 1),
]


# The fixed schedule (threshold None) ranks masked positions by confidence at every step: a head scaled by 60
# makes near-saturated probabilities (0.9999945 vs 0.9999946) that float32 cannot tell apart while the float64
# reference can, so its diffusion cases use a milder head (top-1 probabilities well inside (0, 1)).
FIXED_SCHEDULE_HEAD = 8.0


@pytest.mark.parametrize("mode,block,threshold,batch", CASES)
def test_matches_reference(mode, block, threshold, batch, seed, rng):
    head = FIXED_SCHEDULE_HEAD if mode == "diffusion" and threshold is None else 60.0
    if mode == "diffusion":  # no float32 coin flips in the reference's passes (docs/decoding.md §12)
        steps = block - 1 if threshold is None else None
        model, prompts = separated_case((tiny_model(seed + k, head_scale=head) for k in range(4)), rng, batch,
                                        lambda R, p: diffusion_gap(R, p, MAX_NEW, block, threshold, steps),
                                        tie_for(head))
    else:
        model, prompts = tiny_model(seed, head_scale=head), random_prompts(rng, batch)
    first = check_against_reference(model, mode, prompts, block, threshold, eos=[])
    assert np.all(first.lengths == MAX_NEW)
    eos = eos_from_output(first, rng)
    second = check_against_reference(model, mode, prompts, block, threshold, eos=eos)
    assert second.lengths[0] < MAX_NEW and second.tokens[0, second.lengths[0] - 1] == eos[0]
    if mode in ("linear_spec", "quadratic_spec"):
        for eos_ids, res in (([], first), (eos, second)):
            ar = jaxdlm.ar_generate(model, prompts, max_new_tokens=MAX_NEW, eos_token_id=eos_ids)
            np.testing.assert_array_equal(res.tokens, ar.tokens)
            np.testing.assert_array_equal(res.lengths, ar.lengths)


def test_fixed_schedule_default_is_one_token_per_step(seed, rng):
    """``threshold=None`` without ``steps_per_block`` is the reference's schedule: one masked token per
    denoise step, ``B-1`` denoise passes + one commit pass per block; ``steps_per_block`` picks another."""
    block = 8
    model, prompts = separated_case((tiny_model(seed + k, head_scale=FIXED_SCHEDULE_HEAD) for k in range(4)), rng,
                                    2, lambda R, p: min(diffusion_gap(R, p, MAX_NEW, block, None, steps)
                                                        for steps in (block - 1, 3)), tie_for(FIXED_SCHEDULE_HEAD))
    R = Reference(model)
    blocks = -(-(MAX_NEW - 1) // block)  # the prefill gives the first token, each block B more
    kw = dict(mode="diffusion", max_new_tokens=MAX_NEW, block_length=block, threshold=None, eos_token_id=[])
    default = jaxdlm.generate(model, prompts, **kw)
    fewer = jaxdlm.generate(model, prompts, steps_per_block=3, **kw)
    np.testing.assert_array_equal(default.nfe, blocks * block)
    np.testing.assert_array_equal(fewer.nfe, blocks * (3 + 1))
    for i, p in enumerate(prompts):
        for res, steps in ((default, block - 1), (fewer, 3)):
            out, nfe = ref_diffusion(R, p, MAX_NEW, (), block, None, steps)
            assert res.tokens[i].tolist() == out and res.nfe[i] == nfe, f"steps={steps} row {i}"


def test_linear_spec_with_draft_lora_matches_reference_and_ar(seed, rng):
    """The LoRA acts in draft passes only: output still equals AR, drafts follow the LoRA model."""
    model = tiny_model(seed, lora_rank=4)
    prompts = random_prompts(rng, 3)
    res = check_against_reference(model, "linear_spec", prompts, 8, None, eos=[], lora=model.lora)
    ar = jaxdlm.ar_generate(model, prompts, max_new_tokens=MAX_NEW, eos_token_id=[])
    np.testing.assert_array_equal(res.tokens, ar.tokens)
    no_lora = jaxdlm.linear_spec_generate(model, prompts, max_new_tokens=MAX_NEW, block_length=8,
                                          eos_token_id=[], use_lora=False)
    np.testing.assert_array_equal(no_lora.tokens, ar.tokens)
    # the draft LoRA changes the drafts, hence the acceptance pattern (nfe) on some row
    R = Reference(model)
    ref_plain = [ref_linear(R, p, MAX_NEW, (), 8, lora=None)[1] for p in prompts]
    np.testing.assert_array_equal(no_lora.nfe, ref_plain)


def biased_model(seed, strength=0.05):
    """``tiny_model`` plus a shared component in every embedding: hidden states then lean one way, so
    drafts and AR predictions agree often enough for multi-token acceptance (random models rarely do)."""
    m = tiny_model(seed)
    pure = nnx.to_pure_dict(m.params)
    u = np.random.default_rng(seed).normal(size=CFG.hidden_size)
    pure["embed"] = pure["embed"] + strength * u / np.linalg.norm(u)
    return model_from_pure_dict(CFG, pure)


def accepted_drafts(res, per_cycle_nfe):
    cycles = (res.nfe - 1) // per_cycle_nfe
    return int(np.sum(res.lengths - 1 - cycles))


def test_accepted_drafts_and_cache_crops_match_reference(seed):
    """On a model where drafts do get accepted (multi-token cycles, cache crops by more than one slot),
    both self-speculative modes still match the reference and AR token for token with equal nfe."""
    for s in range(10):
        model = biased_model(seed + s)
        prompts = random_prompts(np.random.default_rng(seed + s), 3)
        kw = dict(max_new_tokens=MAX_NEW, block_length=4, eos_token_id=[])
        quad, lin = jaxdlm.quadratic_spec_generate(model, prompts, **kw), jaxdlm.linear_spec_generate(model, prompts, **kw)
        if accepted_drafts(quad, 1) > 0 and accepted_drafts(lin, 2) > 0:
            break
    else:
        pytest.fail("no model with accepted drafts found: the acceptance paths are not exercised")
    ar = jaxdlm.ar_generate(model, prompts, max_new_tokens=MAX_NEW, eos_token_id=[])
    for mode in ("quadratic_spec", "linear_spec"):
        res = check_against_reference(model, mode, prompts, 4, None, eos=[])
        np.testing.assert_array_equal(res.tokens, ar.tokens)


@pytest.mark.parametrize("mode", ["ar", "diffusion", "linear_spec", "quadratic_spec"])
def test_batch_rows_equal_rows_alone(mode, seed, rng):
    model = tiny_model(seed)
    prompts = random_prompts(rng, 3, lo=1, hi=30)
    kw = dict(mode=mode, max_new_tokens=MAX_NEW, block_length=4, threshold=0.6, eos_token_id=[])
    first = jaxdlm.generate(model, prompts, **kw)
    eos = eos_from_output(first, rng)
    batch = jaxdlm.generate(model, prompts, **dict(kw, eos_token_id=eos))
    for i, p in enumerate(prompts):
        alone = jaxdlm.generate(model, [p], **dict(kw, eos_token_id=eos))
        np.testing.assert_array_equal(batch.tokens[i], alone.tokens[0])
        assert batch.lengths[i] == alone.lengths[0] and batch.nfe[i] == alone.nfe[0]
    assert batch.total_nfe >= batch.nfe.max()


def test_two_d_array_prompts_equal_list_prompts(seed, rng):
    model = tiny_model(seed)
    arr = rng.integers(4, 64, size=(3, 7))
    a = jaxdlm.generate(model, arr, mode="ar", max_new_tokens=MAX_NEW, eos_token_id=[])
    b = jaxdlm.generate(model, list(arr), mode="ar", max_new_tokens=MAX_NEW, eos_token_id=[])
    np.testing.assert_array_equal(a.tokens, b.tokens)


def test_same_bucket_does_not_recompile(seed, rng):
    model = tiny_model(seed)
    kw = dict(mode="linear_spec", max_new_tokens=MAX_NEW, block_length=4)
    jaxdlm.generate(model, random_prompts(rng, 3, 3, 10), eos_token_id=[], **kw)
    # other prompts (lengths 1..64: same bucket), other EOS ids, seed, model weights: no new compilation
    with count_compilations() as n:
        jaxdlm.generate(model, random_prompts(rng, 3, 1, 64), eos_token_id=[5, 6], seed=3, **kw)
        jaxdlm.generate(tiny_model(seed + 1), random_prompts(rng, 3, 20, 40), eos_token_id=[7], **kw)
    assert n.value == 0
    # thresholds are traced too
    kd = dict(mode="diffusion", max_new_tokens=MAX_NEW, block_length=4, eos_token_id=[])
    jaxdlm.generate(model, random_prompts(rng, 3), threshold=0.5, **kd)
    with count_compilations() as n:
        jaxdlm.generate(model, random_prompts(rng, 3), threshold=0.8, **kd)
    assert n.value == 0
    # a longer prompt lands in the next bucket: exactly one new program
    with count_compilations() as n:
        jaxdlm.generate(model, random_prompts(rng, 3, 65, 70), eos_token_id=[], **kw)
    assert n.value == 1


def test_diffusion_sampling_is_seeded_and_never_picks_mask(seed, rng):
    """T > 0 with top-k / top-p in diffusion mode (the self-speculative and AR modes are checked the same
    way, plus their distribution, in test_generation_sampling.py)."""
    model = tiny_model(seed, head_scale=5.0)
    prompts = random_prompts(rng, 3)
    kw = dict(mode="diffusion", max_new_tokens=MAX_NEW, block_length=4, temperature=1.5, top_k=40, top_p=0.95,
              eos_token_id=[])
    a = jaxdlm.generate(model, prompts, seed=1, **kw)
    b = jaxdlm.generate(model, prompts, seed=1, **kw)
    c = jaxdlm.generate(model, prompts, seed=2, **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)
    assert MASK not in a.tokens and MASK not in c.tokens


def test_thinking_budget_emits_what_the_model_is_conditioned_on(seed, rng):
    model = tiny_model(seed)
    prompt = random_prompts(rng, 1, 4, 8)
    end_think, budget = 9, 5
    for mode in ("ar", "linear_spec", "quadratic_spec", "diffusion"):
        res = jaxdlm.generate(model, prompt, mode=mode, max_new_tokens=MAX_NEW, block_length=4,
                              eos_token_id=[], max_thinking_tokens=budget, end_think_token_id=end_think)
        out = res.tokens[0].tolist()
        assert end_think in out
        k = out.index(end_think)
        assert budget <= k < budget + 4 or k < budget  # forced at the first seed at/after the budget
        if mode != "diffusion":
            # the continuation is what AR gives when conditioned on exactly the emitted text
            cont = jaxdlm.ar_generate(model, [np.concatenate([prompt[0], out[:k + 1]])],
                                      max_new_tokens=MAX_NEW, eos_token_id=[])
            assert cont.tokens[0, :MAX_NEW - k - 1].tolist() == out[k + 1:]


def test_stream_callback_receives_the_output(seed, rng):
    model = tiny_model(seed)
    prompts = random_prompts(rng, 3)
    for mode in ("quadratic_spec",):
        got = [[], [], []]

        def cb(tokens, counts):
            for i, n in enumerate(np.asarray(counts)):
                got[i].extend(np.asarray(tokens)[i, :n].tolist())

        first = jaxdlm.generate(model, prompts, mode=mode, max_new_tokens=MAX_NEW, block_length=4, eos_token_id=[])
        eos = eos_from_output(first, rng)
        res = jaxdlm.generate(model, prompts, mode=mode, max_new_tokens=MAX_NEW, block_length=4,
                              eos_token_id=eos, stream_callback=cb)
        jax.effects_barrier()
        assert got == [s.tolist() for s in res.sequences()]


def test_auto_mode_rule(seed, rng):
    model = tiny_model(seed)
    p = random_prompts(rng, 1)
    from jaxdlm.generation import auto_mode

    assert auto_mode(model, 1, 8, 8) == "ar"            # too short for drafting
    assert auto_mode(model, 1, 24, 8) == "linear_spec"
    assert auto_mode(model, 16, 24, 8) == "ar"          # large batch
    res = jaxdlm.generate(model, random_prompts(rng, 3), mode="auto", max_new_tokens=MAX_NEW, block_length=4,
                          eos_token_id=[])
    assert res.mode == "linear_spec"
    same = jaxdlm.linear_spec_generate(model, p, max_new_tokens=MAX_NEW, block_length=4, eos_token_id=[])
    np.testing.assert_array_equal(
        jaxdlm.generate(model, p, mode="auto", max_new_tokens=MAX_NEW, block_length=4, eos_token_id=[]).tokens,
        same.tokens)


@pytest.mark.parametrize("kwargs,match", [
    (dict(mode="beam"), "mode='beam'"),
    (dict(max_new_tokens=0), "max_new_tokens=0"),
    (dict(max_new_tokens=-3), "max_new_tokens=-3"),
    (dict(threshold=1.5), "threshold=1.5"),
    (dict(threshold=-0.1), "threshold=-0.1"),
    (dict(block_length=0), "block_length=0"),
    (dict(mode="diffusion", block_length=40, cache_length=32), "block_length=40"),
    (dict(max_new_tokens=100, cache_length=64), "cache_length=64"),
    (dict(max_new_tokens=5000), "max_position_embeddings=4096"),
    (dict(temperature=-1.0), "temperature=-1.0"),
    (dict(temperature=1.0, top_p=0.0), "top_p=0.0"),
    (dict(temperature=1.0, top_p=1.5), "top_p=1.5"),
    (dict(top_k=0), "top_k=0"),
    (dict(prompts=[[5, 6], []]), "row 1 is empty"),
    (dict(prompts=[[5, 64]]), "id 64"),
    (dict(prompts=[]), "prompts is empty"),
    (dict(prompts=["def fib(n):"]), "row 0 is a string ('def fib(n):'); prompts are token ids: tokenize the text "
                                    "first, e.g. model.tokenizer(text)['input_ids']"),
    (dict(prompts="def fib(n):"), "prompts is a string ('def fib(n):'); prompts are token ids"),
    (dict(prompts=[5, 6]), "row 0 is a single value (5), not a token sequence"),
    (dict(mode="quadratic_spec", block_length=1), "block_length=1"),
    (dict(mode="quadratic_spec", block_length=65), "block_length=65"),
    (dict(mode="linear_spec", block_length=1), "block_length=1"),
    (dict(spec_sampling="fuzzy"), "spec_sampling='fuzzy'"),
    (dict(max_thinking_tokens=4), "end_think_token_id=None"),
    (dict(mode="diffusion", threshold=None, steps_per_block=9, block_length=8), "steps_per_block=9"),
])
def test_bad_arguments_raise(kwargs, match):
    model = tiny_model(0)
    kwargs = dict(kwargs)
    prompts = kwargs.pop("prompts", [[5, 6, 7]])
    kwargs.setdefault("mode", "ar")
    kwargs.setdefault("max_new_tokens", 8)
    with pytest.raises(ValueError, match=__import__("re").escape(match)):
        jaxdlm.generate(model, prompts, **kwargs)


def test_non_diffusion_model_rejects_diffusion_modes():
    model = tiny_model(0, config=tiny_config(mask_token_id=None))
    from jaxdlm.generation import auto_mode

    with pytest.raises(ValueError, match="mask_token_id"):
        jaxdlm.generate(model, [[5, 6]], mode="diffusion", max_new_tokens=4)
    assert auto_mode(model, 1, 400, 32) == "ar"
