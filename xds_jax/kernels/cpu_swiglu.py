"""SwiGLU's activation of a fused gate/up projection on CPU through xds-jax's kernel
(``swiglu.cc``).

``silu_mul(y [..., 2F], dtype)`` is ``silu(gate) * up`` for the gate/up pairs that
``xds_jax.model.fused`` interleaves (so that a tensor-parallel block of columns holds matching
pairs), rounded to ``dtype`` (bfloat16 or float32: what the down projection reads). XLA:CPU
runs the loop over the two strided halves at about a third of its rate over contiguous ones:
~0.8 ms a layer of a 512-token SmolLM2 bfloat16 prefill step (~25 ms of the step), where the
kernel splits 16 pairs at a time in registers. The arithmetic is XLA's (the exponential within
a few ulps of its own). A ``cpu_matmul.primitive``: the kernel where the program is not
partitioned (one device, a ``shard_map`` body manual over every axis), the XLA computation
everywhere else, under ``vmap`` and for derivatives; callers check ``applies`` (a CPU with
AVX-512 and the kernel built) first.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
from jax.interpreters import ad

from xds_jax.kernels import build, cpu_matmul
from xds_jax.model.fused import split_gate_up

log = logging.getLogger(__name__)

TARGET = "xds_silu_mul"
LIBRARY = "swiglu"
DTYPES = (jnp.bfloat16, jnp.float32)


@functools.cache
def available() -> bool:
    """Whether the kernel runs here (built, an x86 CPU with AVX-512); registers its FFI
    target on first use."""
    lib = build.load_x86_cpu(LIBRARY)
    if lib is None or not lib.xds_swiglu_ok():
        return False
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.XdsSiluMul), platform="cpu")
    log.info("SwiGLU's activation runs xds-jax's CPU kernel")
    return True


def reference(y: jax.Array, dtype) -> jax.Array:
    """XLA's ``silu(gate) * up`` of interleaved pairs ``y [..., 2F]``, as ``dtype``."""
    gate, up = split_gate_up(y)
    return (jax.nn.silu(gate) * up).astype(dtype)


_prim = cpu_matmul.primitive(TARGET, reference)  # the dtype: the reference's alone
ad.primitive_jvps[_prim] = lambda primals, tangents, dtype: jax.jvp(
    functools.partial(reference, dtype=dtype), tuple(primals),
    tuple(ad.instantiate_zeros(t) for t in tangents))


def applies(y: jax.Array, dtype) -> bool:
    """Whether the kernel takes the float32 gate/up output ``y`` to ``dtype``."""
    return (y.dtype == jnp.float32 and y.ndim >= 1 and y.shape[-1] % 2 == 0
            and jnp.dtype(dtype) in map(jnp.dtype, DTYPES) and available())


def silu_mul(y: jax.Array, dtype) -> jax.Array:
    """``silu(gate) * up`` of the interleaved pairs of ``y [..., 2F]`` (float32), as ``dtype``
    (bfloat16 or float32) through the kernel; callers check ``applies`` first."""
    return _prim.bind(y, dtype=jnp.dtype(dtype))
