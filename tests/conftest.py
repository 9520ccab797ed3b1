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
