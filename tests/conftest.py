"""Test configuration: CPU backend with 8 fake devices, no LLVM optimisation (fast compiles), full float32 matmuls,
fresh random seeds, one compilation cache for the whole session."""

import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# 8 fake CPU devices for the sharding tests (must be set before jax is imported)
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    _flags = (_flags + " --xla_force_host_platform_device_count=8").strip()
# No LLVM optimisation of the compiled CPU code: the suite compiles hundreds of small programs and this halves the
# compile time (the HLO passes, hence the numerics, are unchanged; only the few tests that run the embedded default
# model run slower).  CPU runs only (a GPU run of tests/test_pallas.py keeps the default).  docs/testing.md section 1.
if "xla_backend_optimization_level" not in _flags and os.environ["JAX_PLATFORMS"] == "cpu":
    _flags = (_flags + " --xla_backend_optimization_level=0").strip()
os.environ["XLA_FLAGS"] = _flags
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One persistent XLA compilation cache per test session, shared by the pytest-xdist workers (they inherit this
# environment from the controller, which imports this file first): a program that several tests or both workers
# compile (the eager primitives above all) is compiled once.  Removed when the session ends.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxdlm-tests-xla-")
    os.environ["JAXDLM_TESTS_OWN_CACHE"] = os.environ["JAX_COMPILATION_CACHE_DIR"]
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture
def seed(request):
    """A fresh seed per test (``JAXDLM_TEST_SEED`` replays one); printed so a failure can be replayed."""
    value = os.environ.get("JAXDLM_TEST_SEED")
    value = int(value) if value else int(np.random.SeedSequence().entropy % (2**31))
    print(f"\n[{request.node.name}] JAXDLM_TEST_SEED={value}")
    return value


@pytest.fixture
def rng(seed):
    return np.random.default_rng(seed)


def pytest_sessionfinish(session):
    """The controller (not an xdist worker) removes the session's compilation cache."""
    own = os.environ.get("JAXDLM_TESTS_OWN_CACHE")
    if own and not hasattr(session.config, "workerinput"):
        shutil.rmtree(own, ignore_errors=True)
