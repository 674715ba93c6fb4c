"""Pallas attention kernels (interpret mode on the CPU) against the XLA reference path.

Tiles are shrunk to 16 so that the tiny shapes still span several tiles, partial tiles and padding.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdlm import KVCache, Model, ModelConfig, forward
from jaxdlm import attention as attention_pkg
from jaxdlm import compat
from jaxdlm.attention import masks, pallas_gpu, xla
from jaxdlm.attention.masks import TokenInfo

SMALL = pallas_gpu.KernelConfig(block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=16, block_k_decode=16,
                                block_k_decode_wide=16, num_splits=3)
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _qkv(rng, b, t, s, h, kvh, d, dtype):
    mk = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)  # noqa: E731
    return mk(b, t, h, d), mk(b, s, kvh, d), mk(b, s, kvh, d), mk(b, t, h, d)


def _check(rng, q_info, k_info, *, h, kvh, d, dtype, window=None, grads=True, config=SMALL):
    """Forward and (optionally) dq, dk, dv of pallas vs xla under a random output cotangent."""
    b, t = q_info.pos.shape
    s = k_info.pos.shape[1]
    q, k, v, ct = _qkv(rng, b, t, s, h, kvh, d, dtype)
    scale = d ** -0.5
    run = lambda impl: lambda q, k, v: impl(q, k, v, q_info, k_info, scale=scale, sliding_window=window)  # noqa
    ref_fn = run(xla.attention)
    pal_fn = run(lambda *a, **kw: pallas_gpu.attention(*a, **kw, config=config))
    tol = TOL[dtype]
    if not grads:
        out = jax.jit(pal_fn)(q, k, v)
        assert np.isfinite(np.asarray(out, np.float32)).all()
        assert rel_err(out, ref_fn(q, k, v)) < tol
        return
    up = lambda x: x.astype(jnp.float32)  # noqa: E731  (bf16 reference gradients in float32)
    fwd_bwd = lambda fn, ct: jax.jit(lambda q, k, v: (lambda o, f: (o, f(ct)))(*jax.vjp(fn, q, k, v)))  # noqa
    out, grads_p = fwd_bwd(pal_fn, ct)(q, k, v)
    ref, grads_r = fwd_bwd(lambda q, k, v: ref_fn(up(q), up(k), up(v)), up(ct))(q, k, v)
    assert rel_err(out, ref) < tol, "forward"
    for name, g, r in zip("qkv", grads_p, grads_r):
        assert g.dtype == dtype
        assert np.isfinite(np.asarray(g, np.float32)).all()
        assert rel_err(g, r) < tol, f"d{name}"


def _exact_classes(q, k, tq, tk, window):
    ok = masks.allowed(q, k, window)
    b, t, s = ok.shape
    ok = ok.reshape(b, t // tq, tq, s // tk, tk)
    anyv, allv = ok.any(axis=(2, 4)), ok.all(axis=(2, 4))
    return np.where(allv, masks.TILE_FULL, np.where(anyv, masks.TILE_PARTIAL, masks.TILE_SKIP))


def _random_info(rng, b, n, pos_max, blocks, p_valid=0.9):
    pos = np.sort(rng.integers(0, pos_max, (b, n)), axis=1)
    return TokenInfo(jnp.asarray(pos, jnp.int32), jnp.asarray(rng.integers(0, blocks, (b, n)), jnp.int32),
                     jnp.asarray(rng.integers(0, 2, (b, n)), jnp.int32), jnp.asarray(rng.random((b, n)) < p_valid))


@pytest.mark.parametrize("window", [None, 7])
def test_tile_classes_are_conservative(window, rng):
    """SKIP only where nothing is allowed, FULL only where everything is; structured layouts stay exact."""
    cases = [(_random_info(rng, 3, 64, 40, 5), _random_info(rng, 3, 96, 40, 5, p_valid=0.95)),
             (masks.two_stream_info(2, 64, 8),) * 2]
    for tq, tk in [(4, 8), (16, 16)]:
        for qi, ki in cases:
            got = np.asarray(jax.jit(masks.tile_classes, static_argnums=(2, 3, 4))(qi, ki, tq, tk, window))
            exact = _exact_classes(qi, ki, tq, tk, window)
            assert not ((got == masks.TILE_SKIP) & (exact != masks.TILE_SKIP)).any()
            assert not ((got == masks.TILE_FULL) & (exact != masks.TILE_FULL)).any()
            if window is None and qi is ki:  # two-stream tiles aligned with blocks: bounds are exact
                np.testing.assert_array_equal(got, exact)
    with pytest.raises(ValueError, match="multiple of the tile"):
        masks.tile_classes(cases[0][0], cases[0][1], 5, 8)


def test_two_stream_gqa4_fp32_fwd_bwd(rng):
    """[x_t | x_0] layout, GQA 4:1, L=24 (2L=48: three 16-tiles, blocks of 8 straddle nothing)."""
    _check(rng, masks.two_stream_info(2, 24, 8), masks.two_stream_info(2, 24, 8), h=4, kvh=1, d=16,
           dtype=jnp.float32)


def test_two_stream_bf16_unaligned_fwd_bwd(rng):
    """bf16, GQA 1:1, 2L=42 not a multiple of the tile, blocks of 6 straddling tiles, head_dim 24 padded."""
    info = masks.two_stream_info(1, 21, 6)
    _check(rng, info, info, h=2, kvh=2, d=24, dtype=jnp.bfloat16)


def test_causal_ragged_window_fwd_bwd(rng):
    """Causal with right padding per row (invalid keys), a sliding window, GQA 2:1, T=37."""
    b, t = 2, 37
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    valid = pos < jnp.array([[37], [23]])
    info = masks.sequence_info(pos, "causal", valid=valid)
    _check(rng, info, info, h=4, kvh=2, d=16, dtype=jnp.float32, window=9)


def test_bidirectional_fwd(rng):
    """Fully bidirectional with invalid (padding) keys, T=35: unmasked FULL tiles, masked partial ones."""
    pos = jnp.broadcast_to(jnp.arange(35, dtype=jnp.int32), (2, 35))
    info = masks.sequence_info(pos, "bidirectional", valid=pos < jnp.array([[35], [30]]))
    head = TokenInfo(*(x[:, :32] for x in info))
    cls = np.asarray(masks.tile_classes(head, head, 16, 16))
    assert (cls[0] == masks.TILE_FULL).all() and (cls[1, :, 1] == masks.TILE_PARTIAL).all()
    _check(rng, info, info, h=2, kvh=1, d=16, dtype=jnp.float32, grads=False)


@pytest.mark.parametrize("schedule", pallas_gpu.SCHEDULES)
def test_random_metadata_fwd_bwd(schedule, rng):
    """Arbitrary TokenInfo (mixed streams, random blocks, invalid keys, rows that see nothing), under both
    tile schedules (runs of consecutive tiles; v1's visit list)."""
    qi = _random_info(rng, 2, 40, 30, 4)
    ki = _random_info(rng, 2, 56, 30, 4, p_valid=0.7)
    _check(rng, qi, ki, h=4, kvh=2, d=16, dtype=jnp.float32, config=dataclasses.replace(SMALL, schedule=schedule))


@pytest.mark.parametrize("kind,num_new,h,kvh,dtype,window", [
    ("causal", 1, 4, 1, jnp.float32, 20),    # AR step, GQA 4:1, sliding window
    ("denoise", 8, 2, 2, jnp.float32, None),  # diffusion block, GQA 1:1
    ("causal", 12, 4, 1, jnp.bfloat16, None),  # commit / verify, bf16, 48 rows (a "wide" decode tile)
])
def test_decode_over_cache_ragged(kind, num_new, h, kvh, dtype, window, rng):
    """Flash-decoding over 70 cache slots, per-row lengths shorter than the cache (one row empty-ish)."""
    length = jnp.asarray([int(rng.integers(30, 60)), int(rng.integers(0, 5))], jnp.int32)
    qi = masks.cache_query_info(length, num_new, kind)
    ki = masks.cache_key_info(length, 70, num_new, kind)
    _check(rng, qi, ki, h=h, kvh=kvh, d=16, dtype=dtype, window=window, grads=(kind == "denoise"))


def test_quadratic_self_spec_layout(rng):
    """The quadratic self-speculation layout (``masks.quadratic_info``, what ``forward(kind="quadratic")`` runs):
    N + N*N queries (42 for block 6: the training kernels, as for real block sizes) over the cache plus the
    unwritten mask tokens."""
    length = jnp.asarray([int(rng.integers(5, 20)), int(rng.integers(0, 3))], jnp.int32)
    qi, ki = masks.quadratic_info(length, 6, 32)
    _check(rng, qi, ki, h=4, kvh=2, d=16, dtype=jnp.float32)


def test_decode_splits_agree(rng):
    """The split count of flash-decoding does not change the result (1 split, more splits than tiles, and
    v1's visit-list schedule)."""
    length = jnp.asarray([50, 17], jnp.int32)
    qi, ki = masks.cache_query_info(length, 4, "denoise"), masks.cache_key_info(length, 64, 4, "denoise")
    q, k, v, _ = _qkv(rng, 2, 4, 64, 4, 2, 16, jnp.float32)
    ref = xla.attention(q, k, v, qi, ki, scale=0.25)
    for ns, schedule in ((1, "runs"), (9, "runs"), (2, "list")):  # (3 splits: test_decode_over_cache_ragged)
        cfg = pallas_gpu.KernelConfig(block_k_decode=16, num_splits=ns, schedule=schedule)
        fn = jax.jit(lambda q, k, v: pallas_gpu.attention(q, k, v, qi, ki, scale=0.25, config=cfg))
        assert rel_err(fn(q, k, v), ref) < 1e-5


def _tiny_config():
    return ModelConfig(model_type="nemotron_labs_diffusion", vocab_size=64, hidden_size=32, intermediate_size=48,
                       num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, block_size=4, mask_token_id=3)


def test_model_two_stream_loss_grads_match_xla(rng, seed):
    """Whole-model two-stream cross-entropy (2L = 40 tokens: the training kernels), logits and parameter
    gradients, pallas == xla."""
    cfg = _tiny_config()
    model = Model.init(cfg, seed=seed)
    b, length = 2, 20
    x0 = rng.integers(4, cfg.vocab_size, (b, length))
    xt = np.where(rng.random((b, length)) < 0.5, cfg.mask_token_id, x0)
    tokens = jnp.asarray(np.concatenate([xt, x0], 1), jnp.int32)
    targets = jnp.asarray(np.concatenate([x0, np.roll(x0, -1, 1)], 1), jnp.int32)

    def loss(params, impl):
        module = nnx.merge(model.graphdef, params)
        logits = forward(module, tokens, kind="two_stream", impl=impl)[0]
        logp = jax.nn.log_softmax(logits, -1)
        return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], -1)), logits

    vg = jax.value_and_grad(loss, has_aux=True)  # eager: compiling interpret-mode kernels costs more
    (l_x, logits_x), g_x = vg(model.params, "xla")
    (l_p, logits_p), g_p = vg(model.params, "pallas")
    assert rel_err(logits_p, logits_x) < 1e-5
    assert abs(float(l_p) - float(l_x)) < 1e-5 * abs(float(l_x))
    for gp, gx in zip(jax.tree.leaves(g_p), jax.tree.leaves(g_x)):
        assert rel_err(gp, gx) < 1e-4


