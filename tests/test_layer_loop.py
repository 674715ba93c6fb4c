"""The layer loop of inference forwards: straight-line code over the layers (no while loop), the same results as
the scanned loop that training uses, and KV cache writes in place.

Why it matters (measured on an H100, 8B shapes): inside a while loop XLA copies each layer's weight slice out of
the stacked arrays, which made a batch-1 forward cost 2.6x the weight-bandwidth floor; static layer indices run at
the floor.  These tests guard the structure on the CPU; the GPU figures come from experiments/bench_generate.py.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxdlm
from jaxdlm import KVCache, Model, ModelConfig, forward
from jaxdlm.generation import api, core
from jaxdlm.generation.knobs import Knobs
from jaxdlm.generation.sampling import Sampler
from jaxdlm.hf import model_from_pure_dict
from jaxdlm.testing import (Reference, diffusion_gap, ref_ar, ref_diffusion, ref_linear, ref_quadratic,
                            separated_case, tie_for)
from jaxdlm.lora import OProjLoRA

MASK = 3
CFG = ModelConfig(model_type="nemotron_labs_diffusion", vocab_size=64, hidden_size=32, intermediate_size=48,
                  num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8, block_size=4, mask_token_id=MASK,
                  eos_token_ids=(2,))


def _model(seed=0):
    return Model.init(CFG, seed=seed)


def _lora(seed=1, rank=4):
    ka, kb = jax.random.split(jax.random.PRNGKey(seed))
    return OProjLoRA(0.3 * jax.random.normal(ka, (CFG.num_layers, CFG.num_heads * CFG.head_dim, rank)),
                     0.3 * jax.random.normal(kb, (CFG.num_layers, rank, CFG.hidden_size)), jnp.float32(2.0))


def _cached_pass(model, kind, layers, impl="xla"):
    def step(params, tokens, cache, lora):
        return forward(nnx.merge(model.graphdef, params), tokens, kind=kind, cache=cache, lora=lora, impl=impl,
                       layers=layers, num_valid=jnp.array([4, 2]) if kind == "causal" else None)
    return step


def test_auto_layer_loop_by_backend(monkeypatch):
    """``layers="auto"``: scanned on a CPU, unrolled on a GPU (and TPU); ``JAXDLM_LAYERS`` overrides."""
    assert jaxdlm.model.resolve_layers("auto") == "scan"          # this suite runs on the CPU
    monkeypatch.setattr(jaxdlm.model.jax, "default_backend", lambda: "gpu")
    assert jaxdlm.model.resolve_layers("auto") == "unrolled"
    assert jaxdlm.model.resolve_layers("scan") == "scan"
    monkeypatch.setenv("JAXDLM_LAYERS", "scan")
    assert jaxdlm.model.resolve_layers("auto") == "scan"
    monkeypatch.setenv("JAXDLM_LAYERS", "loop")
    with pytest.raises(ValueError, match="JAXDLM_LAYERS='loop'"):
        jaxdlm.model.resolve_layers("auto")
    with pytest.raises(ValueError, match="layers='fast'"):
        jaxdlm.model.resolve_layers("fast")


def test_inference_forwards_lower_without_a_layer_loop(monkeypatch):
    """Cached causal / denoise passes and, on a GPU, Model.logits' uncached pass lower to straight-line code; the
    scanned loop (training) lowers to one while loop, so the check can see a loop when there is one."""
    model = _model()
    cache = KVCache.init(CFG, 2, 16)
    tokens = jnp.ones((2, 4), jnp.int32)
    for kind in ("causal", "denoise"):
        for layers, whiles in (("unrolled", 0), ("scan", 1)):
            text = jax.jit(_cached_pass(model, kind, layers)).lower(model.params, tokens, cache, _lora()).as_text()
            assert text.count("stablehlo.while") == whiles, (kind, layers)
    monkeypatch.setattr(jaxdlm.model.jax, "default_backend", lambda: "gpu")  # the GPU's default loop
    text = jaxdlm.model._logits_jit.lower(model.graphdef, model.params, tokens, "causal", "xla").as_text()
    assert "stablehlo.while" not in text


def _plan(mode, block=4):
    return core.Plan(mode=mode, max_new=8, block=block, cache_len=128, sampler=Sampler(mask_id=MASK), mask_id=MASK,
                     pad_id=0, impl="xla")


@pytest.mark.parametrize("mode,loops", [("ar", 1), ("diffusion", 2), ("linear_spec", 1), ("quadratic_spec", 1)])
def test_generation_programs_loop_over_steps_only(mode, loops):
    """A whole generation program has the decoding loops of its mode (diffusion: blocks and denoise steps) and
    nothing else: every forward inside them is straight-line over the layers."""
    model = _model()
    args = (model.params, None, jnp.ones((2, 64), jnp.int32), jnp.array([5, 3], jnp.int32), jax.random.PRNGKey(0),
            Knobs.make(), jnp.array([2, -1, -1, -1], jnp.int32))
    text = jax.jit(api.program(model.graphdef, _plan(mode))).lower(*args).as_text()
    assert _while_loops(text) == loops


def _while_loops(mlir: str) -> int:
    """``stablehlo.while`` ops of a lowered program outside the PRNG's own round loop (``threefry2x32``)."""
    functions = mlir.split("func.func ")[1:]
    return sum(f.count("stablehlo.while") for f in functions if not f.split("(")[0].split("@")[-1].startswith(
        "threefry"))


