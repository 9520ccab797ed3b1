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
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from typing import Any

import numpy as np

from collectives.p2p import KVChannel, KVTransferHub
from serving.core.balancer import Balancer
from serving.core.dp_group import DPGroup
from serving.core.request import Request
from serving.core.scheduler import SchedulerError, SchedulerOutput
from xds_jax.sequence import Sequence

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


class PrefillGroup(DPGroup):
    """A DP group that only prefills: after the first token a sequence is handed off to the
    ``router``; its blocks stay held until that transfer completes."""

    role = "prefill"

    def __init__(self, *args, router: PDRouter, **kwargs):
        super().__init__(*args, **kwargs)
        self.router = router
        self._held: dict[int, int] = {}  # event id (seq id) -> blocks held for it

    def _before_schedule(self) -> None:
        for event in self.router.completed(self.index):
            self._held.pop(event, None)
            self.blocks.free(event)

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
            self.router.handoff(self, request, seq, table, last=last, hidden=hidden)

    def has_work(self) -> bool:  # held blocks are freed by later (idle) steps' plan()
        return super().has_work() or bool(self._held)


class DecodeGroup(DPGroup):
    """A DP group fed by pulled KV: arrivals wait in order until the pool has room."""

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
        self.arrivals.append(item)
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
                self._owners.pop(seq.seq_id, None)
                continue
            try:
                self.scheduler.check_fits(seq)
            except SchedulerError as e:
                self.arrivals.popleft()
                self._refuse(arrival, e)
                continue
            if not self.scheduler.can_admit_computed(seq):
                self.transfer.deferred += 1
                return  # backpressure: wait for running sequences to finish
            self.arrivals.popleft()
            self._pull(arrival)

    def _pull(self, arrival: Arrival) -> None:
        seq, channel = arrival.seq, arrival.channel
        arrival.pulled_at = time.perf_counter()
        table, reused = self.scheduler.admit_computed(seq)
        channel.pull(seq.seq_id, np.asarray(table[reused:], np.int32), skip=reused)
        sent_before = channel.counters.bytes_sent
        landed = set(channel.arrived())
        while seq.seq_id not in landed:
            channel.push()
            channel.receive(self.runner.import_kv)
            landed |= set(channel.arrived())
        self.blocks.mark_computed(seq.seq_id, seq.all_ids, seq.num_tokens - 1)
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


class PDRouter:
    """The hand-off from prefill to decode groups: picks a request's decode group, owns the
    KV channels (one per (prefill, decode) pair, in ``hub``) and delivers ``Arrival``s.

    ``choose_decode(request) -> group index`` picks a request's decode group at its first
    hand-off (default: the ``Balancer`` over the decode groups' loads); its other sequences
    (``n`` > 1) follow it there.
    """

    def __init__(self, decode: list[DecodeGroup], choose_decode=None,
                 hub: KVTransferHub | None = None):
        self.decode = list(decode)
        self.hub = hub or KVTransferHub()
        self._by_index = {g.index: g for g in self.decode}
        self._choose = choose_decode or self._balanced
        self._balancer = Balancer()
        self._chosen: dict[str, int] = {}  # request id -> decode group, while in prefill
        self._sending: dict[int, list[KVChannel]] = collections.defaultdict(list)
        self._lock = threading.Lock()

    def _balanced(self, request: Request) -> int:
        return self._balancer.choose([g.load() for g in self.decode], request.prompt_ids)

    def handoff(self, source: PrefillGroup, request: Request, seq: Sequence,
                table: list[int], *, last: bool, hidden: Any = None) -> None:
        """(Prefill thread) Offer ``seq``'s KV blocks ``table`` to the request's decode
        group. ``last``: no other sequence of the request remains in ``source``; ``hidden``:
        its last target hidden state (speculative decoding), sent along with the KV."""
        with self._lock:
            if request.request_id not in self._chosen:
                self._chosen[request.request_id] = self._choose(request)
            target = self._by_index[self._chosen[request.request_id]]
            if last:
                del self._chosen[request.request_id]
            channel = self.hub.channel(source.index, target.index, target.runner.kv_sharding)
            if channel not in self._sending[source.index]:
                self._sending[source.index].append(channel)
        channel.offer(seq.seq_id, source.runner.export_kv, table)
        target.deliver(Arrival(request, seq, channel, time.perf_counter(), hidden=hidden))

    def completed(self, prefill_index: int) -> list[int]:
        """Events (sequence ids) whose transfer out of that prefill group completed (or was
        cancelled) since the last call: their blocks may be freed."""
        with self._lock:
            channels = list(self._sending.get(prefill_index, ()))
        return [event for channel in channels for event in channel.completed()]

    def stats(self) -> dict[str, float]:
        """KV transfers into the decode groups."""
        counters = [g.transfer for g in self.decode]
        return {
            "kv_transfers": sum(c.transfers for c in counters),
            "kv_blocks_sent": sum(c.blocks_sent for c in counters),
            "kv_blocks_reused": sum(c.blocks_reused for c in counters),
            "kv_bytes_sent": sum(c.bytes_sent for c in counters),
            "kv_wait_s": sum(c.wait_s for c in counters),
            "kv_transfer_s": sum(c.transfer_s for c in counters),
        }
