"""Sharding on 8 fake CPU devices: outputs equal single-device outputs, params really sharded."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdlm import KVCache, Model, ModelConfig, forward
from jaxdlm import sharding as sh
from jaxdlm.model import param_layout
from numerics import rel_err

MESHES = ["tensor=2,fsdp=4", "tensor=8", "data=2,fsdp=4"]


def config(**kw):
    base = dict(model_type="ministral3", vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2,
                num_heads=8, num_kv_heads=8, head_dim=16, mask_token_id=3, block_size=4)
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture(scope="module")
def devices():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8 before importing jax")
    return jax.devices()[:8]


def test_make_mesh_parses_specs(devices):
    mesh = sh.make_mesh("tensor=2,fsdp=4", devices=devices)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    assert dict(sh.make_mesh("", devices=devices).shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    for bad, msg in [("tensor=3", "needs 3 devices but 8"), ("tensor=2,pipe=4", "mesh axis 'pipe' is unknown"),
                     ("tensor", "is not NAME=SIZE"), ("tensor=2,tensor=4", "given twice")]:
        with pytest.raises(ValueError, match=msg):
            sh.make_mesh(bad, devices=devices)


@pytest.mark.parametrize("spec", MESHES)
def test_sharded_forward_equals_single_device(spec, devices, seed, rng):
    model = Model.init(config(), seed=seed)
    mesh = sh.make_mesh(spec, devices=devices)
    sharded = sh.shard_model(model, mesh)
    tokens = rng.integers(0, 128, size=(8, 12))
    ref = np.asarray(model.logits(tokens))
    out = np.asarray(sharded.logits(jax.device_put(jnp.asarray(tokens, jnp.int32), sh.batch_sharding(mesh))))
    assert rel_err(out, ref) <= 1e-5

    # cached causal + denoise passes with a sharded cache
    @jax.jit
    def passes(params, toks, cache):
        module = nnx.merge(model.graphdef, params)
        a, cache = forward(module, toks[:, :8], kind="causal", cache=cache)
        b, cache2 = forward(module, toks[:, 8:], kind="denoise", cache=cache)
        return a, b, cache2

    cache = jax.device_put(KVCache.init(model.config, 8, 16), sh.cache_sharding(mesh))
    with jax.set_mesh(mesh):
        a, b, c = passes(sharded.params, jax.device_put(jnp.asarray(tokens, jnp.int32), sh.batch_sharding(mesh)), cache)
    a0, b0, _ = passes(model.params, jnp.asarray(tokens, jnp.int32), KVCache.init(model.config, 8, 16))
    assert rel_err(a, a0) <= 1e-5 and rel_err(b, b0) <= 1e-5
    assert c.k.sharding.is_equivalent_to(sh.cache_sharding(mesh).k, c.k.ndim)


@pytest.mark.parametrize("spec", ["tensor=8", "tensor=2,fsdp=4"])
def test_params_are_sharded_as_the_rules_say(spec, devices, seed):
    model = Model.init(config(), seed=seed)
    mesh = sh.make_mesh(spec, devices=devices)
    sharded = sh.shard_model(model, mesh)
    pure = nnx.to_pure_dict(sharded.params)
    t, f = mesh.shape["tensor"], mesh.shape["fsdp"]
    emb, head = pure["embed"], pure["head"]
    # no device holds the whole embedding or head under tensor parallelism
    for arr in (emb, head):
        shard_shapes = {s.data.shape for s in arr.addressable_shards}
        assert all(np.prod(s) * t * f == arr.size for s in shard_shapes)
    fs = "fsdp" if f > 1 else None
    P = jax.sharding.PartitionSpec

    def spec_is(arr, *spec):
        return arr.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, P(*spec)), arr.ndim)

    assert spec_is(emb, "tensor", fs) and spec_is(head, fs, "tensor")
    assert spec_is(pure["layers"]["q_proj"], None, fs, "tensor")
    assert spec_is(pure["layers"]["o_proj"], None, "tensor", fs)
    assert spec_is(pure["layers"]["down_proj"], None, "tensor", fs)
    assert spec_is(pure["layers"]["attn_norm"]["weight"], None, None)
    assert pure["layers"]["q_proj"].addressable_shards[0].data.shape == (2, 64 // f, 8 * 16 // t)


@pytest.mark.parametrize("cfg_kw,spec,msg", [
    ({"num_kv_heads": 2}, "tensor=8", r"mesh axis tensor=8 \(size 8\) does not divide num_key_value_heads=2"),
    ({"num_heads": 4, "num_kv_heads": 4}, "tensor=8", r"does not divide num_attention_heads=4"),
    ({"vocab_size": 100}, "tensor=8", r"does not divide vocab_size=100"),
    ({"hidden_size": 36}, "fsdp=8", r"mesh axis fsdp=8 \(size 8\) does not divide hidden_size=36"),
    ({"intermediate_size": 91}, "tensor=2,fsdp=4", r"mesh axis tensor=2 \(size 2\) does not divide intermediate_size=91"),
])
def test_mesh_that_does_not_divide_the_model_is_rejected(cfg_kw, spec, msg, devices):
    model = Model.abstract(config(**cfg_kw))
    with pytest.raises(ValueError, match=msg):
        sh.param_shardings(model, sh.make_mesh(spec, devices=devices))


def test_automatic_attention_backend_is_pallas_on_a_gpu_mesh(devices, monkeypatch):
    """The Pallas kernels run per shard under a mesh (tests/test_pallas_sharded.py), so a mesh keeps them."""
    from jaxdlm import attention

    monkeypatch.delenv("JAXDLM_ATTENTION", raising=False)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert attention.default_impl() == "pallas"
    with jax.set_mesh(sh.make_mesh("tensor=8", devices=devices)):
        assert attention.default_impl() == "pallas"


def test_load_restores_straight_into_target_shardings(devices, seed, rng, tmp_path):
    import jaxdlm

    model = Model.init(config(), seed=seed)
    jaxdlm.save(model, tmp_path / "ckpt")
    mesh = sh.make_mesh("tensor=2,fsdp=4", devices=devices)
    loaded = jaxdlm.load(tmp_path / "ckpt", mesh=mesh)
    expected = sh.param_shardings(model, mesh)
    for arr, want in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(expected)):
        assert arr.sharding.is_equivalent_to(want, arr.ndim)
    tokens = rng.integers(0, 128, size=(4, 10))
    assert rel_err(loaded.logits(tokens), model.logits(tokens)) <= 1e-5
    small = Model.init(config(num_kv_heads=4), seed=seed)
    jaxdlm.save(small, tmp_path / "gqa")
    with pytest.raises(ValueError, match=r"mesh axis tensor=8 \(size 8\) does not divide num_key_value_heads=4"):
        jaxdlm.load(tmp_path / "gqa", mesh=sh.make_mesh("tensor=8", devices=devices))


@pytest.mark.parametrize("spec,modes", [   # every mode and every mesh once (each mode costs two compiles)
    ("tensor=2,fsdp=4", ("ar", "quadratic_spec")),
    ("tensor=8", ("diffusion",)),
    ("data=2,fsdp=4", ("linear_spec",)),
])
def test_sharded_generate_equals_single_device(spec, modes, devices, seed, rng):
    import jaxdlm

    model = Model.init(config(), seed=seed)
    sharded = sh.shard_model(model, sh.make_mesh(spec, devices=devices))
    prompts = [rng.integers(0, 128, size=int(n)) for n in rng.integers(3, 12, size=8)]
    for mode in modes:
        kw = dict(mode=mode, max_new_tokens=10, block_length=4, threshold=0.5, eos_token_id=())
        ref = jaxdlm.generate(model, prompts, **kw)
        out = jaxdlm.generate(sharded, prompts, **kw)
        np.testing.assert_array_equal(out.tokens, ref.tokens, err_msg=f"{mode} on {spec}")
        np.testing.assert_array_equal(out.nfe, ref.nfe)


@pytest.mark.parametrize("spec", ["tensor=8", "data=2,fsdp=4"])
def test_sharded_loss_and_grads_equal_single_device(spec, devices, seed, rng):
    """Loss and every gradient of the joint training objective match within 1e-5 relative (each mesh axis
    sharded alone; the mixed tensor=2,fsdp=4 mesh: the train-step test below)."""
    from jaxdlm.training.losses import LossConfig
    from jaxdlm.training.step import make_loss_fn

    model = Model.init(config(), seed=seed)
    mesh = sh.make_mesh(spec, devices=devices)
    sharded = sh.shard_model(model, mesh)
    tokens = jnp.asarray(rng.integers(5, 128, size=(8, 16)), jnp.int32)
    grad_fn = jax.jit(jax.value_and_grad(make_loss_fn(model.graphdef, LossConfig(ce_chunk=None)), has_aux=True))
    key = jax.random.PRNGKey(seed)
    (ref_loss, _), ref_grads = grad_fn(model.params, {"tokens": tokens}, key)
    with jax.set_mesh(mesh):
        (loss, _), grads = grad_fn(sharded.params, {"tokens": jax.device_put(tokens, sh.batch_sharding(mesh))}, key)
    assert abs(float(loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        assert rel_err(a, b) <= 1e-5


def test_sharded_train_step_keeps_params_sharded(devices, seed, rng):
    """One optimizer step (2 accumulated micro-batches) on tensor=2,fsdp=4: same metrics, params stay sharded.

    (Updated params are not compared: Adam's first step is ~lr * sign(g), which turns float noise in
    near-zero gradients into lr-sized differences; gradients are compared above, one mesh axis at a time.)"""
    from jaxdlm.training.losses import LossConfig
    from jaxdlm.training.step import OptimConfig, init_state, make_optimizer, make_train_step

    model = Model.init(config(), seed=seed)
    mesh = sh.make_mesh("tensor=2,fsdp=4", devices=devices)
    sharded = sh.shard_model(model, mesh)
    tx = make_optimizer(OptimConfig(lr=1e-2, warmup_steps=0, total_steps=10))
    step = make_train_step(model.graphdef, tx, LossConfig(ce_chunk=None), donate=False)
    batch = {"tokens": jnp.asarray(rng.integers(5, 128, size=(2, 8, 16)), jnp.int32)}  # [A, B, L]
    _, ref_metrics = step(init_state(model.params, tx, seed), batch)
    sharded_batch = {"tokens": jax.device_put(batch["tokens"], jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(None, *sh.batch_sharding(mesh, 2).spec)))}
    with jax.set_mesh(mesh):
        new_state, metrics = step(init_state(sharded.params, tx, seed), sharded_batch)
    for name in ("loss", "ar_loss", "diff_loss", "grad_norm"):
        assert abs(float(metrics[name]) - float(ref_metrics[name])) <= 1e-5 * abs(float(ref_metrics[name])), name
    new = nnx.to_pure_dict(new_state.params)
    layout = param_layout(model.config)
    for path in (("layers", "q_proj"), ("embed",), ("layers", "down_proj")):
        arr = new[path[0]] if len(path) == 1 else new[path[0]][path[1]]
        want = jax.sharding.NamedSharding(mesh, sh.logical_spec(layout[path].axes, mesh=mesh))
        assert arr.sharding.is_equivalent_to(want, arr.ndim), path
