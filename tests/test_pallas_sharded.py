"""The Pallas kernels (interpret mode) under a multi-device mesh: split per shard by ``shard_map``
(:mod:`jaxdlm.attention.sharded`), in a sharded training step's forward and backward and in sharded decoding.

On the CPU an interpret-mode ``pallas_call`` is ordinary HLO that GSPMD could partition by itself, so equal numbers
alone would not show that the kernels run per shard: each test also checks that they do (the kernels sit inside a
``shard_map`` in the step's program; decoding calls them with per-shard shapes).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdlm
from jaxdlm import compat
from jaxdlm import sharding as sh
from jaxdlm.attention import masks, pallas_gpu, xla
from jaxdlm.attention import attention as attend
from jaxdlm.testing import tiny_model
from numerics import rel_err

MESH = "tensor=2,fsdp=2"
# the training kernels (the two-stream 2L = 40 queries are more than the decode kernel's 32) and the backward
KERNELS = {"jaxdlm_flash_fwd", "jaxdlm_flash_bwd_dq", "jaxdlm_flash_bwd_dkdv"}


@pytest.fixture(scope="module")
def mesh():
    if len(jax.devices()) < 4:
        pytest.skip("needs 4 devices: XLA_FLAGS=--xla_force_host_platform_device_count=4 before importing jax")
    return sh.make_mesh(MESH, devices=jax.devices()[:4])


@pytest.fixture(scope="module")
def model():
    """4 query heads over 2 kv heads (GQA 2): one kv head and its 2 query heads per ``tensor`` shard; a peaked
    output head (no argmax ties between the sharded and the unsharded decoding)."""
    return tiny_model(0)


def _pallas_calls(jaxpr, inside=False):
    """``(kernel name, inside a shard_map)`` for every ``pallas_call`` in ``jaxpr`` and its sub-jaxprs."""
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "pallas_call":
            label = eqn.params.get("name", eqn.params.get("name_and_src_info"))  # jax 0.10: a str
            yield str(getattr(label, "name", label)), inside
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(sub, "eqns"):
                    yield from _pallas_calls(sub, inside or name == "shard_map")


def test_train_step_loss_and_grads_match_xla_on_tensor2_fsdp2(mesh, model, monkeypatch, seed, rng):
    """The training objective's loss and every parameter gradient (the train step's ``value_and_grad``) on a
    ``tensor=2,fsdp=2`` mesh: Pallas kernels (forward and ``custom_vjp`` backward, inside ``shard_map``) == XLA
    path, within 1e-4."""
    from jaxdlm.training.losses import LossConfig
    from jaxdlm.training.step import make_loss_fn

    params = sh.shard_model(model, mesh).params
    tokens = jax.device_put(jnp.asarray(rng.integers(5, 64, size=(2, 20)), jnp.int32), sh.batch_sharding(mesh))
    key = jax.random.PRNGKey(seed)
    results = {}
    with jax.set_mesh(mesh):
        for impl in ("xla", "pallas"):
            monkeypatch.setenv("JAXDLM_ATTENTION", impl)  # read when the step is traced
            grad_fn = jax.jit(jax.value_and_grad(make_loss_fn(model.graphdef, LossConfig(ce_chunk=None)),
                                                 has_aux=True))
            traced = grad_fn.trace(params, {"tokens": tokens}, key)
            calls = list(_pallas_calls(traced.jaxpr.jaxpr))
            if impl == "pallas":
                assert KERNELS <= {name for name, _ in calls}, calls
                assert all(inside for _, inside in calls), f"a kernel outside shard_map: {calls}"
            else:
                assert not calls
            results[impl] = traced.lower().compile()(params, {"tokens": tokens}, key)
    (loss_x, _), grads_x = results["xla"]
    (loss_p, _), grads_p = results["pallas"]
    assert abs(float(loss_p) - float(loss_x)) <= 1e-4 * abs(float(loss_x))
    for (path, g_p), g_x in zip(jax.tree_util.tree_leaves_with_path(grads_p), jax.tree.leaves(grads_x)):
        assert rel_err(g_p, g_x) <= 1e-4, jax.tree_util.keystr(path)


def test_sharded_decode_runs_per_shard_kernels_and_matches_one_device(mesh, model, monkeypatch, rng):
    """AR decoding (prefill and one-token steps over the KV cache) of a model placed on the mesh, Pallas attention:
    the tokens and nfe of the unsharded model (its XLA path, the oracle); every kernel call of the sharded program
    sees one shard's rows and heads, over the stacked KV cache split by batch and kv heads."""
    prompts = [rng.integers(4, 64, size=int(n)) for n in rng.integers(3, 9, size=4)]
    kw = dict(mode="ar", max_new_tokens=6, eos_token_id=())
    ref = jaxdlm.generate(model, prompts, impl="xla", **kw)
    shapes = []
    kernel = pallas_gpu.attention

    def recording(q, *args, **kwargs):
        shapes.append((q.shape[0], q.shape[2], kwargs.get("layer")))
        return kernel(q, *args, **kwargs)

    monkeypatch.setattr(pallas_gpu, "attention", recording)
    out = jaxdlm.generate(sh.shard_model(model, mesh), prompts, impl="pallas", **kw)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_array_equal(out.nfe, ref.nfe)
    per_shard = (len(prompts) // mesh.shape["fsdp"], model.config.num_heads // mesh.shape["tensor"])
    assert shapes and {(b, h) for b, h, _ in shapes} == {per_shard}, shapes
    assert any(layer is not None for _, _, layer in shapes), "the stacked cache path did not run"


def test_unsplittable_heads_fall_back_to_xla_with_a_reason(mesh, rng):
    """One kv head cannot split over ``tensor=2``: the call warns, names the reason and returns the XLA result."""
    q, k = jnp.asarray(rng.standard_normal((2, 8, 2, 8)), jnp.float32), jnp.asarray(
        rng.standard_normal((2, 8, 1, 8)), jnp.float32)
    info = masks.sequence_info(jnp.broadcast_to(jnp.arange(8, dtype=jnp.int32), (2, 8)), "causal")
    fn = jax.jit(lambda q, k: attend(q, k, k, info, info, scale=0.3, impl="pallas"))
    with jax.set_mesh(mesh), pytest.warns(UserWarning, match=r"falls back to xla.*num_kv_heads=1 does not divide"):
        out = fn(q, k)
    assert rel_err(out, jax.jit(lambda q, k: xla.attention(q, k, k, info, info, scale=0.3))(q, k)) <= 1e-6


def test_kernels_lower_per_shard_for_abstract_h100s():
    """Lowered for 4 abstract H100s (``tensor=2,fsdp=2``, Triton backend, no device needed): the flash forward and
    both backward kernels, and the decode kernel over a stacked cache read in place, are Triton calls inside the
    manual (``shard_map``) computation, on one shard's operands: 1 of 2 rows, 4 of 8 query heads, 1 of 2 kv heads."""
    from jaxdlm.attention import sharded

    b, length, h, kvh, d = 2, 256, 8, 2, 128
    cfg = pallas_gpu.KernelConfig(interpret=False)
    sds = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)  # noqa: E731
    info = masks.two_stream_info(b, length, 32)
    train = lambda q, k, v: sharded.attention(q, k, v, info, info, scale=d ** -0.5, config=cfg)  # noqa: E731
    grad = jax.grad(lambda q, k, v: jnp.sum(train(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2))
    cache_len = jnp.asarray([700, 300], jnp.int32)
    qi, ki = masks.cache_query_info(cache_len, 4, "denoise"), masks.cache_key_info(cache_len, 1024, 4, "denoise")
    decode = lambda q, k, v: sharded.attention(q, k, v, qi, ki, scale=0.1, config=cfg, layer=2)  # noqa: E731
    # per-shard operands: q [1, 512, 4, 128] and k, v [1, 512, 1, 128]; the decode kernel's q rows [1, 1, 4 x 4, 128]
    # (4 queries x the GQA group of 4) and the whole stacked cache of the shard [4, 1, 1, 1024, 128]
    cases = {"fwd+bwd": (grad, (sds(b, 2 * length, h, d), sds(b, 2 * length, kvh, d), sds(b, 2 * length, kvh, d)),
                         3, ("tensor<1x512x4x128xbf16>", "tensor<1x512x1x128xbf16>")),
             "decode": (decode, (sds(b, 4, h, d), sds(4, b, kvh, 1024, d), sds(4, b, kvh, 1024, d)),
                        1, ("tensor<1x1x16x128xbf16>", "tensor<4x1x1x1024x128xbf16>"))}
    for name, (fn, args, n_kernels, local) in cases.items():
        text = compat.lowered_text_for_platform(fn, *args, platform="cuda", mesh_shape=sh.parse_mesh_spec(MESH))
        calls = [line for line in text.splitlines() if "__gpu$xla.gpu.triton" in line]
        assert len(calls) == n_kernels and "sdy.manual_computation" in text, name
        assert all(shape in line for line in calls for shape in local), (name, calls)
