"""Few-row bfloat16, float32 and int8 matmuls on CPU through xds-jax's kernel
(``few_row_matmul.cc``).

``few_row_matmul(x [M, K], w [N, K])`` is ``x @ w.T`` accumulated in float32, for bfloat16
(or float32) operands and ``M <= max_rows()``: a decode step's projections and
LM head, whose time is the weight stream at a few rows and the multiply-adds at tens
(batched decode, short prefills).
``few_row_int8_matmul`` is the same for weight-only int8 (``--quantization int8``), half the
bytes, with integer arithmetic equal to XLA's; it takes the float rows and splits them in 16-bit
fixed point itself (``split_rows``; as five XLA ops before every call they cost an int8
SmolLM2 decode step ~1 ms). Each is a JAX primitive whose CPU lowering is
the FFI kernel when the program is not partitioned (one device, or the body of a
``shard_map`` manual over every mesh axis: the operands are then whole local arrays) and
XLA's dot otherwise, so a GSPMD tensor-parallel program never gathers its sharded weights
for it; every other platform lowers it to the dot. ``vmap`` sees the dot, differentiation
(bfloat16) too.

Measured (SmolLM2's weight shapes, ``benchmarks.bench_matmul`` and ``docs/performance.md``):
on an AMD EPYC (AVX-512 BF16, 2 cores) bfloat16 at 1 / 2 / 4 rows about twice XLA's dots (the
weight stream), 16 / 32 / 64 rows 1.15-1.25x (the multiply-adds, in register tiles), level
around 256 rows; int8 ahead at every row count. On an Intel Xeon with AMX (2 cores), where
XLA's own bfloat16 dots run 2-3x the AVX-512 kernel from 16 rows, the kernel's AMX tiles
(``amx_tiles.h``, from 2 rows) run 1.7x / 1.9x / 1.8x / 1.4x XLA at 8 / 16 / 32 / 64 rows,
even at 128, behind from 256; weight-only int8 runs AMX-INT8 tiles from 2 rows too (exact
int32 sums, as the other paths).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir

from xds_jax.kernels import build

log = logging.getLogger(__name__)

TARGET = "xds_bf16_matmul"
F32_TARGET = "xds_f32_matmul"
INT8_TARGET = "xds_int8_matmul"
LIBRARY = "few_row_matmul"
# Rows up to which the kernels beat XLA's dots (SmolLM2's weight shapes, an AMD EPYC, and an
# Intel Xeon with AMX tiles, even at 128 rows; docs/performance.md). AVX-512: bfloat16 to 128
# rows (1.15-1.25x at 16-64, even around 256,
# behind from 512 where XLA's packed GEMM is at its peak), weight-only int8 at every count
# (1.3-1.9x the model's int32 dot, whose split halves double the rows). AVX2 (an AMD EPYC
# Zen 3, SmolLM2's matmuls weighed by their bytes, December 2026): bfloat16 1.4-1.5x XLA's dot
# at 8-16 rows, even at 32-128 (both ~85-105 GFLOP/s); int8 1.5-2x XLA's split and int32 dot
# at every count from 8 to 512 rows.
# AVX-512 without BF16 (an Intel Xeon, Ice Lake class; the widening blocks): bfloat16 1.48x
# XLA's dot at 32 rows, 1.34x at 64, 1.2x at 128, 1.1x at 256, so to MAX_ROWS as well.
MAX_ROWS = 128
MAX_ROWS_AVX2 = 32
# float32, AVX-512 BF16 CPUs (an AMD EPYC Zen 4): 1.2x XLA's dot at 1 row, 1.6-2x at 2-8,
# 1.3-1.6x at 16-64, 1.05-1.15x at 128-256, 0.98-1.07x at 512 (SmolLM2's shapes and 2048 x
# 5632 ones, in 4 x 6 tiles since December 2026; even with XLA's packed GEMM beyond). AVX2 (an
# AMD EPYC Zen 3, SmolLM2's matmuls weighed by their bytes; 3 x 4 tiles since December 2026's
# evening): 1.1-1.5x XLA's [N, K] dot at 1-16 rows, 1.3x at 32; from 48 rows the packed GEMM
# (f32_gemm.h; December 8, weights streamed from memory): 1.08x XLA at 64 rows, 1.08x at 128,
# 1.11x at 256, 1.04x at 512, behind at 1024 (0.94x). AVX-512 without BF16 (the Intel Xeon
# above): 1.5x at 32 rows, 1.03x at 128, 0.92x at 256 and 512.
MAX_ROWS_F32 = 512
MAX_ROWS_F32_AVX512 = 128
MAX_ROWS_F32_AVX2 = 512


# kernel_isa()'s levels, as the log and the benchmarks name them, and the most rows each takes
# through the kernel: (bfloat16, float32); int8 takes every row count at each
ISA_NAMES = {3: "AVX-512 BF16", 2: "AVX-512", 1: "AVX2"}
ROW_LIMITS = {3: (MAX_ROWS, MAX_ROWS_F32), 2: (MAX_ROWS, MAX_ROWS_F32_AVX512),
              1: (MAX_ROWS_AVX2, MAX_ROWS_F32_AVX2)}


@functools.cache
def kernel_isa() -> int:
    """The instruction set the kernels run on this CPU (3: AVX-512 with BF16 and VNNI; 2:
    AVX-512 F/BW/VL without BF16, Skylake to Ice Lake servers: float32 as at 3, bfloat16 widened
    to float32 FMAs, int8 on VNNI where the CPU has it; 1: AVX2 + FMA), or 0 where they are
    unavailable (not built, turned off, JAX's backend not the CPU, no support): registers the
    FFI targets on first use."""
    lib = build.load_x86_cpu(LIBRARY)
    if lib is None:
        return 0
    isa = int(lib.xds_few_row_isa())
    if isa:
        for target, symbol in ((TARGET, lib.XdsBf16Matmul), (F32_TARGET, lib.XdsF32Matmul),
                               (INT8_TARGET, lib.XdsInt8Matmul)):
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(symbol), platform="cpu")
        lib.xds_few_row_amx.restype = lib.xds_few_row_use_amx.restype = ctypes.c_int64
        lib.xds_few_row_use_gemm.restype = lib.xds_few_row_gemm_calls.restype = ctypes.c_int64
        amx = int(lib.xds_few_row_amx())
        log.info("few-row bfloat16 and int8 matmuls run xds-jax's CPU kernel (%s%s)",
                 ISA_NAMES[isa],
                 f"; on AMX tiles from {amx} rows" if amx else "")
    return isa


def use_isa(isa: int) -> int:
    """Run the kernels with at most instruction set ``isa`` (tests: 1 forces the AVX2 paths on
    an AVX-512 machine, 2 the paths without BF16 on an AVX-512 BF16 one); returns the one in
    use. Takes effect for calls made after it."""
    lib = build.load(LIBRARY)
    return int(lib.xds_few_row_use_isa(isa)) if lib is not None else 0


def use_vnni(on: bool) -> bool:
    """int8 matmuls on AVX-512 VNNI's blocks (where the CPU has VNNI) or, off, AVX2's (tests: the
    path of an AVX-512 CPU without VNNI, a Skylake-SP); returns whether VNNI is in use."""
    lib = build.load(LIBRARY) if kernel_isa() else None
    return bool(lib.xds_few_row_use_vnni(int(on))) if lib is not None else False


def amx_rows() -> int:
    """The fewest rows a bfloat16 or int8 matmul runs Intel AMX tiles at (0: no AMX here, or
    turned off by ``use_amx(0)``)."""
    lib = build.load(LIBRARY) if kernel_isa() else None  # kernel_isa set the return types
    return int(lib.xds_few_row_amx()) if lib is not None else 0


def use_amx(rows: int) -> int:
    """Run bfloat16 and int8 matmuls of ``rows`` rows or more on AMX tiles (0: never; tests
    and benchmarks compare the paths); returns ``amx_rows()``. Takes effect for calls made
    after it."""
    lib = build.load(LIBRARY) if kernel_isa() else None
    return int(lib.xds_few_row_use_amx(ctypes.c_int64(rows))) if lib is not None else 0


def use_gemm(rows: int) -> int:
    """Run float32 matmuls of ``rows`` rows or more (and 16 or more outputs) on AVX2 as the
    packed GEMM (``f32_gemm.h``: whole panels of 16 outputs, any rest on the blocks; 0: never,
    negative: unchanged; tests force it at a few rows, benchmarks compare); returns the rows
    now. Takes effect for calls made after it."""
    lib = build.load(LIBRARY) if kernel_isa() else None
    return int(lib.xds_few_row_use_gemm(ctypes.c_int64(rows))) if lib is not None else 0


def gemm_calls() -> int:
    """The float32 matmul calls that ran the packed GEMM in this process (tests)."""
    lib = build.load(LIBRARY) if kernel_isa() else None
    return int(lib.xds_few_row_gemm_calls()) if lib is not None else 0


def max_rows(int8: bool = False, float32: bool = False) -> int:
    """The most rows a matmul takes through the kernel on this CPU (0: the kernel is
    unavailable): bfloat16, int8 or float32 weights; see ``MAX_ROWS``."""
    limits = ROW_LIMITS.get(kernel_isa())
    if limits is None:
        return 0
    return sys.maxsize if int8 else limits[1] if float32 else limits[0]


def _takes(x_MK: jax.Array, w: jax.Array, w_transposed: bool, int8: bool,
           float32: bool = False) -> bool:
    return (w_transposed and w.ndim == 2 and x_MK.ndim == 2
            and 1 <= x_MK.shape[0] <= max_rows(int8, float32))


def applies(x_MK: jax.Array, w: jax.Array, w_transposed: bool) -> bool:
    """Whether ``x_MK @ w`` (``w [N, K]`` when ``w_transposed``) goes through the kernel:
    bfloat16 both (or float32 both), ``w`` output-major, at most ``max_rows()`` rows
    (``max_rows(float32=True)``), the kernel available."""
    dtypes = (x_MK.dtype, w.dtype)
    if dtypes == (jnp.float32, jnp.float32):
        return _takes(x_MK, w, w_transposed, int8=False, float32=True)
    return dtypes == (jnp.bfloat16, jnp.bfloat16) and _takes(x_MK, w, w_transposed, int8=False)


def applies_int8(x_MK: jax.Array, w_q: jax.Array, w_transposed: bool) -> bool:
    """The same for an int8 ``w_q`` (``xds_jax.model.quant``'s weight-only int8) and float32
    or bfloat16 rows."""
    return (w_q.dtype == jnp.int8 and x_MK.dtype in (jnp.float32, jnp.bfloat16)
            and _takes(x_MK, w_q, w_transposed, int8=True))


def _dot(x_MK, w_NK):
    dims = (((1,), (1,)), ((), ()))
    return jax.lax.dot_general(x_MK, w_NK, dims, preferred_element_type=jnp.float32)


def split_rows(x_MK: jax.Array, act_limit: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(hi, lo)`` int8 halves of the rows of ``x`` in 16-bit fixed point (``max|row|`` maps
    to ``act_limit``) and the row scales ``[..., M, 1]``: ``x ~= (256 * hi + lo) * scale``
    (``xds_jax.model.quant``; the int8 kernel computes the same, ``int8_rows.h``)."""
    x32 = x_MK.astype(jnp.float32)
    absmax = jnp.max(jnp.abs(x32), axis=-1, keepdims=True)
    # Multiplications by reciprocals, written out: XLA:CPU rewrites both divisions so anyway,
    # and the kernel must round as the program does.
    scale = jnp.where(absmax > 0, absmax, 1.0) * (np.float32(1) / np.float32(act_limit))
    x_q = jnp.round(x32 * (1 / scale)).astype(jnp.int32)
    hi = (x_q + 128) >> 8
    lo = x_q - hi * 256
    return hi.astype(jnp.int8), lo.astype(jnp.int8), scale


def split_rows_matmul(hi_MK: jax.Array, lo_MK: jax.Array, x_scale_M1: jax.Array,
                      w_q: jax.Array, scale: jax.Array, w_transposed: bool) -> jax.Array:
    """Rows split by ``quant._split_rows`` against int8 ``w_q`` (``[K, N]``, ``[N, K]`` when
    ``w_transposed``): both halves through one int32 dot, then ``((256 hi + lo) * x_scale) *
    scale``; float32 ``[M, N]``. XLA's arithmetic, which the CPU kernel reproduces (and
    lowers to where it does not run)."""
    m = hi_MK.shape[0]
    dims = (((1,), (1 if w_transposed else 0,)), ((), ()))
    y = jax.lax.dot_general(jnp.concatenate([hi_MK, lo_MK]), w_q, dims,
                            preferred_element_type=jnp.int32).astype(jnp.float32)
    return (y[:m] * 256.0 + y[m:]) * x_scale_M1 * scale.astype(jnp.float32)


def _int8_dot(x_MK, w_NK, scale_N, *, act_limit):
    """The int8 kernel's arithmetic: ``split_rows`` then ``split_rows_matmul`` on an
    output-major weight."""
    hi, lo, x_scale = split_rows(x_MK, act_limit)
    return split_rows_matmul(hi, lo, x_scale, w_NK, scale_N, True)


def _unpartitioned(axis_context) -> bool:
    """Whether a program being lowered sees whole arrays: one device, or a ``shard_map``
    body manual over every axis."""
    from jax._src import sharding_impls  # lowering contexts have no public name

    if isinstance(axis_context, sharding_impls.ShardingContext):
        return axis_context.num_devices == 1
    if isinstance(axis_context, sharding_impls.SPMDAxisContext):
        return set(axis_context.manual_axes) == set(axis_context.mesh.axis_names)
    return False


def _shape_dtype(out: jax.ShapeDtypeStruct) -> tuple:
    return out.shape, out.dtype


def primitive(target: str, reference) -> Primitive:
    """A primitive computing ``reference(*args, **params)`` (one array, of the shape and dtype
    the reference gives) that lowers to the FFI ``target`` on an unpartitioned CPU program
    and to ``reference`` everywhere else, ``vmap`` included. Numeric ``params`` are the
    kernel's float32 attributes; others (a result dtype) only shape the reference."""
    prim = Primitive(target)
    bound = functools.cache(lambda **params: jax.jit(functools.partial(prim.bind, **params)))
    prim.def_impl(lambda *args, **params: bound(**params)(*args))  # one program per params
    prim.def_abstract_eval(lambda *avals, **params: jax.core.ShapedArray(
        *_shape_dtype(jax.eval_shape(functools.partial(reference, **params), *avals))))
    reference_lowering = mlir.lower_fun(reference, multiple_results=False)
    ffi_lowering = jax.ffi.ffi_lowering(target)

    def cpu_lowering(ctx, *args, **params):
        if _unpartitioned(ctx.module_context.axis_context):
            attributes = {k: np.float32(v) for k, v in params.items()
                          if isinstance(v, (int, float))}
            return ffi_lowering(ctx, *args, **attributes)
        return reference_lowering(ctx, *args, **params)

    mlir.register_lowering(prim, reference_lowering)
    mlir.register_lowering(prim, cpu_lowering, platform="cpu")
    batching.primitive_batchers[prim] = lambda args, dims, **params: (
        jax.vmap(functools.partial(reference, **params), in_axes=dims)(*args), 0)
    return prim


_bf16_prim = primitive(TARGET, _dot)
_f32_prim = primitive(F32_TARGET, _dot)
_int8_prim = primitive(INT8_TARGET, _int8_dot)


@jax.custom_jvp
def few_row_matmul(x_MK: jax.Array, w_NK: jax.Array) -> jax.Array:
    """``x_MK @ w_NK.T`` in float32 through the kernel (see the module docstring); callers
    check ``applies`` first."""
    prim = _f32_prim if x_MK.dtype == jnp.float32 else _bf16_prim
    return prim.bind(x_MK, w_NK)


@few_row_matmul.defjvp
def _jvp(primals, tangents):
    x, w = primals
    dx, dw = tangents
    return few_row_matmul(x, w), _dot(dx, w) + _dot(x, dw)


def few_row_int8_matmul(x_MK: jax.Array, w_q_NK: jax.Array, scale_N: jax.Array,
                        act_limit: int) -> jax.Array:
    """``quant.int8_matmul`` through the kernel: float32 or bfloat16 rows split as
    ``split_rows`` splits them, against an output-major int8 ``w_q_NK`` with per-output
    ``scale_N``; exact integer sums, the same float32 result as XLA's int32 dot of the halves
    (the AVX2 path sums ``256 hi + lo`` at once: the same wherever ``|sum(hi w)|`` and
    ``|sum(lo w)|`` are at most ``2^24``, every ``K <= 1024``; beyond, at most one float32
    rounding apart). Callers check ``applies_int8`` first."""
    return _int8_prim.bind(x_MK, w_q_NK, scale_N.astype(jnp.float32), act_limit=act_limit)
