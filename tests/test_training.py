"""Training library: noise schedules, the joint loss against numpy, the optax step, data packing / SFT."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdlm.model import Model
from jaxdlm.training import data, losses, masking
from jaxdlm.training import step as step_lib
from training_utils import MASK_ID, tiny_config


# ------------------------------------------------------------------------------------------ masking


def test_uniform_mask_rate_and_weights(seed, rng):
    b, l = 512, 128
    tokens = rng.integers(4, 40, size=(b, l)).astype(np.int32)
    maskable = rng.random((b, l)) < 0.8
    x_t, masked, w = (np.asarray(a) for a in masking.uniform_mask(jax.random.PRNGKey(seed), tokens, MASK_ID,
                                                                     maskable=maskable))
    assert not masked[~maskable].any()
    np.testing.assert_array_equal(x_t, np.where(masked, MASK_ID, tokens))
    assert (w[~masked] == 0).all()
    rows = masked.any(1)
    # one p per sequence: every masked position of a row carries the same weight 1/p, p in [1e-3, 1]
    p = np.array([1.0 / w[i][masked[i]][0] for i in np.flatnonzero(rows)])
    for i in np.flatnonzero(rows)[:50]:
        assert np.allclose(w[i][masked[i]], w[i][masked[i]][0])
    assert (p >= 1e-3 - 1e-7).all() and (p <= 1 + 1e-6).all()
    # empirical rate matches p: per-row z-scores are standard-normal-ish
    n_ok = maskable[rows].sum(1)
    frac = masked[rows].sum(1) / n_ok
    z = (frac - p) / np.sqrt(p * (1 - p) / n_ok + 1e-12)
    assert abs(z.mean()) < 0.3 and 0.6 < z.std() < 1.4, (z.mean(), z.std())
    # t ~ U(0,1): p is spread over the whole range
    assert p.min() < 0.1 and p.max() > 0.9


def test_position_mask_exact_k_and_positional_bias(seed, rng):
    n, nb, b = 16, 8, 512
    tokens = rng.integers(4, 40, size=(b, nb * n)).astype(np.int32)
    noised = masking.position_mask(jax.random.PRNGKey(seed), tokens, MASK_ID, n)
    x_t, masked, w = (np.asarray(a) for a in noised)
    np.testing.assert_array_equal(x_t, np.where(masked, MASK_ID, tokens))
    mb, wb = masked.reshape(b, nb, n), w.reshape(b, nb, n)
    k = mb.sum(-1)
    has = k > 0
    m = np.where(has, 1.0 / np.where(mb, wb, np.inf).min(-1).clip(1e-30), np.nan)
    # exact k = round(m n) in every block; one m (weight 1/m) per block
    np.testing.assert_array_equal(k[has], np.round(m[has] * n).astype(int))
    assert np.allclose(np.where(mb, wb, 0).max(-1)[has], 1.0 / m[has])
    # m ~ U(eps, 1): blocks with k = 0 need m < 0.5/n
    assert abs((~has).mean() - 0.5 / n) < 0.02
    # later positions are masked more when m is small, about uniformly when m is large
    small = has & (m < 0.3)
    freq_small = mb[small].mean(0)
    assert freq_small[-4:].mean() > 2.0 * freq_small[:4].mean(), freq_small
    assert np.corrcoef(np.arange(n), freq_small)[0, 1] > 0.9
    large = has & (m > 0.85)
    freq_large = mb[large].mean(0)
    assert freq_large[-4:].mean() < 1.15 * freq_large[:4].mean(), freq_large
    # the bias matches Gumbel-top-1 for k = 1: P(i) proportional to exp(lambda (1-m) i)
    lam = math.log(2) / (0.25 * n)
    assert np.isclose(masking.position_lambda(n), lam)


def test_position_mask_k1_distribution(seed):
    """For k = 1 the Gumbel-top-k choice is a softmax over lambda (1 - m) i."""
    n = 8
    key = jax.random.PRNGKey(seed)
    b = 20000
    tokens = jnp.full((b, n), 5, jnp.int32)
    x_t, masked, w = masking.position_mask(key, tokens, MASK_ID, n)
    masked, w = np.asarray(masked), np.asarray(w)
    one = masked.sum(1) == 1
    m = 1.0 / w[one].max(1)
    pos = masked[one].argmax(1)
    lam = math.log(2) / (0.25 * n)
    expect = np.zeros(n)
    for mi in m:
        logits = lam * (1 - mi) * np.arange(n)
        expect += np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    expect /= len(m)
    got = np.bincount(pos, minlength=n) / len(m)
    assert len(m) > 1000
    assert np.abs(got - expect).max() < 0.03, (got, expect)


def test_sft_mask_only_answer_tokens(seed, rng):
    b, l = 64, 32
    tokens = rng.integers(4, 40, size=(b, l)).astype(np.int32)
    answer = np.zeros((b, l), bool)
    starts = rng.integers(1, l - 1, size=b)
    for i, s in enumerate(starts):
        answer[i, s:] = True
    for schedule in ("uniform", "position"):
        x_t, masked, _ = masking.sft_mask(jax.random.PRNGKey(seed), tokens, answer, MASK_ID, schedule=schedule,
                                          block_size=8)
        masked = np.asarray(masked)
        assert not masked[~answer].any()
        assert masked.sum() > 0
        np.testing.assert_array_equal(np.asarray(x_t)[~answer], tokens[~answer])


def test_noise_rejects_bad_arguments():
    with pytest.raises(ValueError, match="schedule='gauss'"):
        masking.apply_noise(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32), 3, schedule="gauss")
    with pytest.raises(ValueError, match="L=10 to be a multiple of block_size=4"):
        masking.position_mask(jax.random.PRNGKey(0), jnp.zeros((1, 10), jnp.int32), 3, 4)


# ---------------------------------------------------------------------------------------------- loss


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _numpy_joint(logp_d, logp_a, tokens, masked, weight, loss_mask, alpha, normalization):
    b, l = tokens.shape
    sum_d = sum_a = 0.0
    n_m = n_a = 0
    for i in range(b):
        for j in range(l):
            if masked[i, j] and loss_mask[i, j]:
                sum_d += weight[i, j] * -logp_d[i, j, tokens[i, j]]
                n_m += 1
            if j + 1 < l and loss_mask[i, j + 1]:
                sum_a += -logp_a[i, j, tokens[i, j + 1]]
                n_a += 1
    if normalization == "pretrain":
        return (sum_a + alpha * sum_d) / (n_m + n_a)
    return sum_a / n_a + alpha * sum_d / n_m


@pytest.mark.parametrize("normalization,bidirectional", [("pretrain", False), ("sft", True)])
def test_joint_loss_matches_numpy(normalization, bidirectional, seed, rng):
    cfg = tiny_config(block_size=4)
    model = Model.init(cfg, seed=seed)
    b, l = 2, 12
    tokens = rng.integers(4, cfg.vocab_size, size=(b, l)).astype(np.int32)
    loss_mask = rng.random((b, l)) < 0.7
    masked = (rng.random((b, l)) < 0.5) & loss_mask
    masked[0, 0] = loss_mask[0, 0] = True
    weight = np.where(masked, 1.0 / rng.uniform(0.05, 1.0, size=(b, 1)), 0.0).astype(np.float32)
    x_t = np.where(masked, MASK_ID, tokens).astype(np.int32)
    noised = masking.Noised(jnp.asarray(x_t), jnp.asarray(masked), jnp.asarray(weight))
    # reference logits from passes independent of the loss code
    if bidirectional:
        logits_d = np.asarray(model.logits(x_t, kind="bidirectional"), np.float64)
    else:
        logits_d = np.asarray(model.logits(np.concatenate([x_t, tokens], 1), kind="two_stream"), np.float64)[:, :l]
    logits_a = np.asarray(model.logits(tokens, kind="causal"), np.float64)
    expect = _numpy_joint(_log_softmax(logits_d), _log_softmax(logits_a), tokens, masked, weight, loss_mask, 0.3,
                          normalization)
    for chunk in (None, 5):
        loss, metrics = losses.joint_loss(model.module, tokens, noised, loss_mask, alpha=0.3,
                                          normalization=normalization, bidirectional=bidirectional, ce_chunk=chunk)
        assert abs(float(loss) - expect) <= 1e-5 * abs(expect), (chunk, float(loss), expect)
        assert int(metrics["n_masked"]) == int((masked & loss_mask).sum())
        assert int(metrics["n_ar"]) == int(loss_mask[:, 1:].sum())


def test_ar_loss_matches_numpy(seed, rng):
    cfg = tiny_config()
    model = Model.init(cfg, seed=seed)
    tokens = rng.integers(0, cfg.vocab_size, size=(3, 9)).astype(np.int32)
    logp = _log_softmax(np.asarray(model.logits(tokens), np.float64))
    expect = -np.mean([logp[i, j, tokens[i, j + 1]] for i in range(3) for j in range(8)])
    loss, _ = losses.ar_loss(model.module, tokens, ce_chunk=4)
    assert abs(float(loss) - expect) <= 1e-5 * expect


def test_chunked_ce_gradient_matches_unchunked(seed, rng):
    h = jnp.asarray(rng.normal(size=(2, 11, 8)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(8, 20)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 20, size=(2, 11)))
    f = lambda h, w, c: jnp.sum(losses.token_ce(h, w, y, c) * jnp.arange(11.0))
    g1 = jax.grad(f, argnums=(0, 1))(h, w, None)
    g2 = jax.grad(f, argnums=(0, 1))(h, w, 4)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- step


def test_wsd_schedule_shape():
    cfg = step_lib.OptimConfig(lr=1e-3, min_lr=1e-4, total_steps=100, warmup_steps=10, decay_steps=20)
    s = step_lib.wsd_schedule(cfg)
    assert float(s(0)) == 0.0
    assert np.isclose(float(s(5)), 5e-4)
    assert np.isclose(float(s(10)), 1e-3) and np.isclose(float(s(79)), 1e-3) and np.isclose(float(s(80)), 1e-3)
    assert np.isclose(float(s(90)), 5.5e-4)
    assert np.isclose(float(s(100)), 1e-4)


def test_optim_config_rejects_bad_values():
    with pytest.raises(ValueError, match="warmup_steps=60 and decay_steps=50"):
        step_lib.OptimConfig(total_steps=100, warmup_steps=60, decay_steps=50)
    with pytest.raises(ValueError, match="b2=1.5"):
        step_lib.OptimConfig(b2=1.5)


def test_gradient_accumulation_equals_large_batch(seed, rng):
    """AR objective (noise-free): 2 micro-batches of 2 == 1 batch of 4 (equal token counts)."""
    cfg = tiny_config()
    model = Model.init(cfg, seed=seed)
    tokens = rng.integers(0, cfg.vocab_size, size=(4, 8)).astype(np.int32)
    import optax

    tx = optax.chain(optax.clip_by_global_norm(0.5), optax.sgd(0.1))  # linear in the gradient
    lc = losses.LossConfig(objective="ar")
    step = step_lib.make_train_step(model.graphdef, tx, lc, donate=False)
    st = step_lib.init_state(model.params, tx, 0)
    one, m1 = step(st, {"tokens": jnp.asarray(tokens[None]), "loss_mask": jnp.ones((1, 4, 8), bool)})
    two, m2 = step(st, {"tokens": jnp.asarray(tokens.reshape(2, 2, 8)), "loss_mask": jnp.ones((2, 2, 8), bool)})
    assert np.isclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-6)
    assert np.isclose(float(m1["grad_norm"]), float(m2["grad_norm"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(two.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)
    assert not np.allclose(jax.tree.leaves(one.params)[0], jax.tree.leaves(st.params)[0])


def test_bf16_compute_keeps_float32_master(seed, rng):
    cfg = tiny_config()
    model = Model.init(cfg, seed=seed)
    tokens = jnp.asarray(rng.integers(4, cfg.vocab_size, size=(1, 2, 8)).astype(np.int32))
    tx = step_lib.make_optimizer(step_lib.OptimConfig(lr=1e-3, total_steps=5))
    st = step_lib.init_state(model.params, tx, 0)
    batch = {"tokens": tokens, "loss_mask": jnp.ones(tokens.shape, bool)}
    lc = losses.LossConfig(objective="ar")
    s16, m16 = step_lib.make_train_step(model.graphdef, tx, lc, compute_dtype=jnp.bfloat16, donate=False)(st, batch)
    loss32 = float(losses.ar_loss(model.module, tokens[0])[0])
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(s16.params))
    assert abs(float(m16["loss"]) - loss32) < 0.05 * loss32
    assert float(m16["loss"]) != loss32  # really ran in bf16
    # the float32 master moved, by updates finer than bf16 resolution in places (kept in float32)
    moved = [np.asarray(a) - np.asarray(b) for a, b in zip(jax.tree.leaves(s16.params), jax.tree.leaves(st.params))]
    assert all(np.abs(d).max() > 0 for d in moved if d.size > 64)
    new = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(s16.params)])
    assert not np.array_equal(new, new.astype(jnp.bfloat16).astype(np.float32))


def test_weight_decay_skips_norms(seed):
    cfg = tiny_config()
    params = Model.init(cfg, seed=seed).params
    mask = step_lib.decay_mask(params)
    flat = jax.tree_util.tree_flatten_with_path(mask)[0]
    names = {jax.tree_util.keystr(p): bool(v) for p, v in flat}
    assert any("norm" in k for k in names) and all(not v for k, v in names.items() if "norm" in k)
    assert all(v for k, v in names.items() if "proj" in k or "embed" in k)


# ---------------------------------------------------------------------------------------------- data


def test_pack_block_multiple_and_stream_order(rng):
    docs = [list(rng.integers(4, 40, size=int(n))) for n in rng.integers(1, 30, size=12)]
    out = data.pack(docs, 16, 8, eos_id=2, drop_remainder=False)
    stream = np.concatenate([d + [2] for d in docs])
    assert out["tokens"].shape[1] == 16
    flat = out["tokens"].reshape(-1)[out["loss_mask"].reshape(-1)]
    np.testing.assert_array_equal(flat, stream)
    assert not out["loss_mask"][:-1].__invert__().any()
    with pytest.raises(ValueError, match="seq_len=20 must be a positive multiple of block_size=8"):
        data.pack(docs, 20, 8)


def test_dataset_batches_are_deterministic_epoch_permutations(seed, rng):
    ds = data.Dataset.from_dict({"tokens": np.arange(10 * 4).reshape(10, 4), "loss_mask": np.ones((10, 4), bool)},
                                seed)
    rows = np.concatenate([ds.batch(s, 5)["tokens"][0, :, 0] // 4 for s in range(2)])
    assert sorted(rows) == list(range(10))  # first epoch = a permutation
    np.testing.assert_array_equal(ds.batch(3, 2, 2)["tokens"], ds.batch(3, 2, 2)["tokens"])
    assert ds.batch(3, 2, 2)["tokens"].shape == (2, 2, 4)


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<bos>", "<eos>", "<mask>", "<|im_start|>", "<|im_end|>", "user", "assistant", "system",
             "hi", "there", "what", "is", "two", "plus", "four", "\n"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>", "\n"])
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok, words


def test_chat_tokens_answer_mask_plain_and_template():
    from transformers import PreTrainedTokenizerFast

    tok, words = _word_tokenizer()
    msgs = [{"role": "user", "content": "what is two plus two"}, {"role": "assistant", "content": "four"}]
    ids, mask = data.chat_tokens(tok, msgs)
    answer = [words[i] for i, m in zip(ids, mask) if m]
    prompt = [words[i] for i, m in zip(ids, mask) if not m]
    assert answer[0] == "four" and "<|im_end|>" in answer and "four" not in prompt
    assert prompt[-2:] == ["assistant", "\n"]

    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=template)
    ids2, mask2 = data.chat_tokens(hf, msgs)
    assert [words[i] for i, m in zip(ids2, mask2) if m][0] == "four"
    assert sum(mask2) >= 2 and not any(mask2[: len(mask2) - sum(mask2)])
    batch = data.sft_batch([(ids2, mask2)], 32, 8, pad_id=0)
    assert batch["tokens"].shape == (1, 32) and batch["loss_mask"].sum() == sum(mask2)
    with pytest.raises(ValueError, match="must end with an assistant message"):
        data.chat_tokens(tok, msgs[:1])
