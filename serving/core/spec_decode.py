"""MTP speculative decoding for one DP group: a ``ModelRunner`` that drafts and verifies.

Each decode step of a sequence with ``n`` tokens (target KV written for ``0 .. n - 2``) is
one jitted program: the MTP block first catches up on the sequence's pending (target hidden,
next token) pairs and drafts up to ``k`` tokens (``xds_jax.model.mtp``); the target then runs
over ``[t[n - 1], d_1 .. d_k]`` at positions ``n - 1 .. n - 1 + k``. On the host,
``xds_jax.sampling.rejection.verify_drafts`` keeps the longest accepted prefix plus one target
token, which are appended one by one (stop strings, ``max_tokens`` and logprobs as usual); the
target hiddens of the accepted positions become the next step's pending pairs. The scheduler
reserves KV for the ``k`` look-ahead slots and trims back to the accepted length after the
step (``Scheduler(num_lookahead_tokens=k)``), so rejected positions never keep a block and
are never hashed into the prefix cache; their stale KV slots are rewritten before any query
at that position reads them (causal mask).

Prefill chunks also run the MTP block over their (hidden, next prompt token) pairs, so its KV
covers the prompt; the last position's pair waits for the sampled token (pending).
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from serving.core.runner import MIN_DECODE_ROWS, MIN_PREFILL_WIDTH, ModelRunner, build_rows
from xds_jax.errors import ConfigError
from xds_jax.generate import bucket, sample_rows
from xds_jax.model import stages
from xds_jax.model.attention import new_layer_cache
from xds_jax.model.config import ModelConfig
from xds_jax.model.mtp import MAX_SPECULATIVE_TOKENS, draft_tokens, mtp_block
from xds_jax.model.params import model_dtype
from xds_jax.model.reference import forward, last_token_logits
from xds_jax.sampling.rejection import verify_drafts

log = logging.getLogger(__name__)


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("caches", "mtp_cache"))
def prefill_step(params: dict, tokens_BS, positions_BS, next_BS, mtp_positions_BS, caches: list,
                 mtp_cache: dict, tables_BN, last_B, *, cfg: ModelConfig):
    """A prefill chunk of the target, then the MTP block over the chunk's known pairs.
    Returns last-token logits ``[B, V]``, the last token's target hidden ``[B, D]`` and caches."""
    x, caches = forward(params, cfg, tokens_BS, positions_BS, caches, tables_BN)
    logits = last_token_logits(params, cfg, x, last_B)
    _, mtp_cache = mtp_block(params["mtp"][0], params, cfg, next_BS, x, mtp_positions_BS,
                             mtp_cache, tables_BN)
    x_last = jnp.take_along_axis(x, last_B[:, None, None], axis=1)[:, 0]
    return logits, x_last, caches, mtp_cache


@functools.partial(jax.jit, static_argnames=("cfg", "k"), donate_argnames=("caches", "mtp_cache"))
def spec_step(params: dict, pend_tokens_BW, pend_hidden_BWD, pend_positions_BW, pend_last_B,
              num_drafts_B, last_token_B, last_pos_B, caches: list, mtp_cache: dict, tables_BN,
              *, cfg: ModelConfig, k: int):
    """Draft ``k`` tokens per row and verify them in one target forward over ``k + 1``
    positions. Returns drafts ``[B, k]``, target logits ``[B, k + 1, V]``, target hiddens
    ``[B, k + 1, D]`` and the caches."""
    drafts_BK, mtp_cache = draft_tokens(params["mtp"][0], params, cfg, pend_tokens_BW,
                                        pend_hidden_BWD, pend_positions_BW, pend_last_B,
                                        num_drafts_B, mtp_cache, tables_BN, k)
    tokens_BK1 = jnp.concatenate([last_token_B[:, None], drafts_BK], axis=1)
    j = jnp.arange(k + 1)[None, :]
    live = (j <= num_drafts_B[:, None]) & (last_pos_B[:, None] >= 0)
    positions_BK1 = jnp.where(live, last_pos_B[:, None] + j, -1)
    x, caches = forward(params, cfg, tokens_BK1, positions_BK1, caches, tables_BN)
    return drafts_BK, stages.head(params, cfg, x), x, caches, mtp_cache


@dataclasses.dataclass
class Pending:
    """Target hiddens ``[m, D]`` of positions ``first .. first + m - 1`` whose MTP pair
    (hidden, next token) is not in the MTP KV yet; the next token of the last is the
    sequence's last token."""

    seq: object
    hidden: np.ndarray
    first: int


def speculable(seq) -> bool:
    """Rows whose sampling the verifier reproduces exactly: no penalties, no min-p, no
    banned ids; others decode one token a step (still through the same program)."""
    p = seq.params
    return (p.repetition_penalty == 1 and not p.frequency_penalty and not p.presence_penalty
            and not (p.min_p > 0 and not p.greedy) and not seq.banned_ids())


