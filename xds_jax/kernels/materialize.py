"""``materialize(x)``: ``x`` unchanged, computed once into memory on CPU.

XLA:CPU fuses an element-wise producer into every consumer and recomputes it for each element
the consumer writes, broadcast dimensions included. Where the producer is dear and the
consumers many (RoPE's cos and sin of a step's positions, read by every layer's q and k
rotation, once per head), that is most of the consumers' time: the rotations of a 512-token
SmolLM2 prefill step took ~45 ms with the cos/sin fused, ~5 ms given them in memory.
``materialize`` passes its operand through a custom call (``materialize.cc``, the output
aliasing the operand), which XLA cannot fuse into, so the producer runs once and its
consumers read it. XLA's own ``optimization_barrier`` does not do this on CPU: it is removed
before fusion.

Only where the program is not partitioned (one device, or a ``shard_map`` body manual over
every axis; a GSPMD program would have to gather the operand for a custom call) and the
kernel library builds; everywhere else, other platforms included, it is the identity and XLA
fuses as before. The values are the same either way: only where they are computed changes.
"""

from __future__ import annotations

import functools

import jax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from xds_jax.kernels import build
from xds_jax.kernels.cpu_matmul import _unpartitioned

TARGET = "xds_materialize"
LIBRARY = "materialize"


@functools.cache
def available() -> bool:
    """Whether the kernel is built and registered (on first use)."""
    lib = build.load(LIBRARY)
    if lib is None:
        return False
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.XdsMaterialize), platform="cpu")
    return True


_prim = Primitive(TARGET)
_prim.def_impl(lambda x: x)
_prim.def_abstract_eval(lambda x: x)
batching.primitive_batchers[_prim] = lambda args, dims: (_prim.bind(*args), dims[0])
ad.primitive_jvps[_prim] = lambda primals, tangents: (_prim.bind(*primals), tangents[0])
_ffi_lowering = jax.ffi.ffi_lowering(TARGET, operand_output_aliases={0: 0})


def _cpu_lowering(ctx, x):
    if _unpartitioned(ctx.module_context.axis_context) and available():
        return _ffi_lowering(ctx, x)
    return [x]


mlir.register_lowering(_prim, lambda ctx, x: [x])
mlir.register_lowering(_prim, _cpu_lowering, platform="cpu")


def materialize(x: jax.Array) -> jax.Array:
    """``x``, computed into memory once rather than fused into each consumer (see the module
    docstring)."""
    return _prim.bind(x)
