"""Test process setup: virtual CPU devices and XLA flags before JAX starts, float32 matmuls at
full precision."""

import os

os.environ.setdefault("XDS_CPU_DEVICES", "8")
# Tests check correctness on tiny models, where compiling dominates: skip XLA's CPU backend
# optimisation passes (about a quarter less compile time). Benchmarks never import this.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_backend_optimization_level=0").strip()

from sharding.devices import configure_cpu_devices  # noqa: E402

configure_cpu_devices()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from xds_jax.compile_cache import enable_compilation_cache  # noqa: E402

enable_compilation_cache()


import gc  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _collect_a_module_s_garbage():
    """At the end of a module, collect everything again (objects kept by the per-test collection
    below were frozen; the module's fixtures are gone now). On the large virtual meshes the
    compiled programs go too: a 384-device process held ~17 GB by its last module."""
    yield
    if jax.device_count() >= 64:
        jax.clear_caches()
    gc.unfreeze()
    gc.collect()


@pytest.fixture(autouse=True)
def _collect_engines_after_each_test(_collect_a_module_s_garbage):
    """Free the device buffers of engines a test dropped before the next one builds more: an
    engine holds threads and callbacks in reference cycles, and each simulated deployment's KV
    pools may take a quarter of host memory (the 384-device process was OOM-killed without).
    What survives is frozen (``gc.freeze``), so the next test's collection walks only the
    objects made since: a full collection walked every module's, tokenizer's and fixture's
    objects after every test (about a fifth of the suite's time)."""
    yield
    gc.collect()
    gc.freeze()
