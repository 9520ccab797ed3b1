"""Host side of MTP speculative decoding, shared by every layout that drafts.

``SpecState`` is one runner's (a colocated or PD group's ``SpecRunner``, an MA rank's
``RankView``) bookkeeping: the pending target hiddens of each sequence (positions whose MTP
pair (hidden, next token) is not in the MTP KV yet), the draft inputs built from them, and the
acceptance counters. ``emit_verified`` turns one decode step's drafts and target logits into
appended tokens (rows may belong to different ranks' states, as in an MA micro-batch).

Shape legend: B rows, W pending pairs per row, K drafts per row, V vocabulary, D hidden.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from xds_jax.generate import sample_rows
from xds_jax.multihost import host_get
from xds_jax.sampling.params import logprobs_program_width
from xds_jax.sampling.rejection import verify_drafts


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
    banned ids, no logit bias, no token mask (grammar, allowed ids, bad words); others decode one
    token a step (still through the same program)."""
    p = seq.params
    return (p.repetition_penalty == 1 and not p.frequency_penalty and not p.presence_penalty
            and not (p.min_p > 0 and not p.greedy) and not seq.banned_ids()
            and not p.logit_bias and not p.masked)


@dataclasses.dataclass
class DraftRows:
    """Host inputs of one draft: per row its pending pairs and how many tokens it drafts."""

    tokens_BW: np.ndarray  # the token after each pending hidden
    hidden_BWD: np.ndarray
    positions_BW: np.ndarray  # target positions of the hiddens (-1: padding)
    last_B: np.ndarray  # index of the last pending pair (drafts token 1)
    num_drafts_B: np.ndarray  # 0: the row decodes one token (no pending, or not speculable)

    @property
    def last_position_B(self) -> np.ndarray:
        """Position of each row's last pending pair (-1 for rows without one)."""
        return np.take_along_axis(self.positions_BW, self.last_B[:, None], axis=1)[:, 0]

    @staticmethod
    def concat(parts: list[DraftRows]) -> DraftRows:
        return DraftRows(*(np.concatenate([getattr(p, f.name) for p in parts])
                           for f in dataclasses.fields(DraftRows)))


class SpecState:
    """Pending hiddens and acceptance counters of one runner drafting ``k`` tokens a step."""

    def __init__(self, k: int, hidden_size: int):
        self.k = k
        self.hidden_size = hidden_size
        self.pending: dict[int, Pending] = {}
        self.num_drafts = 0
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.accepted_per_position = [0] * k

    def stats(self) -> dict:
        return {"spec_num_drafts": self.num_drafts, "spec_draft_tokens": self.num_draft_tokens,
                "spec_accepted_tokens": self.num_accepted_tokens,
                "spec_accepted_per_position": list(self.accepted_per_position)}

    def prune(self) -> None:
        """Forget finished (or aborted) sequences."""
        for seq_id in [i for i, p in self.pending.items() if p.seq.finished]:
            del self.pending[seq_id]

    def pending_of(self, item) -> Pending | None:
        p = self.pending.get(item.seq.seq_id)
        if p is None or p.seq is not item.seq or p.first + len(p.hidden) != item.start:
            return None  # e.g. arrived without a hidden state: this step cannot draft
        return p

    def width(self, items: list) -> int:
        """Pending pairs the widest row carries (at least 1)."""
        return max((len(p.hidden) for p in map(self.pending_of, items) if p is not None),
                   default=1)

    def draft_rows(self, items: list, rows: int, width: int) -> DraftRows:
        """Draft inputs of ``items`` (decode rows) padded to ``rows`` x ``width``."""
        out = DraftRows(np.zeros((rows, width), np.int32),
                        np.zeros((rows, width, self.hidden_size), np.float32),
                        np.full((rows, width), -1, np.int32), np.zeros((rows,), np.int32),
                        np.zeros((rows,), np.int32))
        for i, s in enumerate(items):
            p = self.pending_of(s)
            if p is None:
                continue
            m, ids = len(p.hidden), s.seq.all_ids
            out.hidden_BWD[i, :m] = p.hidden
            out.positions_BW[i, :m] = np.arange(p.first, p.first + m)
            out.tokens_BW[i, :m] = ids[p.first + 1:p.first + 1 + m]
            out.last_B[i] = m - 1
            if speculable(s.seq):
                out.num_drafts_B[i] = min(self.k, s.num_lookahead)
        return out

    def keep_prefill(self, items: list, hidden_BD: np.ndarray) -> None:
        """After a prefill chunk: the last prompt position's hidden waits for its token."""
        for i, s in enumerate(items):
            if s.is_last_chunk and not s.seq.finished:
                first = s.start + s.num_tokens - 1
                self.pending[s.seq.seq_id] = Pending(s.seq, hidden_BD[i:i + 1], first)

    def keep_decode(self, items: list, num_drafts_B, accepted_B, hidden_BKD) -> None:
        """After a decode step: count the drafts; the accepted positions' hiddens pend."""
        self.count(np.asarray(num_drafts_B)[:len(items)], np.asarray(accepted_B)[:len(items)])
        for i, s in enumerate(items):
            self.keep_pending(s.seq, hidden_BKD[i, :accepted_B[i] + 1], s.start)

    def count(self, num_drafts_B: np.ndarray, accepted_B: np.ndarray) -> None:
        """Count one step's drafts and accepted tokens (rows that drafted)."""
        for n, a in zip(num_drafts_B.tolist(), accepted_B.tolist(), strict=True):
            if n > 0:
                self.num_drafts += 1
                self.num_draft_tokens += n
                self.num_accepted_tokens += a
                for j in range(a):
                    self.accepted_per_position[j] += 1

    def keep_pending(self, seq, hidden_MD: np.ndarray, first: int) -> None:
        """Hiddens ``[m, D]`` of positions ``first ..`` wait for the MTP block; a finished
        sequence keeps none."""
        if seq.finished:
            self.pending.pop(seq.seq_id, None)
        else:
            self.pending[seq.seq_id] = Pending(seq, np.asarray(hidden_MD), first)


