"""Taking a DP group out of service: the fence, handing its work back, rejoining.

When the engine takes a group out of service (its loop raised, or its heartbeat stopped) it
**fences** it: the group is unhealthy (the balancer and the PD router skip it) and
``deliver`` refuses it messages (``GroupFencedError``: the sender picks another group).
``evacuate`` then hands its work back as ``Resume`` messages: each request's unfinished
sequences, to be recomputed elsewhere from their tokens (prompt and output so far, as after a
preemption), so the caller's cumulative output goes on without a repeat or a gap. Its
scheduler and pool are reset without touching the sequences. A step that was under way is
dropped when it comes back (``DPGroup.step`` checks the fence before it appends a token), so
nothing is emitted twice. A stalled group whose loop beats again ``rejoin``s, empty.

``evacuate`` runs under the group's state lock, which a step holds except while it waits on
its device; a group stuck inside a step is fenced at once and evacuated when the step lets go.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from serving.core.request import Request
    from xds_jax.sequence import Sequence


class GroupFencedError(RuntimeError):
    """The group was taken out of service; send the message to another group."""


@dataclasses.dataclass(frozen=True)
class Resume:
    """Inbox message: continue ``seqs`` of a started request here, recomputed from their
    tokens (prompt and output so far, as after a preemption); the caller's cumulative output
    goes on from where it was."""

    request: Request
    seqs: list[Sequence]


@dataclasses.dataclass(frozen=True)
class Recovery:
    """A group taken out of service (``Engine.recoveries``): when (``time.monotonic()``),
    which, and why."""

    time: float
    role: str
    group: int
    reason: str


class Fencing:
    """The out-of-service part of ``DPGroup`` (which holds ``requests``, ``_owners``,
    ``scheduler``, the inbox and ``_wake``); subclasses extend ``_take_work`` and ``_reset``
    with their own queues (PD arrivals, held prefill blocks)."""

    def _init_fence(self) -> None:
        self.fenced = False  # out of service: refuses messages, drops a late step
        self.drained = False  # fenced and its work handed back
        self._gate = threading.Lock()  # the fence against inbox puts
        self._state = threading.RLock()  # scheduler and requests: held by a step but a stall

    def fence(self) -> bool:
        """Take the group out of service: unhealthy, refusing messages. False if it already
        was."""
        with self._gate:
            if self.fenced:
                return False
            self.fenced, self.healthy = True, False
        self._wake.set()  # an idle loop notices at once
        return True

    def evacuate(self, timeout: float = -1) -> list[Resume] | None:
        """Fence the group and hand back its work: a ``Resume`` per request, holding its
        unfinished sequences here (queued messages are applied first, so aborts hold). The
        scheduler and pool are reset; the sequences themselves are not touched. Waits up to
        ``timeout`` seconds (-1: no limit) for a step under way to let go of the state; None
        if it did not (try again later)."""
        self.fence()
        if not self._state.acquire(timeout=timeout):
            return None
        try:
            if self.drained:
                return []
            self._drain_inbox()  # nothing more arrives: the fence is up
            moves = self._take_work()
            self._reset()
            self.drained = True
            return moves
        finally:
            self._state.release()

    def _take_work(self) -> list[Resume]:
        moves = []
        for request in self.requests.values():
            seqs = [s for s in request.seqs if s.seq_id in self._owners and not s.finished]
            if seqs:
                moves.append(Resume(request, seqs))
        return moves

    def _reset(self) -> None:
        """Forget every request and free every block, leaving the sequences as they are."""
        self.scheduler.clear()
        self.requests.clear()
        self._owners.clear()
        self._suspects.clear()
        pending = getattr(self.runner, "pending", None)  # a speculative runner's hiddens
        if pending:
            pending.clear()

    def rejoin(self) -> None:
        """Back in service after an evacuation (its loop beats again), with an empty pool."""
        with self._state, self._gate:
            if self.drained:
                self.fenced = self.drained = False
                self.healthy = True
