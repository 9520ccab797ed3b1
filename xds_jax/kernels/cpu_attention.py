"""Decode's attention over the paged KV cache on CPU through xds-jax's kernel
(``paged_attention.cc``).

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


# Query tokens per sequence up to which the model's attention takes the kernel, each token a
# row: decode steps and speculative verify passes (k + 1); longer chunks keep XLA's prefill
# attention, whose dots share the keys among a sequence's tokens.
MAX_TOKENS = 8


def applies(q: jax.Array, k_pages: jax.Array) -> bool:
    """Whether the kernel takes query rows ``q [R, K, G, D]`` against pages ``k_pages``:
    bfloat16 queries with pages stored as their bits (``uint16``), or float32 both."""
    dtypes = (q.dtype, k_pages.dtype)
    return (dtypes in ((jnp.bfloat16, jnp.uint16), (jnp.float32, jnp.float32))
            and q.ndim == 4 and k_pages.ndim == 4 and available())


def paged_decode_primitive(reference):
    """The primitive ``(q [B, K, G, D], k_pages, v_pages [P, Pg, K, D], tables [B, N] int32,
    mask [B, N * Pg] bool; scale, cap) -> float32 [B, K, G, D]`` with ``reference`` (the XLA
    computation of the same, ``cap`` 0 for none) as its lowering off the kernel."""
    return cpu_matmul.primitive(TARGET, reference)
