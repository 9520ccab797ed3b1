"""Point-to-point KV transfer between two device slices, and ``ppermute`` inside a mesh.

XCCL's send/recv on JAX. Each (source, destination) pair has a ``KVChannel``: a bounded
ring of ``num_slots`` transfer slots that live on the destination (the "managed area";
like XCCL it is not zero-copy). The protocol follows PD disaggregation:

1. the prefill side ``offer``s a finished sequence's KV blocks under an event id and keeps
   the blocks until the transfer completes;
2. the decode side ``pull``s that event when it has free blocks, naming where they go;
3. ``push`` (sender) copies chunks of pulled events into free slots, in order; when the
   ring is full it moves nothing and returns 0 (or waits, with ``block=True``): that is
   backpressure, never a drop or an overwrite;
4. ``receive`` (receiver) hands arrived chunks in order to its ``import_kv`` (``drain``:
   writes them into a pytree of pages), checking each slot's (event id, chunk id) like
   XCCL's metadata, and frees the slots (the ACK);
5. ``completed`` tells the sender which events are fully received, so it frees blocks.

All methods are thread-safe; sender and receiver may run on different threads. Chunks are
``chunk_blocks`` blocks; the last one is padded by repeating its final block (an
idempotent write) so that every copy has one shape and compiles once.

Shape legend: B blocks along ``block_axis`` of every KV page array.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from collectives.stats import CollectiveRecord, CollectiveStats
from xds_jax.multihost import move


class TransferError(RuntimeError):
    """A protocol violation: unknown or duplicate event, mismatched slot metadata."""


@dataclass
class _Transfer:
    event_id: int
    src: object  # pytree of page arrays, or ``export_kv(block_ids) -> pages of those blocks``
    src_blocks: np.ndarray  # the blocks still to move (after a pull's ``skip``)
    offered: np.ndarray  # every block offered (a pull given up on starts from these again)
    dst_blocks: np.ndarray | None = None
    next_push: int = 0
    next_drain: int = 0
    num_chunks: int = 0


@dataclass
class _Slot:
    event_id: int
    chunk_id: int
    dst_blocks: np.ndarray
    data: object  # pytree of [chunk_blocks, ...] arrays on the destination


@dataclass
class ChannelCounters:
    chunks_sent: int = 0
    bytes_sent: int = 0
    ring_full: int = 0  # push attempts that found no free slot (backpressure)
    arrival_order: list = field(default_factory=list)  # (event_id, chunk_id) as drained


@jax.jit
def gather_blocks(pages, ids_B):
    """Blocks ``ids_B`` of every page array (block axis first)."""
    return jax.tree.map(lambda a: jnp.take(a, ids_B, axis=0), pages)


def _scatter_blocks(pages, ids_B, chunk):
    return jax.tree.map(lambda a, c: a.at[ids_B].set(c), pages, chunk)


scatter_blocks = jax.jit(_scatter_blocks)
"""``pages`` with ``chunk`` written into blocks ``ids_B`` (a new pytree)."""
scatter_blocks_donated = jax.jit(_scatter_blocks, donate_argnums=0)
"""The same, in place (``pages`` is donated)."""


class KVChannel:
    """A bounded ring of transfer slots for one (source, destination) pair.

    Args:
      dst_sharding: where a chunk lands (a ``jax.sharding.Sharding`` or a device), matching
        the destination pages' layout with the block axis first.
      num_slots: ring size; a transfer may be longer than the ring.
      chunk_blocks: blocks per chunk.
      donate: let ``drain`` donate the destination pages (the caller must not reuse them).
    """

    def __init__(self, dst_sharding, *, num_slots: int = 4, chunk_blocks: int = 4,
                 donate: bool = False, name: str = "kv",
                 stats: CollectiveStats | None = None) -> None:
        if num_slots < 1 or chunk_blocks < 1:
            raise ValueError("num_slots and chunk_blocks must be >= 1")
        self.dst_sharding, self.num_slots, self.chunk_blocks = dst_sharding, num_slots, chunk_blocks
        self.name = name
        self.stats = stats if stats is not None else CollectiveStats()
        self.counters = ChannelCounters()
        self._scatter = scatter_blocks_donated if donate else scatter_blocks
        self._cv = threading.Condition()
        self._ring: collections.deque[_Slot] = collections.deque()
        self._offered: dict[int, _Transfer] = {}
        self._pulled: collections.deque[_Transfer] = collections.deque()
        self._done: list[int] = []  # fully received or cancelled: the sender may free
        self._arrived: list[int] = []  # fully written at the receiver

    # ---- sender (prefill) side ------------------------------------------------------

    def offer(self, event_id: int, pages: object | Callable[[np.ndarray], object],
              src_blocks) -> None:
        """Make ``src_blocks`` of ``pages`` available under ``event_id``.

        ``pages`` is a pytree of arrays with the block axis first, or the sender's
        ``export_kv(block_ids)`` returning a copy of those blocks (a sender that donates its
        pages step to step reads them under its own lock).
        """
        with self._cv:
            if event_id in self._offered:
                raise TransferError(f"event {event_id} offered twice on channel {self.name}")
            blocks = np.asarray(src_blocks, dtype=np.int32)
            self._offered[event_id] = _Transfer(event_id, pages, blocks, blocks)
            self._cv.notify_all()

    def cancel(self, event_id: int) -> bool:
        """Withdraw an offer nobody pulled (the receiver gave up on it, e.g. an abort); it
        is reported by ``completed`` so the sender frees its blocks. False if already pulled."""
        with self._cv:
            job = self._offered.get(event_id)
            if job is None or job.dst_blocks is not None:
                return False
            del self._offered[event_id]
            self._done.append(event_id)
            return True

    def push(self, *, block: bool = False, timeout: float | None = None) -> int:
        """Copy chunks of pulled transfers into free slots; returns how many were moved.

        With ``block=True`` waits (up to ``timeout`` seconds) for slots until every pulled
        chunk is in the ring. Returns 0 when the ring is full or nothing is pulled.
        """
        moved = 0
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._cv:
                job = self._next_job()
                if job is None:
                    return moved
                if len(self._ring) >= self.num_slots:
                    self.counters.ring_full += 1
                    if not block:
                        return moved
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        return moved
                    self._cv.wait(left)
                    continue
                # Copy under the lock so concurrent pushers keep chunk order; the tail
                # pointer (the ring append) moves only after the copy has landed.
                self._ring.append(self._copy_chunk(job, job.next_push))
                job.next_push += 1
                self._cv.notify_all()
            moved += 1

    def completed(self) -> list[int]:
        """Events fully received since the last call; their source blocks may be freed."""
        with self._cv:
            done, self._done = self._done, []
            return done

    # ---- receiver (decode) side -----------------------------------------------------

    def pull(self, event_id: int, dst_blocks, skip: int = 0) -> None:
        """Ask for ``event_id``'s KV, to be written into ``dst_blocks``: the offered blocks
        after the first ``skip`` (which the receiver already holds, e.g. a cached prefix).
        With nothing left to move the event completes at once."""
        with self._cv:
            job = self._offered.get(event_id)
            if job is None:
                raise TransferError(f"event {event_id} was not offered on channel {self.name}")
            if job.dst_blocks is not None:
                raise TransferError(f"event {event_id} pulled twice on channel {self.name}")
            if not 0 <= skip <= len(job.offered):
                raise TransferError(f"event {event_id}: cannot skip {skip} of "
                                    f"{len(job.offered)} blocks")
            dst = np.asarray(dst_blocks, dtype=np.int32)
            job.src_blocks = job.offered[skip:]
            if len(dst) != len(job.src_blocks):
                raise TransferError(f"event {event_id}: {len(dst)} destination blocks for "
                                    f"{len(job.src_blocks)} source blocks")
            job.dst_blocks = dst
            job.num_chunks = -(-len(dst) // self.chunk_blocks)
            if job.num_chunks == 0:
                del self._offered[event_id]
                self._done.append(event_id)
                self._arrived.append(event_id)
            else:
                self._pulled.append(job)
            self._cv.notify_all()

    def unpull(self, event_id: int) -> None:
        """Give up a pull part-way (the receiver failed after some chunks landed and frees
        the blocks they went to): its chunks still in the ring are dropped and the offer is
        as before the pull, to be pulled again or cancelled."""
        with self._cv:
            job = self._offered.get(event_id)
            if job is None or job.dst_blocks is None or job not in self._pulled:
                raise TransferError(f"event {event_id} is not being pulled on channel "
                                    f"{self.name}")
            self._pulled.remove(job)
            self._ring = collections.deque(s for s in self._ring if s.event_id != event_id)
            job.dst_blocks = None
            job.next_push = job.next_drain = job.num_chunks = 0
            self._cv.notify_all()

    def arrived(self) -> list[int]:
        """Receiver side: events fully written into its pages since the last call."""
        with self._cv:
            done, self._arrived = self._arrived, []
            return done

    def ready(self, event_id: int) -> bool:
        """True once ``event_id`` is offered (the decode side may pull it)."""
        with self._cv:
            return event_id in self._offered

    def drain(self, dst_pages, *, max_chunks: int | None = None):
        """Write arrived chunks into ``dst_pages`` in order and free their slots.

        Returns ``(dst_pages, finished_event_ids)``.
        """
        pages = [dst_pages]

        def write(ids_B, chunk):
            pages[0] = self._scatter(pages[0], jnp.asarray(ids_B), chunk)

        finished = self.receive(write, max_chunks=max_chunks)
        return pages[0], finished

    def receive(self, import_kv: Callable[[np.ndarray, object], None], *,
                max_chunks: int | None = None) -> list[int]:
        """Hand arrived chunks in order to ``import_kv(dst_block_ids, chunk)`` (the
        receiver's runner writes them into its pages) and free their slots; returns the
        events that finished."""
        finished = []
        n = 0
        while max_chunks is None or n < max_chunks:
            with self._cv:
                if not self._ring:
                    break
                slot = self._ring[0]
                job = self._pulled[0] if self._pulled else None
                if job is None or slot.event_id != job.event_id or slot.chunk_id != job.next_drain:
                    raise TransferError(
                        f"slot holds event {slot.event_id} chunk {slot.chunk_id}, expected "
                        f"{None if job is None else (job.event_id, job.next_drain)}")
            import_kv(slot.dst_blocks, slot.data)
            with self._cv:
                self._ring.popleft()  # ACK: the slot is free again
                self.counters.arrival_order.append((slot.event_id, slot.chunk_id))
                job.next_drain += 1
                if job.next_drain == job.num_chunks:
                    self._pulled.popleft()
                    del self._offered[job.event_id]
                    self._done.append(job.event_id)
                    self._arrived.append(job.event_id)
                    finished.append(job.event_id)
                self._cv.notify_all()
            n += 1
        return finished

    def in_flight(self) -> int:
        with self._cv:
            return len(self._ring)

    # ---- internals ------------------------------------------------------------------

    def _next_job(self) -> _Transfer | None:
        for job in self._pulled:
            if job.next_push < job.num_chunks:
                return job
        return None

    def _copy_chunk(self, job: _Transfer, chunk_id: int) -> _Slot:
        lo = chunk_id * self.chunk_blocks
        idx = np.arange(lo, lo + self.chunk_blocks)
        idx = np.minimum(idx, len(job.src_blocks) - 1)  # pad by repeating the last block
        start = time.perf_counter()
        ids_B = job.src_blocks[idx]
        chunk = job.src(ids_B) if callable(job.src) else gather_blocks(job.src, jnp.asarray(ids_B))
        data = jax.block_until_ready(move(chunk, self.dst_sharding))
        nbytes = sum(a.nbytes for a in jax.tree.leaves(data))
        self.counters.chunks_sent += 1
        self.counters.bytes_sent += nbytes
        self.stats.record(CollectiveRecord(
            "kv_send", nbytes, time.perf_counter() - start, 2, nbytes,
            {"channel": self.name, "event": job.event_id, "chunk": chunk_id}))
        return _Slot(job.event_id, chunk_id, job.dst_blocks[idx], data)


class KVTransferHub:
    """The channels of a PD deployment, one per (prefill group, decode group) pair."""

    def __init__(self, *, num_slots: int = 4, chunk_blocks: int = 4,
                 stats: CollectiveStats | None = None) -> None:
        self.num_slots, self.chunk_blocks = num_slots, chunk_blocks
        self.stats = stats if stats is not None else CollectiveStats()
        self._channels: dict[tuple, KVChannel] = {}
        self._lock = threading.Lock()

    def channel(self, src, dst, dst_sharding, donate: bool = False) -> KVChannel:
        """The channel for ``(src, dst)``, created on first use (``donate``: the receiver's
        pages are updated in place; it must not keep the arrays it passes to ``drain``)."""
        with self._lock:
            key = (src, dst)
            if key not in self._channels:
                self._channels[key] = KVChannel(
                    dst_sharding, num_slots=self.num_slots, chunk_blocks=self.chunk_blocks,
                    donate=donate, name=f"{src}->{dst}", stats=self.stats)
            return self._channels[key]

    def channels(self) -> dict[tuple, KVChannel]:
        with self._lock:
            return dict(self._channels)


def shift(x, axis: str, offset: int = 1):
    """Inside ``shard_map``: rank ``i`` receives rank ``i - offset``'s ``x`` (a ring)."""
    n = jax.lax.axis_size(axis)
    return jax.lax.ppermute(x, axis, [(i, (i + offset) % n) for i in range(n)])


def exchange_pairs(x, axis: str):
    """Inside ``shard_map``: ranks ``2j`` and ``2j + 1`` swap ``x`` (odd sizes: last keeps)."""
    n = jax.lax.axis_size(axis)
    perm = [(i, i ^ 1) for i in range(n - n % 2)] + ([(n - 1, n - 1)] if n % 2 else [])
    return jax.lax.ppermute(x, axis, perm)