def test_model_cached_passes_match_xla(rng, seed):
    """Prefill (ragged num_valid) then a denoise block over the cache: logits and cache, pallas == xla."""
    cfg = _tiny_config()
    model = Model.init(cfg, seed=seed)
    prompt = jnp.asarray(rng.integers(4, cfg.vocab_size, (2, 6)), jnp.int32)
    block = jnp.asarray(rng.integers(3, cfg.vocab_size, (2, 4)), jnp.int32)
    outs = {}

    def run(params, impl):
        module = nnx.merge(model.graphdef, params)
        cache = KVCache.init(cfg, batch=2, max_len=20)
        l1, cache = forward(module, prompt, kind="causal", cache=cache, num_valid=jnp.array([6, 3]), impl=impl)
        l2, _ = forward(module, block, kind="denoise", cache=cache, impl=impl)
        return l1, l2, cache.k

    for impl in ("xla", "pallas"):
        outs[impl] = run(model.params, impl)
    for a, b in zip(outs["pallas"], outs["xla"]):
        assert rel_err(a, b) < 1e-5


def test_env_override_picks_backend(monkeypatch):
    monkeypatch.setenv("JAXDLM_ATTENTION", "pallas")
    assert attention_pkg.default_impl() == "pallas"
    monkeypatch.setenv("JAXDLM_ATTENTION", "cudnn-ish")
    with pytest.raises(ValueError, match="JAXDLM_ATTENTION"):
        attention_pkg.default_impl()
    monkeypatch.delenv("JAXDLM_ATTENTION")
    assert attention_pkg.default_impl() == ("pallas" if jax.default_backend() == "gpu" else "xla")


