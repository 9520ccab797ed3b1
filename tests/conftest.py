"""Test process setup: virtual CPU devices before JAX starts, float32 matmuls at full precision."""

import os

os.environ.setdefault("XDS_CPU_DEVICES", "8")

from sharding.devices import configure_cpu_devices  # noqa: E402

configure_cpu_devices()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from xds_jax.compile_cache import enable_compilation_cache  # noqa: E402

enable_compilation_cache()
