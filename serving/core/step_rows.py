"""A step's rows as host arrays: scheduled sequences padded into the bucketed shapes a step
program is compiled for (``serving.core.runner``).

Shape legend: B rows, S tokens per row, N blocks per row.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from xds_jax.generate import bucket
from xds_jax.model.params import param_bytes


@dataclasses.dataclass(frozen=True)
class RowBatch:
    """Host arrays of one program launch, and which rows sample."""

    tokens_BS: np.ndarray
    positions_BS: np.ndarray
    tables_BN: np.ndarray
    last_B: np.ndarray
    sampling_seqs: list  # per row: the Sequence to sample for, or None
    source_B: np.ndarray | None = None  # per row: index of its input token on device, or -1


# Smallest buckets: a few padded rows or key slots cost less than another compiled program.
MIN_DECODE_ROWS = 4
MIN_PREFILL_WIDTH = 16
MIN_CONTEXT_TOKENS = 128
# Decode rows keep MIN_DECODE_ROWS except where a step streams enough weight bytes that
# padding one live row to four costs more than a compile: on XLA:CPU a 1-row SmolLM2-135M step
# ran 1.78x faster than the 4-row one in float32 (matmul-vector at ~30 GB/s against ~15 GB/s
# for 4 rows), 1.09x in bfloat16 (docs/performance.md). Tiny models keep the 4-row floor.
ONE_ROW_DECODE_BYTES = 32 << 20


def decode_rows_min(params: dict) -> int:
    """The smallest decode bucket for these weights (see ``ONE_ROW_DECODE_BYTES``)."""
    return 1 if param_bytes(params) >= ONE_ROW_DECODE_BYTES else MIN_DECODE_ROWS


def table_blocks(longest: int, block_size: int) -> int:
    """The block-table width bucket of a step whose longest table is ``longest`` blocks:
    a power of two, and MIN_CONTEXT_TOKENS' worth at least."""
    return bucket(longest, max(1, MIN_CONTEXT_TOKENS // block_size))


def build_rows(scheduled: list, rows_min: int, width_min: int, block_size: int,
               sources: dict[int, int] | None = None, blocks: int | None = None) -> RowBatch:
    """Pad scheduled sequences (objects with seq, start, num_tokens, block_table,
    is_last_chunk) into bucketed host arrays. Padding uses position -1 (writes nothing).
    ``sources``: seq id -> index of the token in flight on device that a decode row of that
    sequence takes as input (its host token is then a 0 placeholder). Block tables are the
    longest table's width, bucketed, or ``blocks`` where that is wider (the runner's prefill
    tables)."""
    n = len(scheduled)
    rows = bucket(n, rows_min)
    counts = [s.num_tokens for s in scheduled]
    width = bucket(max(counts), width_min)
    blocks = max(blocks or 0, table_blocks(max(len(s.block_table) for s in scheduled),
                                           block_size))
    assert blocks * block_size >= max(s.start + s.num_tokens for s in scheduled), \
        "block table too short"
    # Few numpy calls: each costs tens of microseconds on caches cold from the step before.
    tokens = np.zeros((rows, width), np.int32)
    positions = np.full((rows, width), -1, np.int32)
    if width == 1:  # decode rows
        positions[:n, 0] = [s.start for s in scheduled]
    else:
        starts, cols = np.array([s.start for s in scheduled], np.int32), np.arange(width)
        positions[:n] = np.where(cols < np.array(counts)[:, None], starts[:, None] + cols, -1)
    tables = np.zeros((rows, blocks), np.int32)
    pad = [0] * blocks
    tables[:n] = [[*s.block_table, *pad[len(s.block_table):]] for s in scheduled]
    last = np.zeros((rows,), np.int32)
    last[:n] = [c - 1 for c in counts]
    sampling: list = [s.seq if s.is_last_chunk else None for s in scheduled] + [None] * (rows - n)
    source = None
    if sources:
        source = np.full((rows,), -1, np.int32)
        source[:n] = [sources.get(s.seq.seq_id, -1) for s in scheduled]
    for i, s in enumerate(scheduled):
        if source is None or source[i] < 0:
            tokens[i, : s.num_tokens] = s.seq.ids_between(s.start, s.start + s.num_tokens)
    return RowBatch(tokens, positions, tables, last, sampling, source)
