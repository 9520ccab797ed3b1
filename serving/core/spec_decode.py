"""MTP speculative decoding for one DP group: a ``ModelRunner`` that drafts and verifies.

Each decode step of a sequence with ``n`` tokens (target KV written for ``0 .. n - 2``) is
one jitted program: the MTP block first catches up on the sequence's pending (target hidden,
next token) pairs and drafts up to ``k`` tokens (``xds_jax.model.mtp``); the target then runs
over ``[t[n - 1], d_1 .. d_k]`` at positions ``n - 1 .. n - 1 + k``. Verification keeps the
longest accepted prefix plus one target token (greedy rows on the host from the target argmax
the program returns, others through ``xds_jax.sampling.rejection.verify_drafts``), appended
one by one (stop strings, ``max_tokens`` and logprobs as usual); the
target hiddens of the accepted positions become the next step's pending pairs. The scheduler
reserves KV for the ``k`` look-ahead slots and trims back to the accepted length after the
step (``Scheduler(num_lookahead_tokens=k)``), so rejected positions never keep a block and
are never hashed into the prefix cache; their stale KV slots are rewritten before any query
at that position reads them (causal mask).

Prefill chunks also run the MTP block over their (hidden, next prompt token) pairs, so its KV
covers the prompt; the last position's pair waits for the sampled token (pending).
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from collectives.p2p import gather_blocks, scatter_blocks_donated
from serving.core.runner import ModelRunner
from serving.core.spec_state import SpecState, emit_decode, prefill_pairs, speculable
from serving.core.step_rows import MIN_DECODE_ROWS, MIN_PREFILL_WIDTH, build_rows
from sharding.params import kv_page_shardings, tp_mesh
from xds_jax.engine_config import DEFAULT_CHAINED_STEPS
from xds_jax.errors import ConfigError
from xds_jax.generate import bucket, sample_rows
from xds_jax.model import stages
from xds_jax.model.attention import new_layer_cache
from xds_jax.model.config import ModelConfig
from xds_jax.model.mtp import MAX_SPECULATIVE_TOKENS, draft_tokens, mtp_block
from xds_jax.model.params import model_dtype
from xds_jax.model.reference import forward, last_token_outputs
from xds_jax.multihost import host_get, zeros_tree
from xds_jax.sampling.argmax import argmax_last

log = logging.getLogger(__name__)

# Decode steps of more rows than this do not draft (vLLM's ``disable_by_batch_size``), by
# default on CPU: on XLA:CPU a step is compute-bound past a few rows, so verifying k + 1 tokens
# per row costs nearly k + 1 plain steps (docs/speculative.md: batch 8 ran at 0.57x with
# drafting). Accelerators draft at every batch size unless ``speculative_config`` sets
# ``disable_by_batch_size``.
DISABLE_BY_BATCH_SIZE = 2


def drafts_this_step(k: int, rows: int, limit: int | None) -> int:
    """Drafts per row in a decode step of ``rows`` rows: ``k``, or 0 past ``limit``."""
    return k if limit is None or rows <= limit else 0


def default_disable_by_batch_size(device) -> int | None:
    """The drafting limit where ``speculative_config`` sets none: ``DISABLE_BY_BATCH_SIZE``
    rows on CPU, none elsewhere."""
    return DISABLE_BY_BATCH_SIZE if device.platform == "cpu" else None


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("caches", "mtp_cache"))
def prefill_step(params: dict, tokens_BS, positions_BS, next_BS, mtp_positions_BS, caches: list,
                 mtp_cache: dict, tables_BN, last_B, *, cfg: ModelConfig):
    """A prefill chunk of the target, then the MTP block over the chunk's known pairs.
    Returns last-token logits ``[B, V]`` and their argmax ``[B]``, the last token's target
    hidden ``[B, D]`` and the caches."""
    x, caches = forward(params, cfg, tokens_BS, positions_BS, caches, tables_BN)
    logits, greedy_B = last_token_outputs(params, cfg, x, last_B)
    _, mtp_cache = mtp_block(params["mtp"][0], params, cfg, next_BS, x, mtp_positions_BS,
                             mtp_cache, tables_BN)
    x_last = jnp.take_along_axis(x, last_B[:, None, None], axis=1)[:, 0]
    return logits, greedy_B, x_last, caches, mtp_cache


@functools.partial(jax.jit, static_argnames=("cfg", "k"), donate_argnames=("caches", "mtp_cache"))
def spec_step(params: dict, pend_tokens_BW, pend_hidden_BWD, pend_positions_BW, pend_last_B,
              num_drafts_B, last_token_B, last_pos_B, caches: list, mtp_cache: dict, tables_BN,
              *, cfg: ModelConfig, k: int):
    """Draft ``k`` tokens per row and verify them in one target forward over ``k + 1``
    positions. Returns drafts ``[B, k]``, target logits ``[B, k + 1, V]`` and their argmax
    ``[B, k + 1]``, target hiddens ``[B, k + 1, D]`` and the caches. With ``k = 0`` (every
    ``num_drafts_B`` 0) it is a plain decode step that still runs the MTP block over the
    pending pairs, keeping its KV whole."""
    b = last_token_B.shape[0]  # verified rows; the draft inputs may carry more (padding)
    drafts_BK, mtp_cache = draft_tokens(params["mtp"][0], params, cfg, pend_tokens_BW,
                                        pend_hidden_BWD, pend_positions_BW, pend_last_B,
                                        num_drafts_B, mtp_cache, tables_BN, k)
    drafts_BK, num_drafts_B = drafts_BK[:b, :k], num_drafts_B[:b]  # k = 0: no draft
    tokens_BK1 = jnp.concatenate([last_token_B[:, None], drafts_BK], axis=1)
    j = jnp.arange(k + 1)[None, :]
    live = (j <= num_drafts_B[:, None]) & (last_pos_B[:, None] >= 0)
    positions_BK1 = jnp.where(live, last_pos_B[:, None] + j, -1)
    x, caches = forward(params, cfg, tokens_BK1, positions_BK1, caches, tables_BN[:b])
    logits_BK1V = stages.head(params, cfg, x)
    greedy_BK1 = argmax_last(logits_BK1V)
    nxt = greedy_next_inputs(drafts_BK, greedy_BK1, x.astype(pend_hidden_BWD.dtype),
                             num_drafts_B, last_pos_B, pend_tokens_BW.shape[0],
                             max(pend_tokens_BW.shape[1], k + 1))
    return drafts_BK, logits_BK1V, greedy_BK1, x, caches, mtp_cache, nxt


def greedy_next_inputs(drafts_BK, greedy_BK1, x_BK1D, num_drafts_B, last_pos_B, rows: int,
                       width: int) -> tuple:
    """The next step's inputs of greedy rows after this one, on the device: its pending pairs
    (the accepted positions' hiddens and the target's token after each, padded to ``rows``
    draft rows x ``width`` >= k + 1), the index of the last pair, and the last token and
    its position (the target's token after the accepted run). What the host builds from the
    appended tokens (``SpecState.keep_decode``, ``draft_rows``) for a row that takes the
    argmax, so greedy steps can be chained without a round trip (``SpecRunner``)."""
    b, k1 = greedy_BK1.shape
    k = k1 - 1
    match = (jnp.arange(k)[None, :] < num_drafts_B[:, None]) & (drafts_BK == greedy_BK1[:, :k])
    accepted_B = jnp.cumprod(match, axis=1).sum(axis=1).astype(jnp.int32)
    live = last_pos_B >= 0
    j = jnp.arange(k1)[None, :]
    positions = jnp.where(live[:, None] & (j <= accepted_B[:, None]), last_pos_B[:, None] + j, -1)
    pad = ((0, rows - b), (0, width - k1))
    last_token_B = jnp.take_along_axis(greedy_BK1, accepted_B[:, None], axis=1)[:, 0]
    return (jnp.pad(greedy_BK1, pad), jnp.pad(x_BK1D, (*pad, (0, 0))),
            jnp.pad(positions.astype(jnp.int32), pad, constant_values=-1),
            jnp.pad(accepted_B, (0, rows - b)), last_token_B,
            jnp.where(live, last_pos_B + accepted_B + 1, -1).astype(jnp.int32))


class SpecRunner(ModelRunner):
    """A ``ModelRunner`` whose decode rows draft with the model's MTP block and verify.

    ``device`` may be a TP group (a PD prefill group, say): the MTP block and its KV pages are
    sharded like a target layer. The MTP pages travel with the target's in PD transfers
    (``export_kv`` / ``import_kv`` carry them as one more layer, last)."""

    def __init__(self, params: dict, cfg: ModelConfig, num_blocks: int, block_size: int,
                 device=None, staged: bool = False, *, num_speculative_tokens: int,
                 disable_by_batch_size: int | None = None,
                 num_chained_steps: int = DEFAULT_CHAINED_STEPS, max_context: int | None = None):
        check_speculative(params, num_speculative_tokens)
        super().__init__(params, cfg, num_blocks, block_size, device, staged=False,
                         max_context=max_context)
        self.k = num_speculative_tokens
        # Chained steps need their KV slots reserved up front, by the group's scheduler.
        self.chained_steps = num_chained_steps if self._direct_inputs else 1
        self.num_lookahead_tokens = self.chained_steps * (self.k + 1) - 1
        self.disable_by_batch_size = (default_disable_by_batch_size(self.device)
                                      if disable_by_batch_size is None
                                      else disable_by_batch_size)
        dtype = model_dtype(params)
        if self.device.platform == "cpu" and dtype == jnp.float32:
            log.warning("speculative decoding in float32 on CPU: verifying k + 1 rows takes "
                        "XLA:CPU's multi-row matmul, ~1.5x a one-row step, so drafting "
                        "slows batch-1 decode (SmolLM2: 0.8x); dtype='bfloat16' gains "
                        "(docs/speculative.md)")
        shapes = jax.eval_shape(lambda: new_layer_cache(cfg, num_blocks, block_size, dtype))
        if len(self.devices) == 1:
            self.mtp_cache = zeros_tree(shapes, self.device)
        else:
            self.mtp_cache = zeros_tree(shapes, kv_page_shardings(
                [shapes], cfg, tp_mesh(self.devices))[0])
        self.spec = SpecState(self.k, cfg.hidden_size)

    @property
    def pending(self) -> dict:
        """Sequence id -> ``Pending`` (a PD arrival's hidden state is put here)."""
        return self.spec.pending

    def spec_stats(self) -> dict:
        return self.spec.stats()

    # -- KV pages in and out: the MTP block's pages ride along as the last layer ---------------
    def export_kv(self, block_ids) -> list[dict]:
        ids_B = np.asarray(block_ids, np.int32)
        with self.lock:
            return gather_blocks([*self.caches, self.mtp_cache], ids_B)

    def import_kv(self, block_ids, pages: list[dict]) -> None:
        if len(pages) != len(self.caches) + 1:
            raise ValueError(f"KV pages of {len(pages)} layers arrived; a speculative group "
                             f"takes {len(self.caches)} target layers and the MTP block's")
        ids_B = np.asarray(block_ids, np.int32)
        with self.lock:
            *self.caches, self.mtp_cache = scatter_blocks_donated(
                [*self.caches, self.mtp_cache], ids_B, pages)

    def launch(self, scheduled: list) -> list[tuple]:
        self.spec.prune()
        decodes = [s for s in scheduled if s.num_tokens == 1 and s.start > 0]
        prefills = [s for s in scheduled if not (s.num_tokens == 1 and s.start > 0)]
        pending = []
        if prefills:
            pending.append(("prefill", self._launch_prefill(prefills)))
        if decodes:
            pending.append(("decode", self._launch_decode(decodes)))
        return pending

    def _launch_prefill(self, items: list) -> tuple:
        rows = build_rows(items, 1, MIN_PREFILL_WIDTH, self.block_size,
                          blocks=self.prefill_blocks)
        nxt, mtp_pos = prefill_pairs(items, rows.tokens_BS.shape)
        self._seen(("prefill", rows.tokens_BS.shape, rows.tables_BN.shape),
                   "prefill step with the MTP block")
        inputs = self._put(rows.tokens_BS, rows.positions_BS, nxt, mtp_pos, rows.tables_BN,
                           rows.last_B)
        with self.lock:
            logits, greedy, x_last, self.caches, self.mtp_cache = prefill_step(
                self.params, *inputs[:4], self.caches, self.mtp_cache, *inputs[4:],
                cfg=self.cfg)
        return items, rows, logits, greedy, x_last

    def _launch_decode(self, items: list) -> tuple:
        # The target verifies k + 1 tokens per row, so fewer padded rows keep its matmuls as
        # tall as a plain step's; the MTP block's passes (one token per row after the first)
        # pad like a plain decode step (``decode_rows_min``: 1 row where one-row matmuls are
        # the fast path, SmolLM2 at batch 1: 0.92x -> 0.98x; else MIN_DECODE_ROWS).
        k = drafts_this_step(self.k, len(items), self.disable_by_batch_size)
        rows = build_rows(items, _verify_rows(k), 1, self.block_size)
        b = rows.tokens_BS.shape[0]
        chain = self._chain_length(items, k)
        width = bucket(k + 1 if chain > 1 else self.spec.width(items))
        dr = self.spec.draft_rows(items, max(b, self.decode_rows_min), width)
        if k == 0:
            dr.num_drafts_B[:] = 0
        tables = np.zeros((len(dr.last_B), rows.tables_BN.shape[1]), np.int32)
        tables[:b] = rows.tables_BN
        self._seen(("decode", b, width, rows.tables_BN.shape, k),
                   "speculative step (rows, pending width, tables, k)")
        inputs = self._put(dr.tokens_BW, dr.hidden_BWD.astype(model_dtype(self.params)),
                           dr.positions_BW, dr.last_B, dr.num_drafts_B, rows.tokens_BS[:, 0],
                           rows.positions_BS[:, 0])
        tables = self._put(tables)[0]
        steps = []
        with self.lock:
            for _ in range(chain):  # each step's inputs come from the last one, on device
                *out, self.caches, self.mtp_cache, nxt = spec_step(
                    self.params, *inputs, self.caches, self.mtp_cache, tables, cfg=self.cfg,
                    k=k)
                steps.append(out)
                inputs = [*nxt[:4], inputs[4], *nxt[4:]]
        return items, rows, dr.num_drafts_B[:b], steps

    def _chain_length(self, items: list, k: int) -> int:
        """Speculative steps this decode launches back to back: ``chained_steps`` when every
        row drafts ``k`` tokens and takes the argmax without logprobs (the next step's inputs
        are then known on the device), as many as every row's reserved KV slots hold; else
        one."""
        if self.chained_steps <= 1 or k == 0:
            return 1
        for s in items:
            p = s.seq.params
            if (not p.greedy or p.logprobs is not None or not speculable(s.seq)
                    or self.spec.pending_of(s) is None):
                return 1
        room = min((s.num_lookahead + 1) // (k + 1) for s in items)
        return max(1, min(self.chained_steps, room))

    def finish(self, pending: list[tuple]) -> None:
        for kind, launched in pending:
            if kind == "prefill":
                items, rows, logits, greedy, x_last = launched
                sample_rows(logits, rows.sampling_seqs, self.cfg.vocab_size, greedy)
                self.spec.keep_prefill(items, np.asarray(host_get(x_last)))
            else:
                items, rows, num_drafts, steps = launched
                if len(steps) > 1:
                    self._finish_chain(items, num_drafts, steps)
                    continue
                drafts, logits, greedy, x = steps[0]
                # one read of everything small the host needs (the logits stay on device:
                # only sampled or logprob rows read them, through their own programs)
                drafts, greedy, x = host_get((drafts, greedy, x))
                seqs = [s.seq for s in items] + [None] * (len(num_drafts) - len(items))
                accepted = emit_decode(seqs, num_drafts, drafts, logits, self.cfg.vocab_size,
                                       greedy)
                self.spec.keep_decode(items, num_drafts, accepted, x)

    def _finish_chain(self, items: list, num_drafts, steps: list) -> None:
        """Append the runs of chained greedy steps in order (each read while the next ones
        run); a sequence that stops ignores the steps after. The last step's accepted hiddens
        pend for the next decode."""
        last_pos = [s.start for s in items]
        pad = [None] * (len(num_drafts) - len(items))
        for n, (drafts, logits, greedy, x) in enumerate(steps):
            live = [i for i, s in enumerate(items) if not s.seq.finished]
            seqs = [None if s.seq.finished else s.seq for s in items] + pad
            accepted = emit_decode(seqs, num_drafts, drafts, logits, self.cfg.vocab_size,
                                   greedy)
            self.spec.count(num_drafts[live], accepted[live])
            if n == len(steps) - 1:
                x = np.asarray(host_get(x))
                for i in live:
                    self.spec.keep_pending(items[i].seq, x[i, :accepted[i] + 1], last_pos[i])
            for i in live:
                last_pos[i] += int(accepted[i]) + 1


def _verify_rows(k: int) -> int:
    """The fewest rows a verify pass is padded to: as many as keep ``rows x (k + 1)`` tokens
    at least ``MIN_DECODE_ROWS`` - 1 (a plain step's 4 rows at batch 1; 1 row when k >= 2)."""
    return bucket(-(-(MIN_DECODE_ROWS - 1) // (k + 1)))


def check_speculative(params: dict, k: int) -> None:
    """Refuse, at start-up, MTP asked of a model without MTP weights or an out-of-range k."""
    if not params.get("mtp"):
        raise ConfigError("speculative_config: method 'mtp' needs a checkpoint with MTP "
                          "weights (num_nextn_predict_layers > 0 and model.layers.N.* "
                          "tensors) or a shipped draft head (xds_jax/assets/mtp/, or "
                          "XDS_DRAFT_HEAD=<dir>); this model has neither")
    if not 1 <= k <= MAX_SPECULATIVE_TOKENS:
        raise ConfigError(f"num_speculative_tokens must be in 1..{MAX_SPECULATIVE_TOKENS}")


def build_runner(params: dict, cfg: ModelConfig, config, device) -> ModelRunner:
    """The runner a group's ``GroupConfig`` asks for: speculative when it sets
    ``num_speculative_tokens``."""
    if config.num_speculative_tokens:
        return SpecRunner(params, cfg, config.num_blocks, config.block_size, device,
                          num_speculative_tokens=config.num_speculative_tokens,
                          disable_by_batch_size=config.spec_disable_by_batch_size,
                          num_chained_steps=config.spec_chained_steps,
                          max_context=config.max_model_len)
    # Asynchronous scheduling overlaps the host with the device its own way: one step a
    # launch, the next launched before this one's tokens are read.
    steps = 1 if config.overlaps_steps else config.num_scheduler_steps
    return ModelRunner(params, cfg, config.num_blocks, config.block_size, device,
                       staged=config.staged, num_scheduler_steps=steps,
                       max_context=config.max_model_len)
