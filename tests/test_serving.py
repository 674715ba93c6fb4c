"""The slot engine (``jaxdlm.serving.Engine``): continuous batching that gives every request exactly what
``jaxdlm.generate`` gives that prompt alone (tokens and nfe, T = 0 and seeded T > 0), whatever runs beside it and
whenever it joined, with each token's causal log-probability; per-row knobs in the sampling code; slots freed and
reused; ``generate_many`` order."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdlm
from jaxdlm.generation import sampling
from jaxdlm.generation.knobs import Knobs
from jaxdlm.generation.options import DecodeOptions
from jaxdlm.serving import Engine
from jaxdlm.testing import count_compilations, tiny_model

BLOCK = 4
CAPS = (6, 11)


def _alone(model, mode, prompt, opts, cap):
    ref = jaxdlm.generate(model, [prompt], mode=mode, max_new_tokens=cap, block_length=BLOCK, options=opts)
    return ref.sequences()[0], int(ref.nfe[0])


def _causal_logprobs(model, prompt, tokens):
    """Each output token's log-probability under one uncached causal forward over prompt + output (padded to 64:
    causal logits do not see the padding)."""
    seq = np.zeros((1, 64), np.int32)
    seq[0, :len(prompt) + len(tokens)] = np.concatenate([prompt, tokens])
    logp = jax.nn.log_softmax(model.logits(seq)[0], axis=-1)
    at = np.arange(len(tokens)) + len(prompt) - 1
    return np.asarray(logp[at, tokens])


def _requests(rng, vocab, mode):
    """Mixed prompt lengths, caps and knobs: greedy rows (cap 6) at several thresholds, EOS ids, a thinking budget
    and (diffusion) every policy,
    seeded sampled rows (cap 11) at other temperatures, top-k and top-p values (one static choice: generate alone
    compiles two programs)."""
    greedy = [dict(threshold=0.6), dict(threshold=0.95, eos_token_id=(5, 9, 17)),
              dict(threshold=0.3, max_thinking_tokens=2, end_think_token_id=7)]
    if mode == "diffusion":
        greedy += [dict(policy="margin", margin=0.5), dict(policy="entropy", entropy_bound=0.8),
                   dict(policy="leftmost", threshold=0.5)]
    sampled = [dict(temperature=t, top_k=k, top_p=p, seed=int(rng.integers(1 << 30)))
               for t, k, p in ((0.8, 30, 0.99), (0.6, 5, 0.9), (1.2, 50, 0.7))]
    kinds = [k for pair in zip(greedy, sampled) for k in pair] + greedy[len(sampled):]
    caps = [CAPS[1] if "temperature" in k else CAPS[0] for k in kinds]
    prompts = [rng.integers(4, vocab, size=int(n)) for n in rng.integers(2, 40, size=len(kinds))]
    return prompts, [DecodeOptions(**k) for k in kinds], caps


@pytest.mark.parametrize("mode", ["ar", "diffusion", "linear_spec", "quadratic_spec"])
def test_each_request_equals_generate_alone(mode, seed, rng):
    """More requests than slots: they join as slots free up, beside rows at other caps, knobs and temperatures."""
    model = tiny_model(seed, head_scale=8.0, lora_rank=4)
    prompts, opts, caps = _requests(rng, model.config.vocab_size, mode)
    engine = Engine(model, mode=mode, slots=3, max_len=128, max_new=max(CAPS), block_length=BLOCK, logprobs=True)
    results = engine.generate_many(prompts, opts, caps)
    assert engine.free == [2, 1, 0] and not engine.alive.any()  # every slot freed
    alone = []
    for i, (p, o, cap, r) in enumerate(zip(prompts, opts, caps, results)):
        tokens, nfe = _alone(model, mode, p, o, cap)
        alone.append(tokens)
        np.testing.assert_array_equal(r.tokens, tokens, err_msg=f"request {i} {o}")
        assert r.nfe == nfe, (i, o)
        np.testing.assert_allclose(r.logprobs, _causal_logprobs(model, p, tokens), atol=2e-4, err_msg=f"request {i}")
        ended = len(tokens) > 0 and int(tokens[-1]) in o.eos_ids(model.config)
        assert r.finish_reason == ("stop" if ended else "length")
    if mode == "diffusion":
        _check_streams_within_a_block(model, prompts, opts, caps, alone)


def _check_streams_within_a_block(model, prompts, opts, caps, alone):
    """Diffusion steps one pass at a time: a slot's stream (without log-probabilities) returns the tokens a denoise
    pass commits before the block's commit pass, and the chunks join to ``generate`` alone."""
    engine = Engine(model, mode="diffusion", slots=2, max_len=128, max_new=max(CAPS), block_length=BLOCK)
    got, ends, owner, nxt = {}, {}, {}, 0
    while nxt < len(prompts) or owner:
        while nxt < len(prompts) and engine.free:
            owner[engine.insert(prompts[nxt], opts[nxt], caps[nxt])], got[nxt], ends[nxt] = nxt, [], []
            nxt += 1
        out = engine.step()
        for slot, i in list(owner.items()):
            got[i] += out.tokens[slot, :out.counts[slot]].tolist()
            ends[i] += [len(got[i])] if out.counts[slot] else []
            if out.done[slot]:
                del owner[slot]
    for i, tokens in enumerate(alone):
        np.testing.assert_array_equal(got[i], tokens, err_msg=f"request {i} {opts[i]}")
    # a commit pass ends the output at 1 + k * BLOCK tokens (the prefill's token, then whole blocks): a chunk ending
    # elsewhere before the last came from a denoise pass
    assert any((e - 1) % BLOCK for i in ends for e in ends[i][:-1]), ends


