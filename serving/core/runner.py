"""Compiled step programs over paged KV for one DP group.

A step holds decode rows (one token each) and prefill rows (a chunk each), each kind launched
separately, as one fused step program, or (``staged=True``) as a chain of separately jitted
stage programs (embed, per layer attention and FFN/MoE, head), which compile once per shape
whatever the depth but pay a dispatch per stage (SmolLM2 on 2 CPU cores: ~2 s instead of ~9 s
to compile a shape, ~30% slower decode). Shapes come from buckets: rows (powers of two up to
``max_num_seqs``), tokens per row (powers of two from 16 up to the chunk size) and block-table
width (powers of two). The KV pages are donated through every program, so they are updated in
place. The same bucket never compiles twice: ``compile_count`` lets tests and benchmarks check
steady state.

Shape legend: B rows, S tokens per row, N blocks per row, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import logging
import threading

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from collectives.p2p import gather_blocks, scatter_blocks_donated
from sharding.params import kv_page_shardings, param_shardings, tp_mesh
from xds_jax.generate import bucket, model_step, sample_rows
from xds_jax.model.config import ModelConfig
from xds_jax.model.params import model_dtype
from xds_jax.model.reference import new_caches, staged_step
from xds_jax.multihost import place, place_tree, zeros_tree

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RowBatch:
    """Host arrays of one program launch, and which rows sample."""

    tokens_BS: np.ndarray
    positions_BS: np.ndarray
    tables_BN: np.ndarray
    last_B: np.ndarray
    sampling_seqs: list  # per row: the Sequence to sample for, or None


# Smallest buckets: a few padded rows or key slots cost less than another compiled program.
MIN_DECODE_ROWS = 4
MIN_PREFILL_WIDTH = 16
MIN_CONTEXT_TOKENS = 128


def build_rows(scheduled: list, rows_min: int, width_min: int, block_size: int) -> RowBatch:
    """Pad scheduled sequences (objects with seq, start, num_tokens, block_table,
    is_last_chunk) into bucketed host arrays. Padding uses position -1 (writes nothing)."""
    rows = bucket(len(scheduled), rows_min)
    width = bucket(max(s.num_tokens for s in scheduled), width_min)
    blocks = bucket(max(len(s.block_table) for s in scheduled),
                    max(1, MIN_CONTEXT_TOKENS // block_size))
    tokens = np.zeros((rows, width), np.int32)
    positions = np.full((rows, width), -1, np.int32)
    tables = np.zeros((rows, blocks), np.int32)
    last = np.zeros((rows,), np.int32)
    sampling: list = [None] * rows
    for i, s in enumerate(scheduled):
        ids = s.seq.all_ids[s.start : s.start + s.num_tokens]
        tokens[i, : s.num_tokens] = ids
        positions[i, : s.num_tokens] = np.arange(s.start, s.start + s.num_tokens)
        tables[i, : len(s.block_table)] = s.block_table
        last[i] = s.num_tokens - 1
        if s.is_last_chunk:
            sampling[i] = s.seq
    assert blocks * block_size >= int(positions.max()) + 1, "block table too short"
    return RowBatch(tokens, positions, tables, last, sampling)


class ModelRunner:
    """Owns a group's parameters and KV pages on its devices and runs scheduled steps.

    ``device`` is one device, or a list of devices forming a tensor-parallel group: weights
    split by heads and MLP width and KV pages by KV heads (``sharding.params``), inputs
    replicated, and XLA's SPMD partitioner adds the collectives.
    """

    def __init__(self, params: dict, cfg: ModelConfig, num_blocks: int, block_size: int,
                 device: jax.Device | list | None = None, staged: bool = False):
        self.cfg = cfg
        self.staged = staged
        self.block_size = block_size
        self.num_blocks = num_blocks
        devices = list(device) if isinstance(device, list | tuple) else [device or jax.devices()[0]]
        self.devices = devices
        self.device = devices[0]
        dtype = model_dtype(params)
        if len(devices) == 1:
            self.input_sharding = self.device
            self.params = place_tree(params, self.device)
            cache_shardings = self.device
        else:
            mesh = tp_mesh(devices)
            self.input_sharding = NamedSharding(mesh, PartitionSpec())
            self.params = place_tree(params, param_shardings(params, cfg, mesh))
            cache_shardings = None
        # Built where they live, shard by shard (a group may lie on another process).
        shapes = jax.eval_shape(lambda: new_caches(cfg, num_blocks, block_size, dtype))
        if cache_shardings is None:
            cache_shardings = kv_page_shardings(shapes, cfg, mesh)
        self.caches = zeros_tree(shapes, cache_shardings)
        self.lock = threading.Lock()  # held while a step swaps the (donated) pages
        self._shapes_seen: set[tuple] = set()
        self.compile_count = 0

    def spec_stats(self) -> dict:
        """No drafting here (``serving.core.spec_decode.SpecRunner`` counts its drafts)."""
        return {}

    # -- KV pages in and out (PD transfers) ---------------------------------------------------
    @property
    def kv_sharding(self):
        """Where pages given to ``import_kv`` must lie: as this runner's pages lie."""
        return jax.tree_util.tree_leaves(self.caches)[0].sharding

    def export_kv(self, block_ids) -> list[dict]:
        """A copy of the KV pages of ``block_ids``, per layer ``[len(block_ids), ...]``
        (read under the lock: steps donate the pages)."""
        ids_B = np.asarray(block_ids, np.int32)
        with self.lock:
            return gather_blocks(self.caches, ids_B)

    def import_kv(self, block_ids, pages: list[dict]) -> None:
        """Write ``pages`` (as ``export_kv`` returns them, on ``kv_sharding``) into
        ``block_ids``, in place; the step programs and ``compile_count`` are untouched."""
        ids_B = np.asarray(block_ids, np.int32)
        with self.lock:
            self.caches = scatter_blocks_donated(self.caches, ids_B, pages)

    def _launch(self, rows: RowBatch):
        key = (rows.tokens_BS.shape, rows.tables_BN.shape)
        if key not in self._shapes_seen:
            self._shapes_seen.add(key)
            self.compile_count += 1
            log.info("compiling step program for rows x tokens %s, blocks %d", key[0], key[1][1])
        put = lambda a: place(a, self.input_sharding)  # noqa: E731
        inputs = [put(a) for a in (rows.tokens_BS, rows.positions_BS, rows.tables_BN,
                                   rows.last_B)]
        with self.lock:
            args = (inputs[0], inputs[1], self.caches, inputs[2], inputs[3])
            if self.staged:
                logits, self.caches = staged_step(self.params, self.cfg, *args)
            else:
                logits, self.caches = model_step(self.params, *args, cfg=self.cfg)
        return logits

    def launch(self, scheduled: list) -> list[tuple]:
        """Dispatch the programs of one step (asynchronous); returns what ``finish`` needs."""
        decodes = [s for s in scheduled if s.num_tokens == 1 and s.start > 0]
        prefills = [s for s in scheduled if not (s.num_tokens == 1 and s.start > 0)]
        pending = []
        for group, rows_min, width in ((decodes, MIN_DECODE_ROWS, 1),
                                       (prefills, 1, MIN_PREFILL_WIDTH)):
            if group:
                rows = build_rows(group, rows_min, width, self.block_size)
                pending.append((self._launch(rows), rows.sampling_seqs))
        return pending

    def finish(self, pending: list[tuple]) -> None:
        """Sample the rows that finished their prompt or decode, appending tokens."""
        for logits, seqs in pending:
            sample_rows(logits, seqs, self.cfg.vocab_size)