def test_bad_shapes_raise():
    q = jnp.zeros((1, 4, 3, 8))
    k = jnp.zeros((1, 5, 2, 8))
    info_q = masks.sequence_info(jnp.zeros((1, 4), jnp.int32), "causal")
    info_k = masks.sequence_info(jnp.zeros((1, 5), jnp.int32), "causal")
    with pytest.raises(ValueError, match="divisible"):
        pallas_gpu.attention(q, k, k, info_q, info_k, scale=1.0)
    with pytest.raises(ValueError, match="power of two"):
        pallas_gpu.KernelConfig(block_q=24)
    with pytest.raises(ValueError, match="schedule"):
        pallas_gpu.KernelConfig(schedule="dense")


def test_kernels_lower_for_abstract_h100():
    """Every kernel lowers through Pallas' Triton backend for CUDA (compute capability 9.0) on this CPU host,
    at the benchmark's shapes (bf16, head_dim 128, GQA 4:1): catches primitives Triton cannot lower."""
    for schedule in pallas_gpu.SCHEDULES:
        _lower_all(pallas_gpu.KernelConfig(interpret=False, schedule=schedule))


def _lower_all(cfg):
    b, length, h, kvh, d = 1, 256, 8, 2, 128
    info = masks.two_stream_info(b, length, 32)
    sds = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)  # noqa: E731
    train = lambda q, k, v: pallas_gpu.attention(q, k, v, info, info, scale=d ** -0.5, config=cfg)  # noqa
    grad = jax.grad(lambda q, k, v: jnp.sum(train(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2))
    length_c = jnp.asarray([700], jnp.int32)

    def decode(q, k, v):
        t, kind = q.shape[1], ("causal" if q.shape[1] == 1 else "denoise")
        qi, ki = masks.cache_query_info(length_c, t, kind), masks.cache_key_info(length_c, 1024, t, kind)
        return pallas_gpu.attention(q, k, v, qi, ki, scale=d ** -0.5, config=cfg)

    qkv = (sds(b, 2 * length, h, d), sds(b, 2 * length, kvh, d), sds(b, 2 * length, kvh, d))
    cases = {"fwd": (train, qkv, 1), "fwd+bwd": (grad, qkv, 3),
             "decode32": (decode, (sds(b, 32, h, d), sds(b, 1024, kvh, d), sds(b, 1024, kvh, d)), 1),
             "decode1": (decode, (sds(b, 1, h, d), sds(b, 1024, kvh, d), sds(b, 1024, kvh, d)), 1)}
    for name, (fn, args, n_kernels) in cases.items():
        text = compat.lowered_text_for_platform(fn, *args, platform="cuda")
        assert text.count("__gpu$xla.gpu.triton") == n_kernels, (name, cfg.schedule)


@pytest.mark.parametrize("kind,num_new,s,dtype,grads", [
    ("causal", 1, 48, jnp.float32, False),     # AR step: decode kernel, in place
    ("denoise", 6, 48, jnp.bfloat16, True),    # diffusion block: decode kernel, in place; gradients
    ("causal", 40, 48, jnp.float32, False),    # prefill-sized pass: flash kernel, in place
    ("denoise", 3, 40, jnp.float32, False),    # S = 40, not a multiple of 16: sliced out and padded instead
])
def test_stacked_cache_layer_matches_plain_keys(kind, num_new, s, dtype, grads, rng):
    """Attention over layer 1 of a stacked heads-major cache ``[L, B, KVH, S, D]`` (what the unrolled forward
    passes) equals attention over that layer as plain keys ``[B, S, KVH, D]``; so do dq and dk, dv (only layer 1
    of the stack gets a gradient; one case: the backward kernels are those of the other tests)."""
    b, h, kvh, d, n_layers = 2, 4, 2, 16, 3
    length = jnp.asarray([s - num_new, int(rng.integers(0, s - num_new))], jnp.int32)
    qi, ki = masks.cache_query_info(length, num_new, kind), masks.cache_key_info(length, s, num_new, kind)
    mk = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)  # noqa: E731
    q, k, v, ct = mk(b, num_new, h, d), mk(n_layers, b, kvh, s, d), mk(n_layers, b, kvh, s, d), mk(b, num_new, h, d)
    plain = lambda x: jnp.swapaxes(x[1], 1, 2)  # noqa: E731

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * ct.astype(jnp.float32))

    stacked = lambda q, k, v: pallas_gpu.attention(q, k, v, qi, ki, scale=0.25, config=SMALL, layer=1)  # noqa
    ref = lambda q, k, v: xla.attention(q.astype(jnp.float32), plain(k).astype(jnp.float32),  # noqa: E731
                                        plain(v).astype(jnp.float32), qi, ki, scale=0.25)
    assert rel_err(jax.jit(stacked)(q, k, v), ref(q, k, v)) < TOL[dtype]
    if not grads:
        return
    g_got = jax.jit(jax.grad(loss(stacked), argnums=(0, 1, 2)))(q, k, v)
    g_ref = jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)
    for name, got, want in zip("qkv", g_got, g_ref):
        assert rel_err(got, want) < TOL[dtype], f"d{name}"
    for g in g_got[1:]:
        assert not np.asarray(g, np.float32)[[0, 2]].any(), "layers other than 1 get no gradient"


def test_stacked_cache_is_read_in_place_for_abstract_h100():
    """Lowered for an H100, the decode and flash kernels take the whole stacked cache as their operand: no
    slice, transpose or pad of the cache precedes them (a copy of the layer per forward)."""
    cfg = pallas_gpu.KernelConfig(interpret=False)
    sds = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)  # noqa: E731
    length = jnp.asarray([700], jnp.int32)
    for t in (1, 32, 64):
        kind = "causal" if t != 32 else "denoise"
        qi, ki = masks.cache_query_info(length, t, kind), masks.cache_key_info(length, 1024, t, kind)
        fn = lambda q, k, v: pallas_gpu.attention(q, k, v, qi, ki, scale=0.1, config=cfg, layer=2)  # noqa: E731
        text = compat.lowered_text_for_platform(fn, sds(1, t, 8, 128), sds(4, 1, 2, 1024, 128),
                                                sds(4, 1, 2, 1024, 128), platform="cuda")
        assert text.count("__gpu$xla.gpu.triton") == 1
        assert not re.search(r"stablehlo\.(slice|dynamic_slice|transpose|pad|gather)[^\n]*%arg[12]\b", text), t