@pytest.fixture(scope="module")
def ar_engine():
    model = tiny_model(5, head_scale=8.0)
    return Engine(model, mode="ar", slots=2, max_len=64, max_new=12)


def _run_alone(engine, prompt, opts, cap):
    return engine.generate_many([prompt], opts, cap)[0]


def test_insert_into_a_busy_batch_and_reuse_a_freed_slot(ar_engine, rng):
    engine, v = ar_engine, ar_engine.model.config.vocab_size
    a, b, c = (rng.integers(4, v, size=n) for n in (7, 3, 12))
    sampled = DecodeOptions(temperature=0.7, seed=4)
    want = [_run_alone(engine, p, o, m) for p, o, m in ((a, None, 12), (b, sampled, 3), (c, None, 5))]
    got = {0: [], 1: [], 2: []}
    slot_a = engine.insert(a, None, 12)
    for _ in range(4):                     # a runs alone for a while
        out = engine.step()
        got[0] += out.tokens[slot_a, :out.counts[slot_a]].tolist()
    slot_b = engine.insert(b, sampled, 3)  # b joins a busy batch
    owner = {slot_a: 0, slot_b: 1}
    done_b = False
    while owner:
        out = engine.step()
        for slot, i in list(owner.items()):
            got[i] += out.tokens[slot, :out.counts[slot]].tolist()
            if out.done[slot]:
                del owner[slot]
                if i == 1:
                    done_b = True
                    assert slot_b in engine.free  # freed at once
                    slot_c = engine.insert(c, None, 5)  # the freed slot, reused while a still runs
                    assert slot_c == slot_b
                    owner[slot_c] = 2
    assert done_b
    for i in range(3):
        np.testing.assert_array_equal(got[i], want[i].tokens, err_msg=f"request {i}")


def test_generate_many_keeps_input_order_and_knobs_never_recompile(ar_engine, rng):
    engine, v = ar_engine, ar_engine.model.config.vocab_size
    prompts = [rng.integers(4, v, size=n) for n in (5, 9, 2, 14, 6)]
    caps = [12, 2, 9, 1, 5]                # later prompts finish first
    opts = [DecodeOptions(temperature=t, seed=s) for t, s in ((0, 0), (0.5, 1), (0, 0), (1.0, 9), (0.3, 2))]
    for k in (1, 2):                       # compile everything once: batched inserts of 1 and 2 prompts
        engine.generate_many(prompts[:k], opts[0], 2)
    with count_compilations() as n:
        many = engine.generate_many(prompts, opts, caps)
    assert n.value == 0  # new temperatures, seeds, caps and neighbours: no new program
    for p, o, cap, r in zip(prompts, opts, caps, many):
        alone = _run_alone(engine, p, o, cap)
        np.testing.assert_array_equal(r.tokens, alone.tokens)
        assert len(r.tokens) <= cap and r.nfe == alone.nfe


def test_cancel_frees_the_slot_at_once(ar_engine, rng):
    engine = ar_engine
    slot = engine.insert(rng.integers(4, 50, size=4), None, 12)
    engine.step()
    engine.cancel(slot)
    assert slot in engine.free and not engine.alive[slot]
    out = engine.step()                    # the cancelled row is masked: nothing of it changes
    assert out.counts[slot] == 0 and out.done[slot]


def test_requests_are_checked_naming_the_field(ar_engine):
    engine = ar_engine
    bad = [(DecodeOptions(temperature=-1.0), 4, "temperature"), (DecodeOptions(top_p=0.0), 4, "top_p"),
           (DecodeOptions(policy="margin"), 4, "policy"), (DecodeOptions(), 0, "max_tokens"),
           (DecodeOptions(), 13, "max_tokens"), (DecodeOptions(spec_sampling="rejection"), 4, "spec_sampling"),
           (DecodeOptions(eos_token_id=(1, 2, 3, 4, 5)), 4, "eos_token_id")]
    for opts, cap, field in bad:
        with pytest.raises(ValueError, match=rf"^{field}"):
            engine.check(5, opts, cap)
    with pytest.raises(ValueError, match="max_tokens=12: the prompt"):
        engine.check(60, DecodeOptions(), 12)  # prompt + max_tokens over the cache
    engine.check(5, DecodeOptions(temperature=2.0, top_k=3), 12)


def test_per_row_knobs_match_scalar_knobs_and_temperature_zero_is_argmax(rng):
    """The sampling code with ``[B]`` knobs and per-row keys gives each row what scalar knobs and a one-row key
    give it; in a sampling program a row at temperature 0 is exactly the greedy argmax."""
    logits = jnp.asarray(rng.normal(size=(3, 5, 40)) * 3, jnp.float32)
    sampler = sampling.Sampler(greedy=False, use_top_k=True, use_top_p=True, mask_id=3)
    rows = [dict(temperature=0.0), dict(temperature=0.7, top_k=4), dict(temperature=1.3, top_p=0.6)]
    knobs = jax.tree.map(lambda *x: jnp.stack(x), *[Knobs.make(**r) for r in rows])
    keys = jnp.stack([jax.random.PRNGKey(i) for i in range(3)])
    got = sampling.choose(logits, keys, sampler, knobs)
    p = sampling.probs(logits, sampler, knobs)
    for i, r in enumerate(rows):
        one = sampling.choose(logits[i:i + 1], keys[i], sampler, Knobs.make(**r))
        np.testing.assert_array_equal(got[i], one[0])
        np.testing.assert_array_equal(p[i], sampling.probs(logits[i:i + 1], sampler, Knobs.make(**r))[0])
    greedy = sampling.choose(logits[:1], None, sampling.Sampler(greedy=True, mask_id=3), Knobs.make())
    np.testing.assert_array_equal(got[0], greedy[0])
    np.testing.assert_array_equal(p[0], jax.nn.one_hot(greedy[0], 40))
