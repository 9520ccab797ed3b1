"""PD disaggregation: a prefill pool and a decode pool joined by pulled KV transfers.

A request enters a **prefill group** (TP over its devices, prompts chunked into bucketed
programs). When its prompt is done the first token is sampled there and streamed at once;
the sequence then leaves the prefill scheduler with its blocks held, and its KV is
**offered** on the ``KVChannel`` of (this prefill group, the chosen decode group): one
channel per pair, as XCCL/DistFlow pair them. The **decode group** takes arrivals in order
and **pulls** one only when a slot and the blocks for it are free (backpressure: the
prefill group keeps waiting, nothing is dropped); blocks of a prefix already in its own
prefix cache are reused and not transferred. Chunks go through the channel's bounded ring
into the decode pages; when the event completes the prefill group frees its blocks and
the sequence decodes from the next step.

Both sides are ordinary ``DPGroup``s (own scheduler, KV, runner, thread); only the two
hooks of a step differ. ``PrefillGroup`` hands sequences off to the ``PDRouter`` after
sampling; the router picks the decode group, owns the channels and delivers an ``Arrival``
message; a ``DecodeGroup`` admits pulled sequences before scheduling. KV leaves and enters the
runners only through ``export_kv``/``import_kv``, so nothing recompiles for a transfer.

Failures (``docs/reliability.md``): a failed pull is retried ``kv_retries`` times, then its
offer is cancelled and the sequence prefilled again (``PDRouter.on_lost``). A group out of
service gets no hand-offs (``group_lost``); unpulled offers it made or held are cancelled,
their sequences prefilled again elsewhere.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from collectives.p2p import KVChannel, TransferError
from serving.core.balancer import NoHealthyGroupError
from serving.core.dp_group import DPGroup, Resume
from serving.core.faults import KVTransferFailed
from serving.core.queue_order import priority_key
from serving.core.request import Request
from serving.core.scheduler import SchedulerError, SchedulerOutput
from xds_jax.sequence import Sequence

if TYPE_CHECKING:
    from serving.disagg.pd_router import PDRouter

log = logging.getLogger(__name__)

MAX_EARLY_ABORTS = 4096


@dataclasses.dataclass
class Arrival:
    """Inbox message of a decode group: a prefilled sequence offered to it, to be pulled."""

    request: Request
    seq: Sequence
    channel: KVChannel
    offered_at: float  # time.perf_counter(), the timeline's clock
    pulled_at: float | None = None
    failures: int = 0  # failed pulls so far
    hidden: Any = None  # speculative decoding: the prefill's pending target hidden state


@dataclasses.dataclass
class TransferCounters:
    transfers: int = 0
    blocks_sent: int = 0
    blocks_reused: int = 0  # found in the decode group's prefix cache: not sent
    bytes_sent: int = 0
    deferred: int = 0  # steps that left an arrival waiting for room (backpressure)
    wait_s: float = 0.0  # offered -> pulled
    transfer_s: float = 0.0  # pulled -> written
    retries: int = 0  # failed pulls tried again
    reprefills: int = 0  # sequences sent back to prefill after their pulls kept failing
    cancelled: int = 0  # offers held here, cancelled when the group went out of service


class PrefillGroup(DPGroup):
    """A DP group that only prefills: after the first token a sequence is handed off to the
    ``router``; its blocks stay held until that transfer completes."""

    role = "prefill"
    may_overlap = False  # each step's finished prompts are handed off before the next

    def __init__(self, *args, router: PDRouter, **kwargs):
        super().__init__(*args, **kwargs)
        self.router = router
        self._held: dict[int, int] = {}  # event id (seq id) -> blocks held for it

    def _before_schedule(self) -> None:
        for event in self.router.completed(self.index):
            if self._held.pop(event, None) is not None:  # not freed already by a reset
                self.blocks.free(event)

    def _reset(self) -> None:
        super()._reset()
        for event in self._held:
            self.blocks.free(event)
        self._held.clear()

    @property
    def held_blocks(self) -> int:
        """Blocks kept for offered transfers (freed as each one completes)."""
        return sum(self._held.values())

    def _after_step(self, out: SchedulerOutput) -> None:
        for item in out.scheduled:
            seq = item.seq
            if not item.is_last_chunk or seq.finished:
                continue
            request = self._owners.get(seq.seq_id)
            if request is None:
                continue
            table = self.scheduler.detach(seq.seq_id)
            self._held[seq.seq_id] = len(table)
            self._owners.pop(seq.seq_id)
            if not any(s.seq_id in self._owners for s in request.seqs):
                self.requests.pop(request.request_id, None)
            last = not any(s.seq_id in self._owners for s in request.seqs if not s.finished)
            hidden = getattr(self.runner, "pending", {}).pop(seq.seq_id, None)
            try:
                self.router.handoff(self, request, seq, table, last=last,
                                    hidden=hidden)
            except NoHealthyGroupError as error:  # every decode group is out of service
                del self._held[seq.seq_id]
                self.blocks.free(seq.seq_id)
                self.fail_request(request, error)

    def has_work(self) -> bool:  # held blocks are freed by later (idle) steps' plan()
        return super().has_work() or bool(self._held)


class DecodeGroup(DPGroup):
    """A DP group fed by pulled KV: arrivals wait in order (the priority scheduling policy:
    in ``priority_key`` order) until the pool has room."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.arrivals: collections.deque[Arrival] = collections.deque()
        # Aborts that may have overtaken their request's hand-off (engine aborts everywhere).
        self._early_aborts: collections.OrderedDict[str, bool] = collections.OrderedDict()
        self.transfer = TransferCounters()
        self._handlers[Arrival] = self._arrive

    def _arrive(self, item: Arrival) -> None:
        request = item.request
        self.requests.setdefault(request.request_id, request)
        self._owners[item.seq.seq_id] = request
        self.scheduler.order.queue(self.arrivals, item, seq_of=lambda a: a.seq)
        if self._early_aborts.pop(request.request_id, False):
            self._abort(request.request_id)  # aborted while in flight from prefill

    def _abort(self, request_id: str) -> None:
        if request_id in self.requests:
            super()._abort(request_id)  # waiting arrivals are cancelled before the next pull
            return
        self._early_aborts[request_id] = True
        while len(self._early_aborts) > MAX_EARLY_ABORTS:
            self._early_aborts.popitem(last=False)

    def has_work(self) -> bool:
        return super().has_work() or bool(self.arrivals)

    def _forget_arrival(self, arrival: Arrival) -> None:
        """Forget an arrival's sequence here without touching it (it goes on elsewhere)."""
        request = arrival.request
        self._owners.pop(arrival.seq.seq_id, None)
        if not any(s.seq_id in self._owners for s in request.seqs):
            self.requests.pop(request.request_id, None)

    def _take_work(self) -> list[Resume]:
        for arrival in self.arrivals:  # offers held here: cancelled, so prefill frees them
            if arrival.channel.cancel(arrival.seq.seq_id):
                self.transfer.cancelled += 1
            else:
                self._forget_arrival(arrival)  # withdrawn already: the router prefills it again
        self.arrivals.clear()
        return super()._take_work()

    def _reset(self) -> None:
        super()._reset()
        self.arrivals.clear()
        self._early_aborts.clear()

    def load(self):
        load = super().load()
        return dataclasses.replace(load, num_waiting=load.num_waiting + len(self.arrivals))

    def _before_schedule(self) -> None:
        """Pull arrivals in order while a slot and their blocks are free."""
        while self.arrivals:
            arrival = self.arrivals[0]
            seq = arrival.seq
            if seq.finished:  # aborted while waiting: the prefill side frees its blocks
                self.arrivals.popleft()
                arrival.channel.cancel(seq.seq_id)
                # its request goes with its last sequence here (another sample's arrival
                # may have brought back a request the abort had ended)
                self._forget_arrival(arrival)
                continue
            if not arrival.channel.ready(seq.seq_id):  # withdrawn: its prefill group is lost
                self.arrivals.popleft()
                self._forget_arrival(arrival)
                continue
            try:
                self.scheduler.check_fits(seq)
            except SchedulerError as e:
                self.arrivals.popleft()
                self._refuse(arrival, e)
                continue
            if not self.scheduler.can_admit_computed(seq) or self._outranked(seq):
                self.transfer.deferred += 1
                return  # backpressure: wait for running sequences to finish
            self.arrivals.popleft()
            try:
                self._pull(arrival)
            except KVTransferFailed as error:
                self.scheduler.drop(seq.seq_id)
                if not self._pull_failed(arrival, error):
                    return  # tried again at the next step
            except TransferError:  # withdrawn just now: the router prefills it again
                self.scheduler.drop(seq.seq_id)
                self._forget_arrival(arrival)

    def _outranked(self, seq: Sequence) -> bool:
        """Priority policy: a sequence of higher priority waits here (preempted or moved in),
        so a pull now could be preempted for it in the same step, its transfer wasted."""
        waiting = self.scheduler.waiting
        return (self.scheduler.order.by_priority and bool(waiting)
                and priority_key(waiting[0]) < priority_key(seq))

    def _pull_failed(self, arrival: Arrival, error: Exception) -> bool:
        """Queue a failed pull first again while retries are left (False), else cancel it and
        send the sequence back to prefill (True)."""
        arrival.failures += 1
        seq = arrival.seq
        if arrival.failures <= self.router.kv_retries:
            log.warning("decode group %d: KV pull of sequence %d failed (%s); retry %d of %d",
                        self.index, seq.seq_id, error, arrival.failures, self.router.kv_retries)
            self.transfer.retries += 1
            self.arrivals.appendleft(arrival)
            return False
        log.error("decode group %d: KV pull of sequence %d failed %d times (%s); prefilling "
                  "it again", self.index, seq.seq_id, arrival.failures, error)
        self._forget_arrival(arrival)
        if arrival.channel.cancel(seq.seq_id):  # else withdrawn: the router took care of it
            self.transfer.reprefills += 1
            self.router.on_lost(Resume(arrival.request, [seq]))
        return True

    def _pull(self, arrival: Arrival) -> None:
        """Admit the arrival's sequence and move its KV here (raises ``KVTransferFailed``,
        or ``TransferError`` if the offer was withdrawn, with the sequence admitted)."""
        seq, channel = arrival.seq, arrival.channel
        arrival.pulled_at = time.perf_counter()
        table, reused = self.scheduler.admit_computed(seq)
        self.faults.during_transfer(self, 0)
        channel.pull(seq.seq_id, np.asarray(table[reused:], np.int32), skip=reused)
        sent_before = channel.counters.bytes_sent
        landed = set(channel.arrived())
        chunks = 0
        while seq.seq_id not in landed:  # one chunk lands per turn
            channel.push()
            channel.receive(self.runner.import_kv, max_chunks=1)
            landed |= set(channel.arrived())
            chunks += 1
            if seq.seq_id not in landed:
                try:
                    self.faults.during_transfer(self, chunks)
                except KVTransferFailed:
                    channel.unpull(seq.seq_id)  # the caller frees the blocks written so far
                    raise
        self.blocks.mark_computed(seq.seq_id, seq.token_view(), seq.num_tokens - 1)
        if arrival.hidden is not None and hasattr(self.runner, "pending"):
            self.runner.pending[seq.seq_id] = arrival.hidden  # the first step can draft
        now = time.perf_counter()
        c = self.transfer
        c.transfers += 1
        c.blocks_sent += len(table) - reused
        c.blocks_reused += reused
        nbytes = channel.counters.bytes_sent - sent_before
        c.bytes_sent += nbytes
        c.wait_s += arrival.pulled_at - arrival.offered_at
        c.transfer_s += now - arrival.pulled_at
        if self.timeline is not None:
            self.timeline.span("transfer", "kv_wait", arrival.offered_at, arrival.pulled_at,
                               stream=f"decode{self.index}", seq=seq.seq_id)
            self.timeline.span("transfer", "kv_transfer", arrival.pulled_at, now,
                               stream=f"decode{self.index}", seq=seq.seq_id, bytes=nbytes)

    def _refuse(self, arrival: Arrival, error: Exception) -> None:
        log.error("decode group %d refused request %s: %s", self.index,
                  arrival.request.request_id, error)
        arrival.channel.cancel(arrival.seq.seq_id)
        self._end_aborted(arrival.request)
