"""SwiGLU's activation of a fused gate/up projection on CPU through xds-jax's kernel
(``swiglu.cc``).

``silu_mul(y [..., 2F], dtype)`` is ``silu(gate) * up`` for the gate/up pairs that
``xds_jax.model.fused`` interleaves (so that a tensor-parallel block of columns holds matching
pairs), rounded to ``dtype`` (bfloat16 or float32: what the down projection reads). XLA:CPU
runs the loop over the two strided halves at about a third of its rate over contiguous ones:
~0.8 ms a layer of a 512-token SmolLM2 bfloat16 prefill step (~25 ms of the step), where the
kernel splits 16 pairs at a time in registers. The arithmetic is XLA's (the exponential within
a few ulps of its own). A primitive like ``cpu_matmul``'s: the kernel where the program is not
partitioned (one device, a ``shard_map`` body manual over every axis) on a CPU with AVX-512
BF16, the XLA computation everywhere else, under ``vmap`` and for derivatives.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from xds_jax.kernels import build
from xds_jax.kernels.cpu_matmul import _unpartitioned

log = logging.getLogger(__name__)

TARGET = "xds_silu_mul"
LIBRARY = "swiglu"
DTYPES = (jnp.bfloat16, jnp.float32)


@functools.cache
def available() -> bool:
    """Whether the kernel runs here (built, an x86 CPU with AVX-512 BF16); registers its FFI
    target on first use."""
    lib = build.load_x86_cpu(LIBRARY)
    if lib is None or not lib.xds_swiglu_ok():
        return False
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.XdsSiluMul), platform="cpu")
    log.info("SwiGLU's activation runs xds-jax's CPU kernel")
    return True


def reference(y: jax.Array, dtype) -> jax.Array:
    """XLA's ``silu(gate) * up`` of interleaved pairs ``y [..., 2F]``, as ``dtype``."""
    pairs = y.reshape(y.shape[:-1] + (-1, 2))
    return (jax.nn.silu(pairs[..., 0]) * pairs[..., 1]).astype(dtype)


_prim = Primitive(TARGET)
_bound = functools.cache(lambda dtype: jax.jit(functools.partial(_prim.bind, dtype=dtype)))
_prim.def_impl(lambda y, dtype: _bound(dtype)(y))
_prim.def_abstract_eval(lambda y, dtype: jax.core.ShapedArray(
    y.shape[:-1] + (y.shape[-1] // 2,), dtype))
_reference_lowering = mlir.lower_fun(reference, multiple_results=False)
_ffi_lowering = jax.ffi.ffi_lowering(TARGET)


def _cpu_lowering(ctx, y, dtype):
    if _unpartitioned(ctx.module_context.axis_context) and available():
        return _ffi_lowering(ctx, y)
    return _reference_lowering(ctx, y, dtype=dtype)


mlir.register_lowering(_prim, _reference_lowering)
mlir.register_lowering(_prim, _cpu_lowering, platform="cpu")
batching.primitive_batchers[_prim] = lambda args, dims, dtype: (
    jax.vmap(functools.partial(reference, dtype=dtype), in_axes=dims)(*args), 0)
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
