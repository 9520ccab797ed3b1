"""Compiled step programs over paged KV for one DP group.

A step holds decode rows (one token each) and prefill rows (a chunk each), each kind launched
separately, as one fused step program, or (``staged=True``) as a chain of separately jitted
stage programs (embed, per layer attention and FFN/MoE, head), which compile once per shape
whatever the depth but pay a dispatch per stage (SmolLM2 on 2 CPU cores: ~2 s instead of ~9 s
to compile a shape, ~30% slower decode). Shapes come from buckets: rows (powers of two up to
``max_num_seqs``), tokens per row (powers of two from 16 up to the chunk size) and block-table
width (powers of two; prefill steps, where the prefill attention kernel runs, always the widest
a sequence has: ``prefill_blocks``). The KV pages are donated through every program, so they
are updated in place. The same bucket never compiles twice: ``compile_count`` lets tests and
benchmarks check steady state.

Sampling is dispatched with the step (``launch``) and read by ``finish``. Decode rows may run
``num_scheduler_steps`` steps a launch (vLLM's multi-step scheduling): the same decode program
launched back to back, each step's inputs the last one's sampled tokens on device, into KV
slots the group's scheduler reserved up front (``num_lookahead_tokens``); the host's work per
step (schedule, build rows, read, append, stop checks, emit) is paid once per chain, and a
row that stops mid-chain drops the tokens after. With asynchronous
scheduling (``overlaps_steps``) the next step is launched before ``finish``: a decode row whose
input is the previous step's sampled token takes it from that step's device array by index
(``take_inputs``), so the launch waits for nothing.

Shape legend: B rows, S tokens per row, N blocks per row, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import time

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from collectives.p2p import gather_blocks, scatter_blocks_donated
from serving.core.decode_inputs import as_decode_inputs, in_flight, inputs_key, take_inputs
from serving.core.step_rows import (
    MIN_CONTEXT_TOKENS,
    MIN_PREFILL_WIDTH,
    RowBatch,
    build_rows,
    decode_rows_min,
    table_blocks,
)
from sharding.params import kv_page_shardings, param_shardings, tp_mesh
from xds_jax.generate import bucket, model_step
from xds_jax.kernels import cpu_attention
from xds_jax.memory_maps import ProgramShapes
from xds_jax.model.config import ModelConfig
from xds_jax.model.packed_params import pack
from xds_jax.model.params import model_dtype
from xds_jax.model.reference import new_caches, staged_step
from xds_jax.multihost import multi_process, place, place_tree, zeros_tree
from xds_jax.sampling.params import SamplingParams
from xds_jax.sampling.rows import append_rows, dispatch_rows
from xds_jax.sampling.sampler import flags_for, rows_batch, sample

log = logging.getLogger(__name__)


# Sampler programs compiled ahead for each batch size (``ModelRunner.precompile``): plain
# temperature, and with top-p (the same program serves top-k), as benchmarks and chat apps ask.
PRECOMPILED_SAMPLING = (SamplingParams(temperature=1.0), SamplingParams(temperature=1.0, top_p=0.9))


class ModelRunner:
    """Owns a group's parameters and KV pages on its devices and runs scheduled steps.

    ``device`` is one device, or a list of devices forming a tensor-parallel group: weights
    split by heads and MLP width and KV pages by KV heads (``sharding.params``), inputs
    replicated, and XLA's SPMD partitioner adds the collectives.
    """

    def __init__(self, params: dict, cfg: ModelConfig, num_blocks: int, block_size: int,
                 device: jax.Device | list | None = None, staged: bool = False,
                 num_scheduler_steps: int = 1, max_context: int | None = None):
        self.cfg = cfg
        self.staged = staged
        self.decode_rows_min = decode_rows_min(params)
        self.block_size = block_size
        self.num_blocks = num_blocks
        devices = list(device) if isinstance(device, list | tuple) else [device or jax.devices()[0]]
        self.devices = devices
        self.device = devices[0]
        dtype = model_dtype(params)
        if len(devices) == 1:
            self.input_sharding = self.device
            self.params = place_tree(params, self.device)
            # what the step program takes: fewer leaves to dispatch
            self.step_params = pack(self.params, lambda v: place(v, self.device), params)
            cache_shardings = self.device
        else:
            mesh = tp_mesh(devices)
            self.input_sharding = NamedSharding(mesh, PartitionSpec())
            self.params = place_tree(params, param_shardings(params, cfg, mesh))
            self.step_params = self.params  # vectors sharded as their matrices: not packed
            cache_shardings = None
        # Built where they live, shard by shard (a group may lie on another process).
        shapes = jax.eval_shape(lambda: new_caches(cfg, num_blocks, block_size, dtype))
        if cache_shardings is None:
            cache_shardings = kv_page_shardings(shapes, cfg, mesh)
        self.caches = zeros_tree(shapes, cache_shardings)
        # Step inputs: host arrays straight into the program, which puts them beside the
        # (committed) weights; on CPU that dispatches in ~1 ms where device_put arrays took
        # ~10 ms. Several devices or processes need them laid out (replicated) first, and
        # stage programs (staged) share one placed copy.
        self._direct_inputs = len(devices) == 1 and not multi_process() and not staged
        self.lock = threading.Lock()  # held while a step swaps the (donated) pages
        # Decode steps per launch; the group's scheduler reserves their KV slots up front.
        self.num_scheduler_steps = num_scheduler_steps
        self.num_lookahead_tokens = num_scheduler_steps - 1
        self._shapes_seen = ProgramShapes()
        self._samplers_ahead = ProgramShapes()  # batch sizes whose samplers compiled ahead
        self._anchors: dict[int, jax.Array] = {}  # rows -> a device array placing their take
        self.compile_count = 0
        # Prefill steps' block tables: where the prefill attention kernel runs (its cost
        # follows the query positions, not the table), every prefill step takes the widest
        # table a sequence of ``max_context`` tokens has, so a long prompt's later chunks
        # run the programs compiled ahead (one per rows x tokens) instead of compiling a
        # (rows, tokens, blocks) bucket each in traffic (~0.3-2.7 s a stall); elsewhere
        # (XLA's attention reads every key the table holds) the longest table's bucket.
        self.prefill_blocks = None
        if (max_context and len(devices) == 1 and not staged
                and cpu_attention.prefill_runs(cfg.head_dim, dtype, cfg.mla is not None,
                                               self.device.platform)):
            self.prefill_blocks = table_blocks(-(-max_context // block_size), block_size)

    @property
    def overlaps_steps(self) -> bool:
        """Whether a step may be launched before the previous one's tokens are appended
        (asynchronous scheduling): true of the plain runner, whose launch reads nothing of
        the previous step on the host. A subclass with its own launch or finish (speculative
        decoding verifies drafts on the host between steps) runs steps one at a time."""
        cls = type(self)
        return cls.launch is ModelRunner.launch and cls.finish is ModelRunner.finish

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

    def _seen(self, key: tuple, what: str) -> float | None:
        """Count a program shape the first time it is launched (it compiles then), first
        making room for it among the process's memory mappings (``xds_jax.memory_maps``);
        after every program was dropped there, each shape counts (and compiles) again, so
        the heartbeat's compile grace covers the recompiles. Returns the time it started
        compiling (``_compiled`` logs how long it took), or None."""
        if not self._shapes_seen.first_launch(key, what):
            return None
        self.compile_count += 1
        log.info("compiling %s for %s", what, key)
        return time.perf_counter()

    @staticmethod
    def _compiled(key: tuple, start: float | None) -> None:
        if start is not None:  # the call compiled before it dispatched
            log.info("compiled %s in %.2f s", key, time.perf_counter() - start)

    def _put(self, *arrays) -> list:
        """Host inputs of a step program: straight into it where ``_direct_inputs``, else
        laid out over the group first."""
        if self._direct_inputs:
            return list(arrays)
        return [place(a, self.input_sharding) for a in arrays]

    def _launch(self, rows: RowBatch, sampled: tuple = (), tokens_B: jax.Array | None = None):
        """Dispatch one step program; ``tokens_B``: the decode inputs of a chained step, the
        previous step's sampled tokens on device."""
        key = (rows.tokens_BS.shape, rows.tables_BN.shape)
        compiling = self._seen(key, "step program (rows x tokens, rows x blocks)")
        inputs = self._put(rows.tokens_BS, rows.positions_BS, rows.tables_BN, rows.last_B)
        if rows.tokens_BS.shape[1] == 1:
            inputs[0] = self._decode_tokens(rows, inputs[0], sampled, tokens_B)
        with self.lock:
            args = (inputs[0], inputs[1], self.caches, inputs[2], inputs[3])
            if self.staged:
                logits, greedy, self.caches = staged_step(self.params, self.cfg, *args)
            else:
                logits, greedy, self.caches = model_step(self.step_params, *args,
                                                         cfg=self.cfg)
        self._compiled(key, compiling)
        return logits, greedy

    def _decode_tokens(self, rows: RowBatch, tokens, sampled: tuple,
                       tokens_B: jax.Array | None) -> jax.Array:
        """A decode step's input tokens, always a device array: under asynchronous
        scheduling they come from the step before on device, and a step program called with
        a host array in their place is another program, compiled again (a ``device_put``
        instead costs ~0.3 ms of host CPU a step while a step runs). ``tokens_B``: a chained
        step's, the step before's sampled tokens."""
        if tokens_B is not None:
            return as_decode_inputs(tokens_B)
        offset = 0
        for tokens_P in sampled if rows.source_B is not None else ():
            size = tokens_P.shape[0]  # each launch of the step before gives its rows' tokens
            mine = (rows.source_B >= offset) & (rows.source_B < offset + size)
            if mine.any():
                tokens = self._take(tokens_P, np.where(mine, rows.source_B - offset, -1), tokens)
            offset += size
        if not isinstance(tokens, jax.Array):  # nothing taken: the host tokens, on device
            n = tokens.shape[0]
            anchor = self._anchors.get(n)
            if anchor is None:  # a device array of n rows, for the program's placement
                anchor = self._anchors[n] = place(np.zeros((n,), np.int32), self.input_sharding)
            tokens = self._take(anchor, np.full((n,), -1), tokens)
        return tokens

    def _take(self, tokens_P: jax.Array, source_B: np.ndarray, tokens_BS) -> jax.Array:
        self._seen(inputs_key(tokens_P, tokens_BS), "decode inputs taken on device")
        return take_inputs(tokens_P, *self._put(source_B.astype(np.int32)), tokens_BS)

    def step_buckets(self, max_rows: int, max_context: int,
                     max_chunk: int) -> list[tuple[int, int, int]]:
        """``(rows, tokens, blocks)`` step buckets to compile ahead: the decode step's (rows
        up to ``max_rows``, contexts up to ``max_context`` tokens), then fresh prompts'
        prefill (1, 2 or 4 rows, chunks up to ``max_chunk`` tokens, the block table their
        tokens fill), then one prompt's chunk after cached or earlier tokens (tables up to
        four times as wide: prefix-cache hits, a long prompt's next chunks), each smallest
        first."""
        first = max(1, MIN_CONTEXT_TOKENS // self.block_size)
        top = bucket(max_rows)
        rows_of = self._decode_rows(max_rows)
        blocks_of = [b for b in (first << i for i in range(32))
                     if b <= bucket(-(-max_context // self.block_size), first)]
        decode = sorted(((r, 1, b) for r, b in itertools.product(rows_of, blocks_of)),
                        key=lambda s: (s[0] * s[2], s))
        widths = [w for w in (MIN_PREFILL_WIDTH << i for i in range(32))
                  if w <= bucket(min(max_chunk, max_context), MIN_PREFILL_WIDTH)]
        fresh = {w: self.prefill_blocks or bucket(-(-w // self.block_size), first)
                 for w in widths}
        prefill = [(r, w, fresh[w]) for r in (1, 2, 4) if r <= top for w in widths]
        later = [] if self.prefill_blocks else [
            (1, w, b) for w in widths for b in blocks_of if fresh[w] < b <= 4 * fresh[w]]
        return (decode + sorted(prefill, key=lambda s: (s[0] * s[1], s))
                + sorted(later, key=lambda s: (s[1] * s[2], s)))

    def _decode_rows(self, max_rows: int) -> list[int]:
        """The decode steps' row buckets up to ``max_rows`` rows."""
        top = bucket(max_rows)
        return [r for r in (bucket(self.decode_rows_min) << i for i in range(32)) if r <= top]

    def input_sizes(self, max_rows: int) -> list[int]:
        """The launch sizes a decode step may take its inputs from (decode batches, fresh
        prompts' prefill batches of 1, 2 or 4 rows), for ``precompile``."""
        top = bucket(max_rows)
        return sorted(set(self._decode_rows(max_rows)) | {r for r in (1, 2, 4) if r <= top})

    def precompile(self, rows: int, tokens: int, blocks: int,
                   input_sizes: list[int] = ()) -> None:
        """Compile the step of bucket ``(rows, tokens, blocks)`` and run it once over padding
        rows (they write nothing), and the first time a batch of ``rows`` comes, the sampler
        programs of ``PRECOMPILED_SAMPLING`` over its logits and (decode) the programs taking
        its inputs from a launch of each of ``input_sizes`` rows (``input_sizes``). Only while
        the runner has no step in flight: a server's warm-up, so that contexts growing and
        batches filling later find them compiled."""
        batch = RowBatch(np.zeros((rows, tokens), np.int32),
                         np.full((rows, tokens), -1, np.int32), np.zeros((rows, blocks), np.int32),
                         np.zeros((rows,), np.int32), [None] * rows)
        logits, greedy = self._launch(batch)
        jax.block_until_ready(greedy)
        if not self._samplers_ahead.first_launch(rows, "samplers compiled ahead"):
            return
        if tokens == 1:  # decode: its inputs taken from each batch size the step before ran,
            source = np.full((rows,), -1)  # over host tokens, or after another launch's take
            host = self._put(batch.tokens_BS)[0]
            for size in input_sizes:
                tokens_P = place(np.zeros((size,), np.int32), self.input_sharding)
                self._shapes_seen.first_launch(inputs_key(tokens_P, host), "")
                taken = self._take(tokens_P, source, host)
                self._shapes_seen.first_launch(inputs_key(tokens_P, taken), "")
                jax.block_until_ready(self._take(tokens_P, source, taken))
        for params in PRECOMPILED_SAMPLING:
            flags = flags_for([params])
            sampling = rows_batch(params, rows, self.cfg.vocab_size, flags)
            jax.block_until_ready(sample(logits, sampling, flags))

    def launch(self, scheduled: list, after: list | None = None) -> list[tuple]:
        """Dispatch the programs of one step and their sampling (asynchronous); returns what
        ``finish`` needs, a ``(logits, sampled)`` pair per program, in order. ``after``: the
        handle of a step launched but not finished (asynchronous scheduling); a decode row
        whose input token that step samples takes it on device."""
        decodes = [s for s in scheduled if s.num_tokens == 1 and s.start > 0]
        prefills = [s for s in scheduled if not (s.num_tokens == 1 and s.start > 0)]
        sampled, sources = in_flight(after)
        pending = []
        if decodes:
            pending += self._launch_decodes(decodes, sampled, sources)
        if prefills:
            rows = build_rows(prefills, 1, MIN_PREFILL_WIDTH, self.block_size,
                              blocks=self.prefill_blocks)
            logits, greedy = self._launch(rows)
            pending.append((logits, dispatch_rows(logits, rows.sampling_seqs,
                                                  self.cfg.vocab_size, greedy_B=greedy)))
        return pending

    def _launch_decodes(self, items: list, sampled: tuple, sources: dict) -> list[tuple]:
        """The decode rows' steps: one, or a chain (``num_scheduler_steps``), each row
        running as many as its reserved KV slots hold (the rest of its chain writes nothing
        and samples nothing)."""
        rows = build_rows(items, self.decode_rows_min, 1, self.block_size, sources)
        logits, greedy = self._launch(rows, sampled)
        flying = {s.seq.seq_id for s in items if s.seq.seq_id in sources} if sources else set()
        first = dispatch_rows(logits, rows.sampling_seqs, self.cfg.vocab_size, flying, greedy)
        pending = [(logits, first)]
        chain = self._chain_length(items, sources)
        if chain == 1 or first is None:
            return pending
        steps_B = np.zeros(len(rows.sampling_seqs), np.int32)
        steps_B[:len(items)] = [min(chain, s.num_lookahead + 1) for s in items]
        tokens_B = first.tokens_B
        for j in range(1, chain):
            live = j < steps_B
            seqs = [s if ok else None for s, ok in zip(rows.sampling_seqs, live, strict=True)]
            positions = np.where(live[:, None] & (rows.positions_BS >= 0),
                                 rows.positions_BS + j, -1).astype(np.int32)
            step = dataclasses.replace(rows, positions_BS=positions, sampling_seqs=seqs)
            logits, greedy = self._launch(step, tokens_B=tokens_B)
            out = dispatch_rows(logits, seqs, self.cfg.vocab_size, ahead=j, greedy_B=greedy)
            if out is None:
                break
            pending.append((logits, out))
            tokens_B = out.tokens_B
        return pending

    def _chain_length(self, items: list, sources: dict) -> int:
        """Decode steps this launch chains: ``num_scheduler_steps``, no more than the most
        any row has KV slots reserved for; one where a row's sampling reads every output
        token (penalties, a grammar: the host appends each before the next is drawn) or a
        row's input is still in flight (asynchronous scheduling)."""
        if self.num_scheduler_steps == 1 or sources:
            return 1
        if any(s.seq.params.reads_outputs for s in items):
            return 1
        return min(self.num_scheduler_steps, 1 + max(s.num_lookahead for s in items))

    def finish(self, pending: list[tuple]) -> None:
        """Read each program's sampled tokens and append them to their sequences (those
        finished or aborted since the launch drop theirs)."""
        for logits, sampled in pending:
            append_rows(sampled, logits)