def test_unrolled_and_scanned_forwards_agree(rng):
    """Same logits, caches and parameter gradients from both layer loops (cached passes with a LoRA, ragged
    prefill lengths; the uncached two-stream training pass)."""
    model = _model()
    cache = KVCache.init(CFG, 2, 16)
    prompt = jnp.asarray(rng.integers(4, 64, (2, 4)), jnp.int32)
    block = jnp.asarray(rng.integers(3, 64, (2, 4)), jnp.int32)
    out = {}
    for layers in ("unrolled", "scan"):
        l1, c1 = jax.jit(_cached_pass(model, "causal", layers))(model.params, prompt, cache, None)
        l2, c2 = jax.jit(_cached_pass(model, "denoise", layers))(model.params, block, c1, _lora())

        def loss(params):
            tokens = jnp.concatenate([block, prompt], axis=1)
            logits, _ = forward(nnx.merge(model.graphdef, params), tokens, kind="two_stream", impl="xla",
                                layers=layers)
            return jnp.mean(jax.nn.log_softmax(logits)[..., 5])

        out[layers] = (l1, c1.k, c1.v, c1.length, l2, c2.k, c2.length, *jax.tree.leaves(jax.grad(loss)(model.params)))
    for a, b in zip(out["unrolled"], out["scan"]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)


def test_generate_same_tokens_with_either_layer_loop(rng):
    model = _model(2)
    prompts = [rng.integers(4, 64, size=n) for n in (3, 7)]
    for mode in ("diffusion", "quadratic_spec"):
        a = jaxdlm.generate(model, prompts, mode=mode, max_new_tokens=8, block_length=4, eos_token_id=())
        b = jaxdlm.generate(model, prompts, mode=mode, max_new_tokens=8, block_length=4, eos_token_id=(),
                            layers="scan")
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_array_equal(a.nfe, b.nfe)
    with pytest.raises(ValueError, match="layers='loop'"):
        jaxdlm.generate(model, prompts, mode="ar", max_new_tokens=8, layers="loop")


def test_generate_unrolled_equals_reference(rng):
    """The GPU's loop (unrolled) in every generation program, token for token against the plain reference
    decoders (the rest of the suite runs the CPU's default, the scanned loop)."""
    model = _model(3)
    head = nnx.to_pure_dict(model.params)
    head["head"] = head["head"] * 60.0  # peaked distributions: no float32 argmax near-ties
    model = model_from_pure_dict(CFG, head)
    gap = lambda R, p: diffusion_gap(R, p, 8, 4, 0.7)  # noqa: E731  (no float32 coin flips: docs/decoding.md §12)
    prompts = [separated_case([model], rng, 1, gap, tie_for(60.0), lo=n, hi=n)[1][0] for n in (3, 9)]  # ragged
    R = Reference(model)
    refs = {"ar": lambda p: ref_ar(R, p, 8, (2,)), "diffusion": lambda p: ref_diffusion(R, p, 8, (2,), 4, 0.7),
            "linear_spec": lambda p: ref_linear(R, p, 8, (2,), 4), "quadratic_spec": lambda p: ref_quadratic(R, p, 8,
                                                                                                              (2,), 4)}
    for mode, ref in refs.items():
        res = jaxdlm.generate(model, prompts, mode=mode, max_new_tokens=8, block_length=4, threshold=0.7,
                              layers="unrolled")
        for i, p in enumerate(prompts):
            want, nfe = ref(p)
            assert res.tokens[i, :res.lengths[i]].tolist() == want, mode
            assert res.nfe[i] == nfe, mode


def _instructions(hlo_text: str, shape: str):
    """Compiled-HLO instructions whose result has exactly ``shape`` (e.g. ``f32[3,2,2,16,8]``)."""
    pat = re.compile(r"^\s*(ROOT\s+)?%\S+ = " + re.escape(shape) + r"\{[^}]*\} (\S+)\(")
    return [m.group(2) for line in hlo_text.splitlines() if (m := pat.match(line))]


def test_cache_is_updated_in_place():
    """A donated decode step updates the stacked cache with scatters into the one buffer: no instruction copies
    the whole cache, and no layer-sized update slice (a copy of a layer) is written back into it."""
    model = _model()
    cache = KVCache.init(CFG, 2, 16)
    step = jax.jit(_cached_pass(model, "causal", "unrolled"), donate_argnums=(2,))
    text = step.lower(model.params, jnp.ones((2, 1), jnp.int32), cache, None).compile().as_text()
    full = f"f32[{CFG.num_layers},2,{CFG.num_kv_heads},16,{CFG.head_dim}]"
    ops = _instructions(text, full)
    assert ops, "the compiled step should produce the stacked cache"
    assert "copy" not in ops
    assert "dynamic-update-slice" not in ops
    assert all(op in ("fusion", "scatter", "parameter", "bitcast", "get-tuple-element", "tuple") for op in ops), ops
    assert ops.count("scatter") == 2 * CFG.num_layers  # one scatter per layer for k and for v (fused or not)
