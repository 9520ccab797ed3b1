"""The PD router: which decode group takes a prefilled sequence, the KV channels of each
hand-off, and what happens to them when a group fails (``serving.disagg.pd`` holds the
prefill and decode groups it connects)."""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from typing import Any

from collectives.p2p import KVChannel, KVTransferHub
from serving.core.balancer import Balancer
from serving.core.dp_group import DPGroup, GroupFencedError, Resume
from serving.core.request import Request
from serving.disagg.pd import Arrival, DecodeGroup, PrefillGroup
from xds_jax.sequence import Sequence


@dataclasses.dataclass(frozen=True)
class _Offer:  # a hand-off the router made and its source has not seen complete
    source: int  # prefill group index
    channel: KVChannel
    request: Request
    seq: Sequence


class PDRouter:
    """The hand-off from prefill to decode groups: picks a request's decode group, owns the
    KV channels (one per (prefill, decode) pair, in ``hub``) and delivers ``Arrival``s.

    ``choose_decode(request) -> group index`` picks a request's decode group at its first
    hand-off (default: the ``Balancer`` over the decode groups' loads; a healthy group is
    chosen instead of one out of service); its other sequences (``n`` > 1) follow it there.
    ``kv_retries``: failed pulls tried again before the sequence is prefilled again through
    ``on_lost`` (the engine sets it to its ``resume``).
    """

    def __init__(self, decode: list[DecodeGroup], choose_decode=None,
                 hub: KVTransferHub | None = None, kv_retries: int = 1):
        self.decode = list(decode)
        self.hub = hub or KVTransferHub()
        self.kv_retries = kv_retries
        self.on_lost = _nowhere
        self._by_index = {g.index: g for g in self.decode}
        self._choose = choose_decode or self._balanced
        self._balancer = Balancer()
        self._chosen: dict[str, int] = {}  # request id -> decode group, while in prefill
        self._sending: dict[int, list[KVChannel]] = collections.defaultdict(list)
        # (prefill index, seq id) -> the offer, until that prefill group sees it complete
        self._offers: dict[tuple[int, int], _Offer] = {}
        self._lost: set[int] = set()  # groups out of service
        self.withdrawn = 0  # offers of lost prefill groups, cancelled before any pull
        self._lock = threading.Lock()
        for g in self.decode:
            g.router = self

    def _balanced(self, request: Request) -> int:
        return self._balancer.choose([g.load() for g in self.decode], request.prompt_ids,
                                     request.seqs[0].salt)

    def _target(self, request: Request) -> DecodeGroup:
        """The request's decode group (under the lock): chosen at its first hand-off, again
        if that group is out of service."""
        index = self._chosen.get(request.request_id)
        if index is None or index in self._lost:
            index = self._choose(request)
            if index in self._lost:  # a custom choice of a lost group
                index = self._balanced(request)
            self._chosen[request.request_id] = index
        return self._by_index[index]

    def handoff(self, source: PrefillGroup, request: Request, seq: Sequence,
                table: list[int], *, last: bool, hidden: Any = None) -> None:
        """(Prefill thread) Offer ``seq``'s KV blocks ``table`` to the request's decode
        group. ``last``: no other sequence of the request remains in ``source``; ``hidden``:
        its last target hidden state (speculative decoding), sent along with the KV. A decode
        group fenced at this moment gets nothing: the offer is cancelled and the sequence
        prefilled again."""
        with self._lock:
            target = self._target(request)
            if last:
                del self._chosen[request.request_id]
            channel = self.hub.channel(source.index, target.index, target.runner.kv_sharding)
            if channel not in self._sending[source.index]:
                self._sending[source.index].append(channel)
            channel.offer(seq.seq_id, source.runner.export_kv, table)
            self._offers[source.index, seq.seq_id] = _Offer(source.index, channel, request, seq)
            try:
                target.deliver(Arrival(request, seq, channel, time.perf_counter(),
                                       hidden=hidden))
                return
            except GroupFencedError:
                channel.cancel(seq.seq_id)
        self.on_lost(Resume(request, [seq]))

    def completed(self, prefill_index: int) -> list[int]:
        """Events (sequence ids) whose transfer out of that prefill group completed (or was
        cancelled) since the last call: their blocks may be freed."""
        with self._lock:
            channels = list(self._sending.get(prefill_index, ()))
            events = [event for channel in channels for event in channel.completed()]
            for event in events:
                self._offers.pop((prefill_index, event), None)
        return events

    def group_lost(self, group: DPGroup) -> None:
        """(The engine, taking ``group`` out of service) Hand off to it no more; offers it
        made that no decode group pulled yet are cancelled and prefilled again elsewhere."""
        with self._lock:
            self._lost.add(group.index)
            self._chosen = {r: i for r, i in self._chosen.items() if i != group.index}
            mine = [o for o in self._offers.values() if o.source == group.index]
            lost = [o for o in mine if o.channel.cancel(o.seq.seq_id)]
            for offer in mine:
                del self._offers[offer.source, offer.seq.seq_id]
            self.withdrawn += len(lost)
        for offer in lost:
            self.on_lost(Resume(offer.request, [offer.seq]))

    def group_back(self, group: DPGroup) -> None:
        with self._lock:  # in service again: hand-offs may go to it
            self._lost.discard(group.index)

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
            "kv_transfer_retries": sum(c.retries for c in counters),
            "kv_reprefills": sum(c.reprefills for c in counters),
            "kv_offers_cancelled": sum(c.cancelled for c in counters) + self.withdrawn,
        }


def _nowhere(move: Resume) -> None:
    """``on_lost`` of a router no engine runs: the sequence cannot go on."""
    move.request.fail(RuntimeError("its KV transfer failed and no engine can prefill it again"))
