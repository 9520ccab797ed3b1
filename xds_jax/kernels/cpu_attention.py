"""Attention over the paged KV cache on CPU through xds-jax's kernels: decode's
(``paged_attention.cc``) and a prefill chunk's (``prefill_attention.cc``).

XLA:CPU runs a decode step's attention as a gather of each sequence's pages, small batched
dots and a softmax, which took 8 of a batch-8 SmolLM2 bfloat16 step's 28 ms and 18 of a
batch-32 step's 63 ms with ~80-token contexts (``docs/performance.md``). The kernel reads
each sequence's keys and values once, straight from the pages, with the XLA path's
arithmetic (float32 scores and softmax, the probabilities rounded to the values' dtype
before the value product). A few query tokens per sequence (a speculative verify pass) go in
as rows of their own, so each is computed as a one-token step computes it.
``paged_decode_primitive(reference)`` makes the JAX primitive: its CPU lowering is the
kernel where the program sees whole arrays (one device, or a fully manual ``shard_map``
body, as ``cpu_matmul``), ``reference`` (the XLA path) everywhere else and under ``vmap``.

A prefill chunk's attention (more query tokens than ``MAX_TOKENS``) went through XLA's dense
scores, softmax and value product in memory: 30-40% of a 512-token SmolLM2 prefill. Its kernel
takes a block of query tokens of one sequence and kv head at a time, both products as outer
products in registers over the keys each block sees (causal: half the dense work), the same
float32 softmax and rounding; ``paged_prefill_primitive`` makes its primitive likewise. On a
CPU with AMX-BF16, bfloat16 blocks with head dims a multiple of 32 run both products on AMX
tiles, 16 rows at a time (``prefill_amx.h``); without AVX-512 (and bfloat16 without AVX-512
BF16) AVX2 + FMA tiles on float32 panels (``prefill_avx2.h``).
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp

from xds_jax.kernels import build, cpu_matmul

log = logging.getLogger(__name__)

TARGET = "xds_paged_attention"
LIBRARY = "paged_attention"
PREFILL_TARGET = "xds_prefill_attention"
PREFILL_LIBRARY = "prefill_attention"


@functools.cache
def available() -> bool:
    """Whether the kernel runs here (x86-64 CPU backend, built, not turned off); registers
    its FFI target on first use."""
    lib = build.load_x86_cpu(LIBRARY)
    if lib is None:
        return False
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.XdsPagedAttention),
                                platform="cpu")
    log.info("decode attention over paged KV runs xds-jax's CPU kernel")
    return True


def use_isa(isa: int) -> int:
    """Run the decode kernel with at most instruction set ``isa`` (2: AVX-512, 1: AVX2 + FMA,
    0: plain loops; tests and benchmarks check the paths another CPU takes); returns the one
    in use."""
    lib = build.load_x86_cpu(LIBRARY) if available() else None
    return int(lib.xds_paged_attention_use_isa(isa)) if lib is not None else 0


# Query tokens per sequence up to which the model's attention takes the kernel, each token a
# row: decode steps and speculative verify passes (k + 1); longer chunks keep XLA's prefill
# attention, whose dots share the keys among a sequence's tokens.
MAX_TOKENS = 8


def _dtypes_ok(q: jax.Array, k_pages: jax.Array) -> bool:
    """bfloat16 queries with pages stored as their bits (``uint16``), or float32 both: the
    kernels' two dtypes."""
    return (q.dtype, k_pages.dtype) in ((jnp.bfloat16, jnp.uint16), (jnp.float32, jnp.float32))


def applies(q: jax.Array, k_pages: jax.Array) -> bool:
    """Whether the kernel takes query rows ``q [R, K, G, D]`` against pages ``k_pages``:
    ``_dtypes_ok``, the kernel available."""
    return _dtypes_ok(q, k_pages) and q.ndim == 4 and k_pages.ndim == 4 and available()


def paged_decode_primitive(reference):
    """The primitive ``(q [B, K, G, D], k_pages, v_pages [P, Pg, K, D], tables [B, N] int32,
    mask [B, N * Pg] bool; scale, cap) -> float32 [B, K, G, D]`` with ``reference`` (the XLA
    computation of the same, ``cap`` 0 for none) as its lowering off the kernel."""
    return cpu_matmul.primitive(TARGET, reference)


@functools.cache
def prefill_available() -> bool:
    """Whether the prefill kernel runs here, for bfloat16 and float32 alike (an x86-64 CPU
    with AVX2 + FMA or AVX-512, the kernel built); registers its FFI target on first use."""
    lib = build.load_x86_cpu(PREFILL_LIBRARY)
    if lib is None or not lib.xds_prefill_attention_ok():
        return False
    jax.ffi.register_ffi_target(PREFILL_TARGET, jax.ffi.pycapsule(lib.XdsPrefillAttention),
                                platform="cpu")
    log.info("prefill attention over paged KV runs xds-jax's CPU kernel")
    return True


def use_prefill_isa(isa: int) -> int:
    """Run the prefill kernel with at most instruction set ``isa`` (2: AVX-512, 1: AVX2 +
    FMA; tests and benchmarks check the path another CPU takes); returns the one in use, 0
    where the kernel does not run. Read at run time, so compiled programs follow it."""
    if not prefill_available():
        return 0
    return int(build.load(PREFILL_LIBRARY).xds_prefill_attention_use_isa(isa))


def prefill_amx() -> bool:
    """Whether bfloat16 prefill attention with head dims a multiple of 32 runs AMX tiles."""
    return (prefill_available()
            and bool(build.load(PREFILL_LIBRARY).xds_prefill_attention_amx()))


def use_prefill_amx(on: bool) -> bool:
    """Turn the prefill kernel's AMX tiles off (or back on, where the CPU has them); returns
    whether they are on. Read at run time, so compiled programs follow it (tests and
    benchmarks compare the AVX-512 path)."""
    if prefill_available():
        build.load(PREFILL_LIBRARY).xds_prefill_attention_use_amx(int(on))
    return prefill_amx()


def prefill_applies(q_BSKGD: jax.Array, k_pages: jax.Array) -> bool:
    """Whether the prefill kernel takes queries ``q_BSKGD`` against pages ``k_pages``: the
    dtypes of ``applies`` where this CPU runs them, head dims a multiple of 16."""
    return (_dtypes_ok(q_BSKGD, k_pages) and q_BSKGD.ndim == 5 and k_pages.ndim == 4
            and prefill_runs(q_BSKGD.shape[-1], q_BSKGD.dtype))


def prefill_runs(head_dim: int, dtype, mla: bool = False, platform: str = "cpu") -> bool:
    """Whether a model's prefill chunks take the prefill kernel on one device of
    ``platform``: GQA attention (not MLA) with ``head_dim`` a multiple of 16 in ``dtype``
    (bfloat16 or float32, the KV pages'), on a CPU that runs it. Its cost then follows the
    query positions, not the block table's width (``serving.core.runner.ModelRunner``'s
    prefill tables)."""
    return (platform == "cpu" and not mla and head_dim % 16 == 0
            and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))
            and prefill_available())


def paged_prefill_primitive(reference):
    """The primitive ``(q [B, S, K, G, D], k_pages, v_pages [P, Pg, K, D], tables [B, N]
    int32, positions [B, S] int32; scale, cap, window) -> float32 [B, S, K G D]``: causal
    attention of each query token (a negative position: padding, zeros) over the keys of its
    sequence at positions up to its own (and within ``window`` where it is not 0), with
    ``reference`` as its lowering off the kernel."""
    return cpu_matmul.primitive(PREFILL_TARGET, reference)
