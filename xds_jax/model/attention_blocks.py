"""Blockwise prefill attention: an online softmax over key blocks, flash-attention style.

Dense prefill scores are ``[B, K, G * S, L]`` float32: quadratic in the prompt (SmolLM2's 9
heads at 8192 tokens: 2.4 GB a layer), and half of them are masked anyway. Here queries go in
blocks of ``Tq`` and, for each, keys in blocks of ``Tk`` with a running max, sum and value
accumulator in float32, so at most ``[B, K, G * Tq, Tk]`` scores exist at once. Key blocks a
query block cannot see (after its last position; before its window on sliding-window layers)
are never visited: positions are run-time values, so the visited range is a dynamic
``fori_loop``, which XLA:CPU runs as a while loop that really skips the work.

Blocks need not divide S or L: the last block's start is pulled back to ``S - Tq`` (``L -
Tk``) and rows or keys already handled are recomputed (queries, same values) or masked (keys).

Shape legend: B rows, S query tokens, L key slots, K kv heads, G query heads per kv head,
D key dims, E value dims, Tq / Tk queries / keys per block, M = G * Tq.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

_MASKED = -1e30

# Cells of one row's dense scores ``H * S * L`` from which prefill goes blockwise, and the
# block sizes. Measured on SmolLM2's attention alone (9 heads, XLA:CPU, 2 shared cores):
# dense and blockwise tie up to 512 x 512 tokens (2.4M cells); at 512 x 2048 (9.4M) blockwise
# takes half the time, at 4096 x 4096 a sixth; 512 x 256 blocks were best or within noise
# of it among 128..1024 (docs/performance.md).
BLOCKWISE_MIN_SCORES = 1 << 22
Q_BLOCK = 512
K_BLOCK = 256

# ``load_kv(start)``: keys ``[B, Tk, K, D]`` and values ``[B, Tk, K, E]`` of slots
# ``start .. start + Tk`` (``start`` traced) in the matmul dtype.
LoadKV = Callable[[jax.Array], tuple[jax.Array, jax.Array]]


def use_blockwise(num_heads: int, num_queries: int, num_keys: int) -> bool:
    """Whether prefill of ``num_queries`` tokens over ``num_keys`` slots goes blockwise: only
    where one row's dense scores reach ``BLOCKWISE_MIN_SCORES`` cells (short prompts and the
    tiny test models keep the dense path, which is faster there)."""
    return num_queries > 1 and num_heads * num_queries * num_keys >= BLOCKWISE_MIN_SCORES


def key_block_size(num_keys: int, page_size: int, k_block: int | None = None) -> int:
    """Keys per block: ``k_block`` rounded down to whole pages (so a block is read from the
    block table without gathering the rest), at most ``num_keys``; 0 where a page is larger
    than a block (the caller then gathers all pages once). ``k_block`` None: ``K_BLOCK``."""
    k_block = min(K_BLOCK if k_block is None else k_block, num_keys)
    return k_block // page_size * page_size


def blockwise_attention(q_BSKGD: jax.Array, load_kv: LoadKV, num_keys: int, tk: int,
                        positions_BS: jax.Array, scale: float, cap: float | None = None,
                        window: int | None = None, q_block: int | None = None) -> jax.Array:
    """Causal attention of ``q_BSKGD`` over ``num_keys`` cached slots, ``[B, S, K * G * E]``
    float32, the layout of the dense path (``attention._prefill_attention``).

    Args:
        q_BSKGD: queries, in the dtype of the keys (both matmuls accumulate in float32);
            values have no more dims than keys (E <= D).
        load_kv: reads a block of ``tk`` keys (see ``LoadKV``).
        positions_BS: each query's position; negative for padding, whose output is 0.
        scale, cap: the softmax scale and Gemma 2's soft-capping ``cap * tanh(s / cap)``.
        window: a sliding window (key ``t`` seen by query ``p`` where ``p - window < t``).
        q_block: queries per block; None: ``Q_BLOCK``.
    """
    b, s, k, g, _ = q_BSKGD.shape
    tq = min(Q_BLOCK if q_block is None else q_block, s)
    num_q_blocks, num_k_blocks = -(-s // tq), -(-num_keys // tk)
    q_BKGSD = q_BSKGD.transpose(0, 2, 3, 1, 4)

    def query_block(i, out_BSF):
        start = jnp.minimum(i * tq, s - tq)  # the last block overlaps the one before
        q_BKMD = jax.lax.dynamic_slice_in_dim(q_BKGSD, start, tq, axis=3)
        q_BKMD = q_BKMD.reshape(b, k, g * tq, -1)
        pos_BT = jax.lax.dynamic_slice_in_dim(positions_BS, start, tq, axis=1)
        first, last = visible_key_blocks(pos_BT, tk, num_k_blocks, window)
        o_BKMF = _attend_query_block(q_BKMD, load_kv, e, pos_BT, first, last, tk, num_keys,
                                     scale, cap, window)
        o_BTF = o_BKMF.reshape(b, k, g, tq, -1).transpose(0, 3, 1, 2, 4).reshape(b, tq, -1)
        return jax.lax.dynamic_update_slice_in_dim(out_BSF, o_BTF, start, axis=1)

    e = jax.eval_shape(load_kv, jnp.int32(0))[1].shape[-1]
    # Every row is overwritten, so the loop starts from this layer's own queries: from zeros,
    # XLA:CPU merged all layers' zeros into one constant and scheduled each layer's copy of it
    # up front, all live at once (+4.7 MB a layer for SmolLM2 at 2048 tokens, 30 layers).
    out_BSF = q_BSKGD[..., :e].reshape(b, s, k * g * e).astype(jnp.float32)
    if num_q_blocks == 1:
        return query_block(0, out_BSF)
    return jax.lax.fori_loop(0, num_q_blocks, query_block, out_BSF)


def visible_key_blocks(pos_BT: jax.Array, tk: int, num_k_blocks: int,
                       window: int | None) -> tuple[jax.Array, jax.Array]:
    """Key blocks ``[first, last)`` that some real query of the block (any row) can see:
    up to the largest position, from the smallest position's window start; empty where
    every query is padding."""
    last = jnp.minimum(jnp.max(pos_BT) // tk + 1, num_k_blocks)  # max -1 (padding): 0
    if window is None:
        return jnp.int32(0), last.astype(jnp.int32)
    lowest = jnp.min(jnp.where(pos_BT >= 0, pos_BT, jnp.iinfo(jnp.int32).max // 2))
    first = jnp.maximum(lowest - window + 1, 0) // tk
    return first.astype(jnp.int32), last.astype(jnp.int32)


def _attend_query_block(q_BKMD, load_kv, e, pos_BT, first, last, tk, num_keys, scale, cap,
                        window) -> jax.Array:
    """One query block's attention over key blocks ``first .. last``, ``[B, K, M, E]``."""
    b, k, m, _ = q_BKMD.shape
    tq = pos_BT.shape[1]
    q_pos = pos_BT[:, None, None, :, None]  # [B, 1, 1, Tq, 1] against keys [Tk]

    def key_block(j, carry):
        max_BKM, sum_BKM, acc_BKME = carry
        start = jnp.minimum(j * tk, num_keys - tk)  # the last block overlaps the one before
        keys_BTKD, vals_BTKE = load_kv(start)
        scores = jnp.einsum("bkmd,btkd->bkmt", q_BKMD, keys_BTKD,
                            preferred_element_type=jnp.float32) * scale
        if cap is not None:
            scores = cap * jnp.tanh(scores / cap)
        k_pos = start + jnp.arange(tk)
        mask = (k_pos >= j * tk) & (k_pos <= q_pos)  # slots of an overlap are counted once
        if window is not None:
            mask &= k_pos > q_pos - window
        mask = jnp.broadcast_to(mask, (b, k, m // tq, tq, tk)).reshape(scores.shape)
        new_max = jnp.maximum(max_BKM, jnp.where(mask, scores, _MASKED).max(axis=-1))
        # Masked cells are zeroed, not exp(-1e30 - max): a row that has seen nothing yet has
        # max -1e30, and exp(0) would count every masked key.
        probs = jnp.where(mask, jnp.exp(scores - new_max[..., None]), 0.0)
        rescale = jnp.exp(max_BKM - new_max)
        acc = jnp.einsum("bkmt,btke->bkme", probs.astype(vals_BTKE.dtype), vals_BTKE,
                         preferred_element_type=jnp.float32)
        return (new_max, sum_BKM * rescale + probs.sum(axis=-1),
                acc_BKME * rescale[..., None] + acc)

    init = (jnp.full((b, k, m), _MASKED, jnp.float32), jnp.zeros((b, k, m), jnp.float32),
            jnp.zeros((b, k, m, e), jnp.float32))
    _, sum_BKM, acc_BKME = jax.lax.fori_loop(first, last, key_block, init)
    return acc_BKME / jnp.where(sum_BKM > 0, sum_BKM, 1.0)[..., None]
