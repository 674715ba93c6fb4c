"""Weight-only quantization (jaxdlm.quant): error bounds of each scheme, the quantized forward against the float
model of its own dequantized weights (both layer loops, both int4 matmul forms, the draft LoRA on top),
self-speculation still equal to AR, bytes of a quantized checkpoint, sharding of the scales, bad input.

The reference dequantization here is plain numpy, written from the format in docs/model.md (not jaxdlm's).
The converter's ``--quantize`` against ``jaxdlm.load(quantize=)`` is in test_convert.py (it needs that file's
Hugging Face fixtures)."""

import functools
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

import jaxdlm
from jaxdlm import Model, ModelConfig, forward
from jaxdlm.hf import model_from_pure_dict
from jaxdlm.model import quantize_model
from jaxdlm.quant import Quantization, dequantize, quantize, weight_bytes
from jaxdlm.testing import Reference, random_lora, ref_ar, tiny_config, tiny_model
from numerics import rel_err

# hidden 32, MLP 48, heads 4 x 16: int4 in groups of 16 fits every input dimension (2, 4 and 3 groups)
CFG = tiny_config()
INT4 = Quantization("int4", group_size=16)
QMAX = {"int8": 127, "int4": 7, "fp8": 448}
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def np_dequantize(q, scale) -> np.ndarray:
    """``q [..., in, out]`` with ``scale [..., G, out]``: each run of ``in / G`` inputs times its scale (float32)."""
    q, scale = np.asarray(q).astype(np.float32), np.asarray(scale).astype(np.float32)
    *lead, k, n = q.shape
    g = scale.shape[-2]
    return (q.reshape(*lead, g, k // g, n) * scale[..., :, None, :]).reshape(q.shape)


def float_twin(model) -> Model:
    """The float model whose weights are the quantized model's dequantized weights (numpy, float32)."""
    pure = jax.tree.map(np.asarray, nnx.to_pure_dict(model.params))
    for node, names in ((pure["layers"], LINEARS), (pure, ("head",) if "head_scale" in pure else ())):
        for name in names:
            node[name] = np_dequantize(node[name], node.pop(name + "_scale"))
    return model_from_pure_dict(model.config, pure, lora=model.lora)


def weights(rng, shape):
    """Weights with channel scales spread over 3 decades, one all-zero output channel and one outlier."""
    w = rng.standard_normal(shape).astype(np.float32) * np.logspace(-3, 0, shape[-1], dtype=np.float32)
    w[..., 5] = 0.0
    w[..., 0, 7] = 40.0
    return w


@pytest.mark.parametrize("quant", [Quantization("int8"), Quantization("int4"), Quantization("int4", group_size=32),
                                   Quantization("fp8")], ids=["int8", "int4", "int4g32", "fp8"])
@pytest.mark.parametrize("scale_dtype", [np.float32, ml_dtypes.bfloat16], ids=["f32", "bf16"])
def test_round_trip_error_bounds(quant, scale_dtype, rng):
    scheme = quant.scheme
    w = weights(rng, (2, 256, 40))
    q, s = quantize(w.astype(scale_dtype), quant, np.dtype(scale_dtype))
    g = 256 // quant.group_size if scheme == "int4" else 1
    assert q.dtype == quant.storage_dtype and q.shape == w.shape
    assert s.dtype == np.dtype(scale_dtype) and s.shape == (2, g, 40)
    w = w.astype(scale_dtype).astype(np.float32)  # what was quantized
    s32 = s.astype(np.float32)
    amax = np.abs(w.reshape(2, g, 256 // g, 40)).max(axis=2)
    # the scale is the smallest one that holds the largest weight: at least amax / qmax, one rounding step above
    ulp = 2.0 ** -23 if scale_dtype is np.float32 else 2.0 ** -7
    live = amax > 0
    assert np.all(s32[live] >= amax[live] / QMAX[scheme] * (1 - 1e-7))
    assert np.all(s32[live] <= amax[live] / QMAX[scheme] * (1 + 2 * ulp))
    x = np.repeat(s32, 256 // g, axis=1)  # the scale of each weight
    err = np.abs(w - np_dequantize(q, s))
    if scheme == "fp8":  # 3 mantissa bits: relative 2^-4 above the smallest normal 2^-6, absolute 2^-10 below it
        v = np.abs(w / x)
        bound = np.maximum(v * 2.0 ** -4, 2.0 ** -10)
        assert np.all(np.abs(w / x - q.astype(np.float32)) <= bound * (1 + 1e-6))
    else:  # round to nearest: half a step
        bound = 0.5 * np.ones_like(x)
        # plus the float32 roundings of q * s and of w - q * s (a weight half way between two steps, e.g.
        # w / s = -33.5, errs by exactly half a step before them: seed 1400486798)
        assert np.all(err <= x * 0.5 + np.abs(w) * 2.0 ** -22)
        assert np.abs(q.astype(np.int32)).max() <= QMAX[scheme]
    assert np.all(err[..., 5] == 0) and np.all(q.astype(np.float32)[..., 5] == 0)  # a zero channel stays zero
    # the bounds are not loose: in every ordinary channel the worst error is a sizeable part of its bound (the
    # outlier's channel 7 rounds its other weights to zero, far below half its step)
    worst = (err / x / bound).max(axis=1)
    assert np.all(worst[:, ~np.isin(np.arange(40), (5, 7))] > 0.25)
    # jaxdlm's dequantize agrees with the format
    np.testing.assert_array_equal(np.asarray(dequantize(q, s.astype(np.float32))), np_dequantize(q, s))


def test_int4_groups_must_fit_the_input_dimension():
    with pytest.raises(ValueError, match="96 inputs, not a multiple of 128"):
        quantize(np.ones((96, 8), np.float32), Quantization("int4"))
    with pytest.raises(ValueError, match="hidden_size = 32 is not a multiple of 128: use int8 or fp8"):
        Model.init(CFG, quantize="int4")
    with pytest.raises(ValueError, match=r"intermediate_size \(down_proj\) = 48 is not a multiple of 32"):
        Model.abstract(CFG, quantize=Quantization("int4", group_size=32))
    assert Model.abstract(CFG, quantize="int8").quant == Quantization("int8")
    for bad in (0, 15, 2.0, True):
        with pytest.raises(ValueError, match=f"int4 group_size={bad!r} must be an even number of inputs >= 2"):
            Quantization("int4", group_size=bad)
    with pytest.raises(ValueError, match="group_size=16 applies to int4 only; int8 has one scale per output channel"):
        Quantization("int8", group_size=16)
    assert Quantization("int4").group_size == 128 and Quantization("fp8").group_size is None
    assert Quantization.from_dict(INT4.to_dict()) == INT4 and Quantization.from_dict(None) is None


def test_unknown_scheme_and_tied_head_are_refused():
    for bad in ("int3", "INT8", "nf4"):
        with pytest.raises(ValueError, match=f"quantize='{bad}' is not a quantization scheme; expected one of "
                                             "int8, int4, fp8"):
            Model.abstract(CFG, quantize=bad)
    with pytest.raises(ValueError, match="tied to the embedding"):
        Model.abstract(tiny_config(tie_word_embeddings=True), quantize=Quantization("int8", head=True))


@functools.partial(jax.jit, static_argnames=("graphdef", "layers", "int4_form"))
def _forward(graphdef, params, lora, tokens, layers, int4_form):
    del int4_form  # a cache key only: jaxdlm.quant reads JAXDLM_INT4_MATMUL while this traces
    return forward(nnx.merge(graphdef, params), tokens, lora=lora, layers=layers)[0]


def _logits(model, tokens, layers="scan"):
    """Causal logits through the pure forward (one compiled program per parameter structure, loop and form)."""
    form = os.environ.get("JAXDLM_INT4_MATMUL", "dequantize")
    return _forward(model.graphdef, model.params, model.lora, tokens, layers, form)


@pytest.mark.parametrize("quant", [Quantization("int8"), Quantization("int4", head=True, group_size=16),
                                   Quantization("fp8", head=True)], ids=["int8", "int4+head", "fp8+head"])
def test_quantized_forward_equals_the_float_model_of_its_dequantized_weights(quant, seed, rng, monkeypatch):
    """Exact to its own weights: any gap to the float original is the weights' rounding, not the forward's."""
    base = Model.init(CFG, seed=seed)
    model = Model.init(CFG, seed=seed, quantize=quant)  # the same seed: base, quantized
    model.lora = random_lora(CFG, 4, seed, std=0.05)  # the draft LoRA (float) on top of the quantized o_proj
    assert model.quant == quant and model.dtype == jnp.float32
    assert {k for k in model.params["layers"] if k.endswith("_scale")} == {n + "_scale" for n in LINEARS}
    assert ("head_scale" in model.params) == quant.head
    # weights in their storage dtype; the embedding, norms and scales in the compute dtype
    assert model.params["layers"]["down_proj"][...].dtype == quant.storage_dtype
    assert {model.params["embed"][...].dtype, model.params["layers"]["attn_norm"]["weight"][...].dtype,
            model.params["layers"]["up_proj_scale"][...].dtype} == {jnp.dtype(jnp.float32)}
    base.lora = model.lora
    twin = float_twin(model)
    tokens = jnp.asarray(rng.integers(0, CFG.vocab_size, size=(2, 9)), jnp.int32)
    want = _logits(twin, tokens, "scan")
    assert rel_err(_logits(model, tokens, "scan"), want) <= 2e-6
    if quant.scheme == "int4":  # in bfloat16, the quantized models' compute dtype: the other loop, the other form
        bf16 = model.astype(jnp.bfloat16)
        for layers, form in (("unrolled", "dequantize"), ("scan", "grouped")):
            monkeypatch.setenv("JAXDLM_INT4_MATMUL", form)
            assert rel_err(_logits(bf16, tokens, layers), want) <= 2e-2, (layers, form)
    # and the quantized weights are close to the original ones (same seed)
    err = rel_err(_logits(model, tokens, "scan"), _logits(base, tokens, "scan"))
    assert 0 < err < {"int8": 0.02, "int4": 0.3, "fp8": 0.1}[quant.scheme]


def test_self_speculation_equals_ar_on_a_quantized_model(seed, rng):
    """float32 compute, greedy: linear (with the draft LoRA on the quantized o_proj) and quadratic
    self-speculation give the tokens of AR (the plain reference decoder of jaxdlm.testing), as on a float model."""
    model = quantize_model(tiny_model(seed, lora_rank=4), Quantization("int4", head=True, group_size=16))
    prompts = [rng.integers(4, CFG.vocab_size, size=n) for n in (3, 7)]
    reference = Reference(model)
    ar = np.asarray([ref_ar(reference, p, 12, ())[0] for p in prompts])
    for mode in ("linear_spec", "quadratic_spec"):
        res = jaxdlm.generate(model, prompts, mode=mode, max_new_tokens=12, block_length=4, eos_token_id=[])
        np.testing.assert_array_equal(res.tokens, ar, err_msg=mode)


def test_astype_keeps_the_quantized_weights(seed):
    model = Model.init(CFG, seed=seed, quantize="fp8")
    bf = model.astype(jnp.bfloat16)
    assert bf.quant == model.quant and bf.dtype == jnp.bfloat16
    assert bf.params["layers"]["q_proj"][...].dtype == jnp.float8_e4m3fn
    assert bf.params["layers"]["q_proj_scale"][...].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(bf.params["layers"]["q_proj"][...]).view(np.uint8),
                                  np.asarray(model.params["layers"]["q_proj"][...]).view(np.uint8))


def test_quantized_checkpoints_take_their_bytes(tmp_path, seed):
    """On disk and in the loaded model: 1 byte per int8 weight (fp8 stores as many), half a byte per int4 weight
    (packed at the checkpoint boundary), plus bfloat16 scales and the bfloat16 rest."""
    L, H, F, KVF, I, V = 2, 128, 128, 128, 512, 64
    cfg = ModelConfig(model_type="llama", vocab_size=V, hidden_size=H, intermediate_size=I, num_layers=L,
                      num_heads=2, num_kv_heads=2, head_dim=64)
    linear = L * (H * F + 2 * H * KVF + F * H + 3 * H * I)
    rest = 2 * V * H + 2 * L * H + H  # embedding, head, norms
    scales = {"int8": L * (F + 2 * KVF + H + 2 * I + H),
              "int4": L * ((H // 128) * (F + 2 * KVF + 2 * I) + (F // 128) * H + (I // 128) * H)}
    bf16 = 2 * (linear + rest)
    expected = {s: int(linear * (0.5 if s == "int4" else 1)) + 2 * (scales[s] + rest) for s in scales}
    base = jaxdlm.Model.init(cfg, seed=seed, dtype=jnp.bfloat16)
    for scheme, want in expected.items():
        model = quantize_model(base, scheme)
        path = jaxdlm.save(model, tmp_path / scheme)
        disk = sum(p.stat().st_size for p in (path / "params").rglob("*") if p.is_file())
        assert want <= disk <= want + 48_000, (scheme, disk, want)  # Orbax's metadata: ~30 kB
        assert disk < {"int4": 0.3, "int8": 0.55}[scheme] * bf16
        loaded = jaxdlm.load(path)
        assert weight_bytes(loaded.params) == want, scheme
        q = loaded.params["layers"]["gate_proj"][...]
        assert q.shape == (L, H, I) and q.dtype == loaded.quant.storage_dtype
        np.testing.assert_array_equal(np.asarray(q).astype(np.float32),
                                      np.asarray(model.params["layers"]["gate_proj"][...]).astype(np.float32))


def test_bad_input_one_clear_error_nothing_written(tmp_path, seed):
    """jaxdlm.load / save: an unknown scheme, float32 compute, int4 groups that do not fit, quantizing twice."""
    path = jaxdlm.save(Model.init(CFG, seed=seed, dtype=jnp.bfloat16), tmp_path / "bf16")
    with pytest.raises(ValueError, match="quantize='nf4' is not a quantization scheme; expected one of int8, int4"):
        jaxdlm.load(path, quantize="nf4")
    with pytest.raises(ValueError, match="int8 weights are dequantized into bfloat16 activations .*; dtype float32 "
                                         "asks for full precision"):
        jaxdlm.load(path, quantize="int8", dtype="float32")
    with pytest.raises(ValueError, match="hidden_size = 32 is not a multiple of 128: use int8 or fp8"):
        jaxdlm.load(path, quantize="int4")
    q8 = jaxdlm.load(path, quantize="int8")
    with pytest.raises(ValueError, match=r"already quantized \(int8\); quantize its float original"):
        quantize_model(q8, "int4")
    q8_path = jaxdlm.save(q8, tmp_path / "q8")
    with pytest.raises(ValueError, match=r"q8 is already quantized \(int8\); load it without quantize="):
        jaxdlm.load(q8_path, quantize="int8")
    with pytest.raises(ValueError, match="this model computes in float32: save model.astype"):
        jaxdlm.save(q8.astype(jnp.float32), tmp_path / "f32")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bf16", "q8"]


def test_training_refuses_quantized_params(seed):
    """A train state of fp8 weights would cast them to float32 without their scales: refused, naming a scale."""
    import optax

    from jaxdlm.training.step import init_state

    state = init_state(Model.init(CFG, seed=seed).params, optax.sgd(1e-3), seed)  # float params: accepted
    assert state.params["layers"]["q_proj"][...].dtype == jnp.float32
    for scheme in ("fp8", "int8"):
        with pytest.raises(ValueError, match=r"params hold quantized weights \(layers/\w+_scale\): training needs "
                                             r"float parameters"):
            init_state(Model.init(CFG, seed=seed, quantize=scheme).params, optax.sgd(1e-3), seed)


def test_scales_are_sharded_like_their_weights_output_axis(seed, rng, tmp_path):
    from jax.sharding import PartitionSpec as P

    mesh = jaxdlm.make_mesh("tensor=2,fsdp=2", devices=jax.devices()[:4])
    model = Model.init(CFG, seed=seed, quantize="int8")
    sharded = jaxdlm.shard_model(model, mesh)
    layers = sharded.params["layers"]
    assert layers["q_proj"][...].sharding.spec == P(None, "fsdp", "tensor")
    assert layers["q_proj_scale"][...].sharding.spec == P(None, None, "tensor")
    assert layers["down_proj_scale"][...].sharding.spec == P(None, None, "fsdp")
    tokens = rng.integers(0, CFG.vocab_size, size=(2, 6))
    assert rel_err(sharded.logits(tokens), model.logits(tokens)) <= 1e-6
    loaded = jaxdlm.load(jaxdlm.save(model.astype(jnp.bfloat16), tmp_path / "q8"), mesh=mesh)
    assert loaded.params["layers"]["o_proj_scale"][...].sharding.spec == P(None, None, "fsdp")
    # int4 scale groups follow the input axis: the 3 groups of 16 of down_proj's 48 inputs cannot be split over
    # tensor=2
    with pytest.raises(ValueError, match="does not divide the 3 quantization scale groups of layers/down_proj_scale along mlp"):
        jaxdlm.shard_model(Model.init(CFG, seed=seed, quantize=INT4), mesh)


@pytest.mark.parametrize("scheme", ["int8", "int4", "fp8"])
def test_quantized_decode_step_is_straight_line_over_the_layers(scheme):
    """The GPU's layer loop stays a loop-free program with quantized weights (each layer's dequantizing matmuls
    read static slices of the stacked arrays)."""
    from jaxdlm import KVCache

    quant = Quantization(scheme, group_size=16) if scheme == "int4" else Quantization(scheme)
    model = Model.init(CFG, quantize=quant, dtype=jnp.bfloat16)
    step = jax.jit(lambda p, t, c: forward(nnx.merge(model.graphdef, p), t, kind="causal", cache=c,
                                           layers="unrolled", impl="xla"))
    text = step.lower(model.params, jnp.ones((1, 1), jnp.int32), KVCache.init(CFG, 1, 64, jnp.bfloat16)).as_text()
    assert "stablehlo.while" not in text
    storage = {"int8": "i8", "int4": "i4", "fp8": "f8E4M3FN"}[scheme]
    assert f"x{storage}>" in text  # the weights enter the program quantized (no float copy made outside)
