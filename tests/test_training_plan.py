"""Fitting and speed of the train step: per-layer remat, the ``--check`` memory plan, the model-FLOP formula."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdlm import cli, compat
from jaxdlm.model import Model, forward
from jaxdlm.training import speed
from jaxdlm.training import step as step_lib
from jaxdlm.training.config import load_config
from jaxdlm.training.losses import LossConfig
from training_utils import counting_data, tiny_config


def test_remat_policies_give_equal_gradients(rng):
    """none / full / dots: the same float32 gradients through the scanned layer stack (training's), and full through
    the unrolled one; the checkpoint is really in the differentiated program (``--check`` below shows that
    ``[model] remat`` reaches the train step)."""
    mcfg = tiny_config(block_size=4, num_layers=2)
    model = Model.init(mcfg, seed=int(rng.integers(1 << 30)))
    tokens_BxT = jnp.asarray(counting_data(rng, 2, 32, mcfg.vocab_size))  # [x_t | x_0] of L = 16
    weight_BxTxV = jnp.asarray(rng.normal(size=(2, 32, mcfg.vocab_size)), jnp.float32)

    def loss(params, layers, remat):
        logits, _ = forward(nnx.merge(model.graphdef, params), tokens_BxT, kind="two_stream", layers=layers,
                            remat=remat)
        return jnp.sum(logits * weight_BxTxV)

    cases = (("scan", "none"), ("scan", "full"), ("scan", "dots"), ("unrolled", "full"))

    def all_grads(params):  # one program for every case: one compilation, without LLVM optimisation
        return [jax.grad(loss)(params, *case) for case in cases]

    grads = jax.jit(all_grads).lower(model.params).compile(compat.ANALYSIS_COMPILER_OPTIONS)(model.params)
    for case, got in zip(cases, grads):
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(grads[0])):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-7, err_msg=str(case))

    def checkpoints(layers, remat):  # the checkpoint primitive (remat2 in jax 0.10) in the gradient's program
        text = str(jax.make_jaxpr(lambda p: jax.grad(loss)(p, layers, remat))(model.params))
        return len(re.findall(r"\b(?:remat\d*|checkpoint)\[", text))

    assert checkpoints("scan", "full") >= 1 and checkpoints("unrolled", "full") >= 1
    assert checkpoints("scan", "none") == 0
    with pytest.raises(ValueError, match=r"remat='half' is not a rematerialisation policy; expected one of "
                                         r"\('none', 'full', 'dots'\)"):
        loss(model.params, "scan", "half")


ADAPTER = {"rank": 1, "alpha": 2.0, "targets": ["q_proj", "v_proj"]}  # the plan's adapter run (a tiny model)


@pytest.fixture(scope="module")
def plan_configs(tmp_path_factory):
    """``remat -> config path`` of a 4-layer tiny model at L = 256 (one sequence per device of the 8)."""
    tmp = tmp_path_factory.mktemp("plan")
    mcfg = tiny_config(block_size=4, num_layers=4)
    (tmp / "model.json").write_text(json.dumps(mcfg.to_dict()))
    np.save(tmp / "train.npy", counting_data(np.random.default_rng(0), 8, 256, mcfg.vocab_size))
    (tmp / "no_weights").mkdir()  # the adapter run's base: an empty folder, which a plan must not read
    paths = {}
    for name, remat, adapter in (("none", "none", None), ("full", "full", None), ("adapter_int8", "none", ADAPTER)):
        conf = {"model": {"config": "model.json", "remat": remat}, "data": {"train": "train.npy", "seq_len": 256},
                "optim": {"batch_size": jax.device_count()}, "run": {"out_dir": "run"}}
        if adapter is not None:
            conf["model"]["init"] = "no_weights"
            conf["adapter"] = {"enabled": True, "base_dtype": "int8", **adapter}
        paths[name] = tmp / f"{name}.json"
        paths[name].write_text(json.dumps(conf))
    return paths


def _check(path, capsys, *extra):
    """``jaxdlm train PATH --check --json *extra``: (exit status, the JSON of stdout's last line, stderr)."""
    rc = cli.main(["train", str(path), "--check", "--json", "--no-compile-cache", *extra])
    out, err = capsys.readouterr()
    return rc, json.loads(out.strip().splitlines()[-1]), err


def test_check_memory_plan_json_and_remat(plan_configs, capsys):
    rc, none, _ = _check(plan_configs["none"], capsys)
    assert rc == 0
    assert set(none) == {"devices", "memory", "device_memory", "fits"}
    assert set(none["memory"]) == {"params", "optimizer", "temporaries", "total"}
    assert none["devices"] == jax.device_count() and none["device_memory"] is None and none["fits"] is None  # CPU
    mem = none["memory"]
    assert all(isinstance(v, int) and v > 0 for v in mem.values())
    n_params = Model.abstract(tiny_config(block_size=4, num_layers=4)).config.num_params()
    assert n_params * 4 / jax.device_count() <= mem["params"] <= n_params * 4  # float32 master copy, sharded
    assert mem["optimizer"] >= 2 * mem["params"]  # Adam's two moments
    assert mem["total"] >= mem["params"] + mem["optimizer"] + mem["temporaries"]
    rc, full, _ = _check(plan_configs["full"], capsys)
    assert rc == 0 and full["memory"]["params"] == mem["params"]
    assert full["memory"]["temporaries"] < 0.7 * mem["temporaries"], (full, none)


def test_check_stops_a_plan_that_does_not_fit(plan_configs, capsys):
    rc, plan, err = _check(plan_configs["none"], capsys, "--device-memory", "1000000")
    assert rc == 1 and plan["fits"] is False and plan["device_memory"] == 1000000
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "the biggest part is temporaries" in lines[0] and 'remat = "full"' in lines[0]
    assert "optim.batch_size" in lines[0] and "optim.accum" in lines[0]
    rc, plan, err = _check(plan_configs["none"], capsys, "--device-memory", str(10**12))
    assert rc == 0 and plan["fits"] is True and not err
    for flag in ("--device-memory", "--peak-tflops"):  # refused by name before anything compiles or runs
        assert cli.main(["train", str(plan_configs["none"]), flag, "0", "--no-compile-cache"]) == 2
        assert re.search(rf"{flag} 0(\.0)? must be > 0", capsys.readouterr().err)


def test_check_memory_plan_of_an_adapter_run(plan_configs, capsys):
    """An int8-base adapter run's plan (the base's weights never read: model.init is an empty folder): params are the
    int8 base plus the adapter, far below a full run's float32 master copy; the optimizer state is Adam's two
    moments of the float32 adapter only."""
    from jaxdlm import sharding as sh
    from jaxdlm.adapter import Adapter, AdapterConfig, adapter_shardings
    from jaxdlm.model import param_layout
    from jaxdlm.training import plan as plan_lib

    rc, plan, _ = _check(plan_configs["adapter_int8"], capsys)
    assert rc == 0 and set(plan["memory"]) == {"params", "optimizer", "temporaries", "total"}
    _, full, _ = _check(plan_configs["none"], capsys)  # (compiled once per process: cached)
    mem, full_mem = plan["memory"], full["memory"]
    mcfg, acfg = tiny_config(block_size=4, num_layers=4), AdapterConfig(**ADAPTER)
    layout, mesh = param_layout(mcfg), sh.make_mesh({"fsdp": jax.device_count()})
    adapter_bytes = plan_lib._shard_bytes(jax.tree.map(  # this device's shard of the float32 adapter
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), Adapter.abstract(layout, acfg),
        adapter_shardings(layout, acfg, mesh)))
    assert 2 * adapter_bytes <= mem["optimizer"] <= 2 * adapter_bytes + 256  # mu, nu (+ step counters)
    # int8 weights (1 byte) against float32 masters (4): under half even with this tiny model's replicated scales
    assert adapter_bytes < mem["params"] < 0.5 * full_mem["params"], (plan, full)
    assert mem["params"] + mem["optimizer"] < 0.25 * (full_mem["params"] + full_mem["optimizer"]), (plan, full)
    assert mem["total"] >= mem["params"] + mem["optimizer"] + mem["temporaries"]
    # an adapter run whose parameters do not fit is first told to shrink its base
    too_big = {"devices": 8, "memory": {"params": 3, "optimizer": 1, "temporaries": 2, "total": 6},
               "device_memory": 5, "fits": False}
    line = plan_lib.advice(too_big, load_config(plan_configs["adapter_int8"]))
    assert "the biggest part is params" in line and 'set adapter.base_dtype = "int4" (now "int8")' in line, line
    assert "raise mesh.fsdp" in line, line


def test_abstract_adapter_base_is_the_prepared_base():
    """The plan's abstract base (``abstract_base``) has the shapes and dtypes of the base a run prepares and adds the
    adapter to, for a bfloat16 and an int8 base."""
    from jaxdlm.adapter import AdapterConfig
    from jaxdlm.model import add_adapter
    from jaxdlm.training import adapter as tune

    mcfg, acfg = tiny_config(block_size=4), AdapterConfig(**ADAPTER)
    model = Model.init(mcfg, seed=0)
    for base_dtype in ("bfloat16", "int8"):
        real = add_adapter(tune.prepare_base(model, base_dtype), acfg)
        abstract = tune.abstract_base(mcfg, acfg, base_dtype)
        want = jax.tree.map(lambda x: (x.shape, x.dtype), nnx.to_pure_dict(real.params))
        assert jax.tree.map(lambda x: (x.shape, x.dtype), nnx.to_pure_dict(abstract.params)) == want, base_dtype
        assert abstract.graphdef == real.graphdef, base_dtype


def test_flop_formula_matches_xla_cost_analysis():
    """The formula against XLA's count for one train step of a 1-layer model (XLA counts a loop body once: one
    layer, one micro-batch, unchunked cross-entropy keep every loop at one trip) where the matmuls dominate."""
    mcfg = tiny_config(block_size=4, num_layers=1, hidden_size=256, intermediate_size=1024, num_heads=4,
                       num_kv_heads=2, head_dim=64)
    loss_cfg = LossConfig(ce_chunk=None)
    abstract = Model.abstract(mcfg)
    tx = step_lib.make_optimizer(step_lib.OptimConfig())
    state = jax.eval_shape(lambda p: step_lib.init_state(p, tx, 0), abstract.params)
    b, L = 2, 32
    batch = {"tokens": jax.ShapeDtypeStruct((1, b, L), jnp.int32), "loss_mask": jax.ShapeDtypeStruct((1, b, L), bool)}
    lowered = step_lib.make_train_step(abstract.graphdef, tx, loss_cfg).lower(state, batch)
    compiled = compat.compile_for_analysis(lowered)
    ours = speed.train_flops_per_token(mcfg, loss_cfg, L) * b * L
    assert abs(ours / compat.compiled_flops(compiled) - 1) < 0.10


def test_adapter_flop_formula_matches_xla_cost_analysis():
    """The adapter step's formula (base matmuls 2x: no weight gradient; adapter and attention 3x) against XLA's
    count for one adapter step of a 1-layer float32 base, as above; rank 64 on every projection, so that the adapter's
    matmuls are a third of the count and a formula that dropped them (or counted the base 3x) is off by > 10 %."""
    from jaxdlm.adapter import TARGETS, Adapter, AdapterConfig
    from jaxdlm.model import param_layout
    from jaxdlm.training import adapter as tune

    mcfg = tiny_config(block_size=4, num_layers=1, hidden_size=256, intermediate_size=1024, num_heads=4,
                       num_kv_heads=2, head_dim=64)
    loss_cfg, acfg = LossConfig(ce_chunk=None), AdapterConfig(rank=64, alpha=64.0, targets=TARGETS)
    base = tune.abstract_base(mcfg, acfg, "float32")
    tx = step_lib.make_optimizer(step_lib.OptimConfig())
    state = jax.eval_shape(lambda a: step_lib.init_state(a, tx, 0), Adapter.abstract(param_layout(mcfg), acfg))
    b, L = 2, 32
    batch = {"tokens": jax.ShapeDtypeStruct((1, b, L), jnp.int32), "loss_mask": jax.ShapeDtypeStruct((1, b, L), bool)}
    lowered = tune.make_adapter_step(base.graphdef, tx, loss_cfg).lower(state, base.params, batch)
    xla = compat.compiled_flops(compat.compile_for_analysis(lowered))
    ours = speed.adapter_flops_per_token(mcfg, loss_cfg, L, acfg) * b * L
    print(f"adapter step FLOPs: formula / XLA = {ours / xla:.4f}")
    assert abs(ours / xla - 1) < 0.10, (ours, xla)


def test_flop_formula_parts():
    """Attention pairs of each mask counted directly from the mask predicate; known device peaks."""
    from jaxdlm.attention import masks

    L, n = 16, 4
    for kind, info in (("two_stream", masks.two_stream_info(1, L, n)),
                       ("two_stream_bidirectional", masks.two_stream_info(1, L, n, bidirectional=True))):
        assert speed.attended_pairs(kind, L, n) == int(masks.allowed(info, info).sum())
    causal = masks.sequence_info(jnp.arange(L)[None], "causal")
    assert speed.attended_pairs("causal", L, n) == int(masks.allowed(causal, causal).sum())
    assert speed.peak_tflops("NVIDIA H100 80GB HBM3") == speed.peak_tflops("NVIDIA H200") == 989.0
    assert speed.peak_tflops("cpu") is None and speed.peak_tflops("NVIDIA H100 PCIe") is None
    assert speed.peak_tflops("cpu", 2.5) == 2.5
    # a sliding window that cuts the sequence is not modelled: no FLOP count (mfu null), not an over-count
    windowed, obj = tiny_config(block_size=4, sliding_window=8), LossConfig()
    assert speed.train_flops_per_token(windowed, obj, 16) is None
    plain = tiny_config(block_size=4)
    assert speed.train_flops_per_token(windowed, obj, 8) == speed.train_flops_per_token(plain, obj, 8)


def test_check_without_a_plan_still_ends_with_json(plan_configs, capsys):
    """A mesh this machine cannot hold (the plan compiles on its devices) and a draft-LoRA run: validation passes
    (exit 0), one line says why there is no plan, and ``--json`` still ends with an object that says so."""
    conf = json.loads(plan_configs["none"].read_text())
    cases = {"mesh": dict(conf, mesh={"data": 2, "fsdp": 2 * jax.device_count()},
                          optim={"batch_size": 4 * jax.device_count()}),
             "lora": dict(conf, lora={"enabled": True}, model=dict(conf["model"], init="no_weights"))}
    for name, case in cases.items():
        path = plan_configs["none"].parent / f"noplan_{name}.json"
        path.write_text(json.dumps(case))
        rc, got, _ = _check(path, capsys)
        assert rc == 0 and got["memory"] is None and got["fits"] is None, (name, got)
        assert ("does not fit the" in got["reason"]) if name == "mesh" else ("lora" in got["reason"]), got
