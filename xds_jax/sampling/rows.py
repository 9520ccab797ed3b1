"""Sampling the rows of a step: dispatch on device, then append on the host.

``dispatch_rows`` builds the rows' ``SamplingBatch`` and launches the sampler without waiting;
``append_rows`` reads the tokens (and logprobs when asked) and appends them to the sequences
still live then. Between the two the device works on: the asynchronous scheduler launches the
next step with these tokens as its inputs, still on device. A row whose previous token is
still in flight (``in_flight``) counts it: its seeded draw and its ``min_tokens`` ban are
those of the token after it. Shape legend: B rows.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time

import jax
import numpy as np

from xds_jax.errors import XdsError
from xds_jax.multihost import fetch, host_get
from xds_jax.sampling import sampler
from xds_jax.sampling.params import SamplingParams
from xds_jax.sampling.sampler import (
    SamplerFlags,
    SamplingBatch,
    flags_for,
    make_batch,
    rows_batch,
    sample,
)
from xds_jax.sequence import Sequence

log = logging.getLogger(__name__)

_IDLE_ROW = SamplingParams(temperature=0)
_GREEDY = SamplerFlags()


@dataclasses.dataclass(frozen=True)
class SampledRows:
    """One launch's sampled tokens ``[B]`` on device, and the sequence of each row."""

    seqs: list  # per row: the Sequence to append to, or None (idle row)
    tokens_B: jax.Array
    extras: tuple | None  # logprobs, ranks, top-N ids and logprobs; None: no row asked


def dispatch_rows(logits_BV: jax.Array, seqs: list[Sequence | None], vocab_size: int,
                  in_flight: set[int] = frozenset(),
                  greedy_B: jax.Array | None = None, ahead: int = 0) -> SampledRows | None:
    """Launch the sampler over every row of the bucket (idle rows greedily, results dropped,
    so it compiles once per bucket rather than once per number of live rows). None when no
    row is live. ``in_flight``: seq ids whose previous sampled token is not appended yet.
    ``greedy_B``: the argmax of each row, computed with the logits (``model_step``); a batch
    that only takes argmaxes takes these and launches no sampler. ``ahead``: tokens every
    live row has sampled before this one and not appended yet (the steps before it in a
    chain, ``serving.core.runner``); they count as ``in_flight``'s one does."""
    live = [s if s is not None and not s.finished else None for s in seqs]
    if not any(live):
        return None
    params = [s.params if s else _IDLE_ROW for s in live]
    distinct = list({id(p): p for p in params}.values())
    flags = flags_for(distinct)
    ahead_B = [ahead + int(s is not None and s.seq_id in in_flight) for s in live]
    if any(s is not None and a and s.params.reads_outputs
           for s, a in zip(live, ahead_B, strict=True)):
        raise XdsError("penalties and grammars read every output token: a row with a token "
                       "in flight cannot sample with them (the group schedules it "
                       "synchronously)")
    allowed = [s.allowed_mask(vocab_size) if s is not None and s.params.masked
               else None for s in live]
    constrained = any(a is not None for a in allowed)
    if flags == _GREEDY and not constrained and all(p.min_tokens == 0 for p in distinct):
        if greedy_B is not None:
            return SampledRows(live, greedy_B, None)
        batch = _greedy_batch(len(live))  # nothing per row: argmax
    else:
        batch = make_batch(
            params, [s.seed if s else 0 for s in live],
            [len(s.output_ids) + a if s else 0 for s, a in zip(live, ahead_B, strict=True)],
            [s.prompt_ids if s else [] for s in live], [s.output_ids if s else [] for s in live],
            [s.banned_ids(a) if s else [] for s, a in zip(live, ahead_B, strict=True)],
            vocab_size, flags, allowed if constrained else None)
    programs, start = sampler.sample._cache_size(), time.perf_counter()
    tokens, *extras = sample(logits_BV, batch, flags)
    if sampler.sample._cache_size() != programs:  # compiled before it dispatched
        log.info("compiled the sampler program for %d rows (%s) in %.2f s", len(live), flags,
                 time.perf_counter() - start)
    return SampledRows(live, tokens, tuple(extras) if flags.logprobs else None)


def append_rows(sampled: SampledRows | None, logits_BV: jax.Array | None = None) -> None:
    """Read the sampled tokens and append each to its sequence, unless it finished since the
    launch (a stop or an abort while the step ran: its token is dropped). Host logits
    (``logits_BV`` a numpy array) were sampled on this process's device; device logits are
    read on every process."""
    if sampled is None:
        return
    read = host_get if isinstance(logits_BV, np.ndarray) else fetch
    if sampled.extras is None:
        tokens = read(sampled.tokens_B).tolist()
        for s, token in zip(sampled.seqs, tokens, strict=True):
            if s is not None and not s.finished:
                s.append(token)
        return
    tokens, lps, ranks, top_ids, top_lps = read((sampled.tokens_B, *sampled.extras))
    for j, s in enumerate(sampled.seqs):
        if s is not None and not s.finished:
            top = list(zip(top_ids[j].tolist(), top_lps[j].tolist(), strict=True))
            s.append(int(tokens[j]), float(lps[j]), int(ranks[j]), top)


def sample_rows(logits_BV: jax.Array, seqs: list[Sequence | None], vocab_size: int,
                greedy_B: jax.Array | None = None) -> None:
    """Sample one token for each live row and append it to its sequence (``greedy_B``: as
    ``dispatch_rows`` takes it)."""
    append_rows(dispatch_rows(logits_BV, seqs, vocab_size, greedy_B=greedy_B), logits_BV)


@functools.lru_cache(maxsize=16)
def _greedy_batch(rows: int) -> SamplingBatch:
    """The batch of ``rows`` greedy rows that ban nothing (the sampler reads none of it but
    its shape), built once."""
    return rows_batch(_IDLE_ROW, rows, 1, _GREEDY)
