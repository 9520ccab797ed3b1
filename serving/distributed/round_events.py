"""What process 0 sends the others each round (``serving.distributed.lockstep``): the requests,
aborts and releases that arrived since the last round, on the wire and applied again on every
process alike, and the fingerprint of the engine state they check."""

from __future__ import annotations

import dataclasses
import zlib

from serving.core.engine import Engine
from serving.core.request import Request
from serving.core.request_outcomes import DuplicateRequestError
from xds_jax.sampling.params import SamplingParams


@dataclasses.dataclass(frozen=True)
class Submit:
    """A new request, as every process rebuilds it (sequence ids and seeds as the leader's)."""

    request_id: str
    prompt: str | None
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    seqs: tuple[tuple[int, int], ...]  # (seq_id, seed) per sample
    priority: int = 0  # the scheduling policy's order (every process's queues alike)
    cache_salt: str | None = None  # which cached blocks it may share


@dataclasses.dataclass(frozen=True)
class Abort:
    request_id: str


@dataclasses.dataclass(frozen=True)
class Release:
    request_id: str


@dataclasses.dataclass(frozen=True)
class Round:
    """What process 0 sends before each round: the inputs that arrived since the last one and
    a fingerprint of its engine state before applying them."""

    number: int
    events: tuple
    fingerprint: int


def fingerprint(engine: Engine) -> int:
    """A checksum of what the schedulers did so far (equal on every process in lockstep)."""
    state = [(g.index, g.steps, g.generated_tokens, g.scheduler.num_running,
              g.scheduler.num_waiting, g.healthy) for g in engine.groups]
    return zlib.crc32(repr(state).encode())


def requests_of(seqs: list) -> list[Request]:
    """``LLM.generate``'s sequences as requests of all the samples one ``make_sequences``
    made (a first sample and those ``fork_of`` it), as every process rebuilds a request from
    its wire form: a request per sample of an n > 1 prompt made each follower build n
    samples for one and fail."""
    groups: dict[int, list] = {}
    for seq in seqs:
        groups.setdefault((seq.fork_of or seq).seq_id, []).append(seq)
    return [Request(f"seq-{group[0].seq_id}", None, group[0].prompt_ids, group[0].params, group)
            for group in groups.values()]


def wire(item):
    """What a queued item looks like on the wire."""
    if isinstance(item, Request):
        first = item.seqs[0]
        return Submit(item.request_id, item.prompt, tuple(item.prompt_ids), item.params,
                      tuple((s.seq_id, s.seed) for s in item.seqs), first.priority,
                      first.cache_salt)
    return item


def apply(engine: Engine, item) -> None:
    if isinstance(item, Request):
        try:
            engine.submit(item)
        except DuplicateRequestError as error:  # refused alike on every process
            item.fail(error)
            if item.on_output is not None:  # process 0's caller hears of it
                item.on_output(item.snapshot())
    elif isinstance(item, Abort):
        engine.abort(item.request_id)
    elif isinstance(item, Release):
        engine.release(item.request_id)
    else:
        raise TypeError(f"unknown lockstep event {type(item).__name__}")