def prefill_pairs(items: list, shape: tuple) -> tuple[np.ndarray, np.ndarray]:
    """The MTP block's inputs over prefill rows ``[B, S]`` (``items`` may hold None for
    padding rows): the next prompt token of each position and its position (-1 where the
    next token is not known yet)."""
    nxt = np.zeros(shape, np.int32)
    mtp_pos = np.full(shape, -1, np.int32)
    for i, s in enumerate(items):
        if s is None:
            continue
        ids = s.seq.all_ids
        for j in range(s.num_tokens):
            p = s.start + j
            if p + 1 < len(ids):
                nxt[i, j], mtp_pos[i, j] = ids[p + 1], p
    return nxt, mtp_pos


def emit_decode(seqs: list, num_drafts_B, drafts_BK, logits_BKV, vocab_size: int,
                greedy_BK1=None) -> np.ndarray:
    """Append one decode step's tokens to ``seqs`` (per row a Sequence or None): rows with
    no drafts sample position 0 as usual, the others keep their verified run. ``greedy_BK1``:
    the target's argmax at each position, computed in the step program (``spec_step``); rows
    that only take argmaxes are then verified on the host, with no verifier program. Returns
    the accepted drafts per row ``[B]``."""
    num_drafts_B = np.asarray(num_drafts_B)
    plain = [s if s is not None and num_drafts_B[i] == 0 else None for i, s in enumerate(seqs)]
    if any(s is not None for s in plain):
        sample_rows(logits_BKV[:, 0], plain, vocab_size,
                    None if greedy_BK1 is None else greedy_BK1[:, 0])
    accepted = np.zeros((len(seqs),), np.int32)
    spec = [s if s is not None and num_drafts_B[i] > 0 else None for i, s in enumerate(seqs)]
    if any(s is not None for s in spec):
        accepted = _emit_verified(spec, num_drafts_B, drafts_BK, logits_BKV, vocab_size,
                                  greedy_BK1)
    return accepted


def _emit_verified(seqs: list, num_drafts, drafts, logits, vocab_size: int,
                   greedy_BK1) -> np.ndarray:
    params = [s.params if s is not None else None for s in seqs]
    live = [p for p in params if p is not None]
    random = any(not p.greedy for p in live)
    want = any(p.logprobs is not None for p in live)
    num_drafts = np.where([s is not None for s in seqs], num_drafts, 0).astype(np.int32)
    if greedy_BK1 is not None and not random and not want:
        tokens, drafts = host_get((greedy_BK1, drafts))
        accepted = accept_greedy(tokens, drafts, num_drafts)
    else:
        tokens, accepted, *logprobs = _verify(seqs, params, num_drafts, drafts, logits,
                                              vocab_size, random, want)
    if want:
        lps, ranks, top_ids, top_lps = logprobs
    for i, seq in enumerate(seqs):
        if seq is None:
            continue
        for j in range(int(accepted[i]) + 1):
            if want:
                top = list(zip(top_ids[i, j].tolist(), top_lps[i, j].tolist(), strict=True))
                seq.append(int(tokens[i, j]), float(lps[i, j]), int(ranks[i, j]), top)
            else:
                seq.append(int(tokens[i, j]))
            if seq.finished:
                break
    return np.where([s is not None for s in seqs], accepted, 0)


def accept_greedy(greedy_BK1: np.ndarray, drafts_BK: np.ndarray,
                  num_drafts_B: np.ndarray) -> np.ndarray:
    """Accepted drafts per row ``[B]`` of greedy rows: the run of leading drafts equal to the
    target's argmax (``verify_drafts`` without sampling, on the host)."""
    k = drafts_BK.shape[1]
    match = (np.arange(k)[None, :] < num_drafts_B[:, None]) & (drafts_BK == greedy_BK1[:, :k])
    return np.cumprod(match, axis=1).sum(axis=1).astype(np.int32)


def _verify(seqs: list, params: list, num_drafts, drafts, logits, vocab_size: int,
            random: bool, want: bool) -> list:
    """``verify_drafts`` over the rows, read back: tokens, accepted and (``want``) logprobs."""
    f32 = functools.partial(np.asarray, dtype=np.float32)
    live = [p for p in params if p is not None]
    temps = f32([p.temperature if p else 0 for p in params])
    top_k = np.asarray([min(p.top_k, vocab_size) if p else 0 for p in params], np.int32)
    top_p = f32([p.top_p if p else 1 for p in params])
    seeds = np.asarray([(s.seed if s else 0) % (1 << 32) for s in seqs], np.uint32)
    steps = np.asarray([len(s.output_ids) if s else 0 for s in seqs], np.int32)
    top_k_top_p = any(p.top_p < 1 or p.top_k > 0 for p in live if not p.greedy)
    return host_get(verify_drafts(logits, drafts, num_drafts, temps, top_k, top_p, seeds,
                                  steps, random=random, top_k_top_p=top_k_top_p,
                                  logprobs=want,
                                  num_logprobs=logprobs_program_width(live)))
