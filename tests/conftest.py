"""Test process setup: virtual CPU devices and XLA flags before JAX starts, float32 matmuls at
full precision."""

import os

os.environ.setdefault("XDS_CPU_DEVICES", "8")
# Tests check correctness on tiny models, where compiling dominates: skip XLA's CPU backend
# optimisation passes (about a quarter less compile time) and emit fusions with XLA:CPU's
# elemental emitters instead of its MLIR fusion emitters (less than half the compile time of
# the speculative step programs: 64 -> 27 s over tests/serving/test_spec_decode.py); and
# compile each program's LLVM module whole rather than split for parallel codegen (the split's
# threads only contend with the other test process on a 2-core machine: 15% less compile time
# over test_spec_decode.py, run beside an unchanged process). All three change how code is
# generated, not what it computes. Benchmarks never import this.
for _flag in ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false",
              "--xla_cpu_parallel_codegen_split_count=1"):
    if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

from sharding.devices import configure_cpu_devices  # noqa: E402

configure_cpu_devices(collectives=True)  # the MA and EP tests (sharding.devices)

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from xds_jax.compile_cache import enable_compilation_cache  # noqa: E402
from xds_jax.memory_maps import make_room  # noqa: E402

enable_compilation_cache()

from hypothesis import settings  # noqa: E402

# CI (CI=true) runs the property and schema fuzz tests on examples fixed by each test rather
# than fresh ones every run, so a pass or a failure repeats; run locally they draw new ones.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI", "").lower() in ("1", "true"):
    settings.load_profile("ci")


import gc  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _collect_a_module_s_garbage():
    """At the end of a module, collect everything again (objects kept by the per-test collection
    below were frozen; the module's fixtures are gone now). The compiled programs go too on the
    large virtual meshes (a 384-device process held ~17 GB by its last module) and wherever
    the process's memory mappings near the kernel's limit (``xds_jax.memory_maps``: each
    compiled XLA:CPU kernel maps three regions, and a test process compiles thousands of
    programs; the 8-device ``tests/xds_jax`` process segfaulted at 63.6k mappings before)."""
    yield
    if jax.device_count() >= 64:
        jax.clear_caches()
    else:
        make_room("the next test module")
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