class SpecRunner(ModelRunner):
    """A ``ModelRunner`` whose decode rows draft with the model's MTP block and verify."""

    def __init__(self, params: dict, cfg: ModelConfig, num_blocks: int, block_size: int,
                 device=None, staged: bool = False, *, num_speculative_tokens: int):
        if not params.get("mtp"):
            raise ConfigError("speculative_config: method 'mtp' needs a checkpoint with MTP "
                              "weights (num_nextn_predict_layers > 0 and model.layers.N.* "
                              "tensors); this model has none")
        if isinstance(device, list | tuple) and len(device) > 1:
            raise ConfigError("speculative_config: MTP runs on tp=1 groups only")
        if not 1 <= num_speculative_tokens <= MAX_SPECULATIVE_TOKENS:
            raise ConfigError(f"num_speculative_tokens must be in 1..{MAX_SPECULATIVE_TOKENS}")
        super().__init__(params, cfg, num_blocks, block_size, device, staged=False)
        self.k = num_speculative_tokens
        dtype = model_dtype(params)
        with jax.default_device(self.device):
            self.mtp_cache = new_layer_cache(cfg, num_blocks, block_size, dtype)
        self.pending: dict[int, Pending] = {}
        self.num_drafts = 0
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.accepted_per_position = [0] * self.k

    def spec_stats(self) -> dict:
        return {"spec_num_drafts": self.num_drafts, "spec_draft_tokens": self.num_draft_tokens,
                "spec_accepted_tokens": self.num_accepted_tokens,
                "spec_accepted_per_position": list(self.accepted_per_position)}

    def _count_shape(self, key: tuple) -> None:
        if key not in self._shapes_seen:
            self._shapes_seen.add(key)
            self.compile_count += 1

    def launch(self, scheduled: list) -> list[tuple]:
        for seq_id in [i for i, p in self.pending.items() if p.seq.finished]:
            del self.pending[seq_id]
        decodes = [s for s in scheduled if s.num_tokens == 1 and s.start > 0]
        prefills = [s for s in scheduled if not (s.num_tokens == 1 and s.start > 0)]
        pending = []
        if prefills:
            pending.append(("prefill", self._launch_prefill(prefills)))
        if decodes:
            pending.append(("decode", self._launch_decode(decodes)))
        return pending

    def _launch_prefill(self, items: list) -> tuple:
        rows = build_rows(items, 1, MIN_PREFILL_WIDTH, self.block_size)
        nxt = np.zeros_like(rows.tokens_BS)
        mtp_pos = np.full_like(rows.positions_BS, -1)
        for i, s in enumerate(items):
            ids = s.seq.all_ids
            for j in range(s.num_tokens):
                p = s.start + j
                if p + 1 < len(ids):
                    nxt[i, j], mtp_pos[i, j] = ids[p + 1], p
        self._count_shape(("prefill", rows.tokens_BS.shape, rows.tables_BN.shape))
        with self.lock:
            logits, x_last, self.caches, self.mtp_cache = prefill_step(
                self.params, rows.tokens_BS, rows.positions_BS, nxt, mtp_pos, self.caches,
                self.mtp_cache, rows.tables_BN, rows.last_B, cfg=self.cfg)
        return items, rows, logits, x_last

    def _launch_decode(self, items: list) -> tuple:
        rows = build_rows(items, MIN_DECODE_ROWS, 1, self.block_size)
        b, d = rows.tokens_BS.shape[0], self.cfg.hidden_size
        pend = [self._pending_of(s) for s in items]
        width = bucket(max([len(p.hidden) for p in pend if p is not None], default=1))
        p_tok = np.zeros((b, width), np.int32)
        p_hid = np.zeros((b, width, d), np.float32)
        p_pos = np.full((b, width), -1, np.int32)
        p_last = np.zeros((b,), np.int32)
        num_drafts = np.zeros((b,), np.int32)
        for i, (s, p) in enumerate(zip(items, pend, strict=True)):
            if p is None:
                continue
            m, ids = len(p.hidden), s.seq.all_ids
            p_hid[i, :m] = p.hidden
            p_pos[i, :m] = np.arange(p.first, p.first + m)
            p_tok[i, :m] = ids[p.first + 1:p.first + 1 + m]
            p_last[i] = m - 1
            if speculable(s.seq):
                num_drafts[i] = min(self.k, s.num_lookahead)
        last_token = rows.tokens_BS[:, 0]
        last_pos = rows.positions_BS[:, 0]
        self._count_shape(("decode", b, width, rows.tables_BN.shape))
        with self.lock:
            drafts, logits, x, self.caches, self.mtp_cache = spec_step(
                self.params, p_tok, p_hid.astype(self.mtp_cache_dtype), p_pos, p_last,
                num_drafts, last_token, last_pos, self.caches, self.mtp_cache, rows.tables_BN,
                cfg=self.cfg, k=self.k)
        return items, rows, num_drafts, drafts, logits, x

    @property
    def mtp_cache_dtype(self):
        return model_dtype(self.params)

    def _pending_of(self, item) -> Pending | None:
        p = self.pending.get(item.seq.seq_id)
        if p is None or p.seq is not item.seq or p.first + len(p.hidden) != item.start:
            return None  # e.g. arrived without a hidden state: this step cannot draft
        return p

    def finish(self, pending: list[tuple]) -> None:
        for kind, launched in pending:
            if kind == "prefill":
                self._finish_prefill(*launched)
            else:
                self._finish_decode(*launched)

    def _finish_prefill(self, items, rows, logits, x_last) -> None:
        sample_rows(logits, rows.sampling_seqs, self.cfg.vocab_size)
        hidden = np.asarray(jax.device_get(x_last))
        for i, s in enumerate(items):
            if s.is_last_chunk and not s.seq.finished:
                first = s.start + s.num_tokens - 1
                self.pending[s.seq.seq_id] = Pending(s.seq, hidden[i:i + 1], first)

    def _finish_decode(self, items, rows, num_drafts, drafts, logits, x) -> None:
        plain = [s.seq if num_drafts[i] == 0 else None for i, s in enumerate(items)]
        plain += [None] * (len(rows.sampling_seqs) - len(plain))
        sample_rows(logits[:, 0], plain, self.cfg.vocab_size)
        spec = [i for i in range(len(items)) if num_drafts[i] > 0]
        accepted = np.zeros((len(num_drafts),), np.int32)
        if spec:
            accepted = self._emit_verified(items, spec, num_drafts, drafts, logits)
        hidden = np.asarray(jax.device_get(x))
        for i, s in enumerate(items):
            if s.seq.finished:
                self.pending.pop(s.seq.seq_id, None)
            else:
                self.pending[s.seq.seq_id] = Pending(s.seq, hidden[i, :accepted[i] + 1], s.start)

    def _emit_verified(self, items, spec, num_drafts, drafts, logits) -> np.ndarray:
        b = len(num_drafts)
        seqs = [items[i].seq if i in spec else None for i in range(b)]
        params = [s.params if s is not None else None for s in seqs]
        f32 = functools.partial(np.asarray, dtype=np.float32)
        temps = f32([p.temperature if p else 0 for p in params])
        top_k = np.asarray([min(p.top_k, self.cfg.vocab_size) if p else 0 for p in params],
                           np.int32)
        top_p = f32([p.top_p if p else 1 for p in params])
        seeds = np.asarray([(s.seed if s else 0) % (1 << 32) for s in seqs], np.uint32)
        steps = np.asarray([len(s.output_ids) if s else 0 for s in seqs], np.int32)
        live = [p for p in params if p is not None]
        random = any(not p.greedy for p in live)
        sort = any(p.top_p < 1 or p.top_k > 0 for p in live if not p.greedy)
        n_lp = max((p.logprobs or 0 for p in live), default=0)
        out = verify_drafts(logits, drafts, num_drafts, temps, top_k, top_p, seeds, steps,
                            random=random, sort=sort, num_logprobs=n_lp)
        tokens, accepted, lps, ranks, top_ids, top_lps = jax.device_get(out)
        for i in spec:
            seq, a = seqs[i], int(accepted[i])
            self.num_drafts += 1
            self.num_draft_tokens += int(num_drafts[i])
            self.num_accepted_tokens += a
            for j in range(a):
                self.accepted_per_position[j] += 1
            for j in range(a + 1):
                top = list(zip(top_ids[i, j].tolist(), top_lps[i, j].tolist(), strict=True))
                seq.append(int(tokens[i, j]), float(lps[i, j]), int(ranks[i, j]), top)
                if seq.finished:
                    break
        return accepted


def build_runner(params: dict, cfg: ModelConfig, config, device) -> ModelRunner:
    """The runner a group's ``GroupConfig`` asks for: speculative when it sets
    ``num_speculative_tokens``."""
    if config.num_speculative_tokens and isinstance(device, list | tuple) and len(device) > 1:
        log.warning("MTP drafting runs on tp=1 groups; this tp=%d group (a PD prefill group, "
                    "say) runs without it", len(device))
    elif config.num_speculative_tokens:
        return SpecRunner(params, cfg, config.num_blocks, config.block_size, device,
                          num_speculative_tokens=config.num_speculative_tokens)
    return ModelRunner(params, cfg, config.num_blocks, config.block_size, device,
                       staged=config.staged)
