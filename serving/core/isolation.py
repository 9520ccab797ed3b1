"""A DP group's failed steps: roll back, then find the request at fault.

A step that raises before its tokens are recorded is rolled back (its sequences are recomputed
from their tokens). A step of one request fails that request alone, the group serving on; a
step of several makes each of them suspect, and the first suspect still there runs alone in
the next step (``_isolated``), so that a second failure names one request. A suspect that ran
alone without failing is cleared when its tokens are out (``DPGroup.complete``), but only by a
step of the kind that failed: a suspect of a failed decode step recomputes its rolled-back
tokens first (a prefill, which passes) and is cleared once it has decoded alone.

Requests that each ran alone without failing and fail again together fail for the batch, not
for one of them (memory at a larger batch, a kernel's shape): they then run alone until each
finishes, so every one still ends instead of the group failing and re-trying that batch
forever.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from serving.core.request import Request
    from serving.core.scheduled import SchedulerOutput

log = logging.getLogger(__name__)


class Suspects:
    """Requests of failed steps waiting to run alone, in order, and what clears each."""

    def __init__(self) -> None:
        self.queue: list[str] = []
        self.must_decode: set[str] = set()  # failed in a decode step: cleared by one alone
        self.passed_alone: set[str] = set()  # ran alone without failing since admitted
        self.serial: set[str] = set()  # failed together after passing alone: alone to the end

    def __bool__(self) -> bool:
        return bool(self.queue)

    def add(self, ids: list[str], decoding: set[str]) -> bool:
        """Suspect ``ids`` (``decoding``: those with decode rows in the failed step). True when
        each of them had already passed alone: they then run alone until they finish."""
        serial = all(i in self.passed_alone for i in ids)
        if serial:
            self.serial.update(ids)
        self.must_decode |= decoding
        self.queue = ids + [i for i in self.queue if i not in ids]
        return serial

    def ran_alone(self, request_id: str, decoded: bool) -> None:
        """The first suspect's step finished without failing."""
        if request_id in self.serial or (request_id in self.must_decode and not decoded):
            return
        self.queue.remove(request_id)
        self.must_decode.discard(request_id)
        self.passed_alone.add(request_id)

    def forget(self, request_id: str) -> None:
        """A request left the group (finished, failed, moved)."""
        if request_id in self.queue:
            self.queue.remove(request_id)
        for ids in (self.must_decode, self.passed_alone, self.serial):
            ids.discard(request_id)

    def clear(self) -> None:
        self.queue.clear()
        self.must_decode.clear()
        self.passed_alone.clear()
        self.serial.clear()


class RequestIsolation:
    """Mixin of ``DPGroup``: the group's ``index``, ``scheduler``, ``requests``, ``_owners``,
    ``_suspects``, ``rollbacks``, ``requests_failed``, ``_forget`` and ``_emit``."""

    def _isolated(self) -> set[int] | None:
        """While requests of a failed step are suspect, the sequences of the first one still
        here: it runs alone, so a failure names one request. None when nothing is suspect."""
        queue = self._suspects.queue
        while queue and queue[0] not in self.requests:
            self._suspects.forget(queue[0])
        if not queue:
            return None
        return {s.seq_id for s in self.requests[queue[0]].seqs}

    def step_failed(self, out: SchedulerOutput, error: Exception) -> None:
        """A step raised before its tokens were recorded: roll it back (its sequences are
        recomputed from their tokens) and find the request at fault. A step of one request
        fails that request alone; a step of several makes each suspect, to run alone next."""
        culprits = self.requests_in(out)
        self.scheduler.roll_back(out)
        self.rollbacks += 1
        log.warning("DP group %d: a step of %d request(s) failed (%s: %s); rolled back",
                    self.index, len(culprits), type(error).__name__, error)
        if len(culprits) == 1:
            self.fail_request(culprits[0], error)
            return
        decoding = {r.request_id for s in out.scheduled if not s.is_prefill
                    and (r := self._owners.get(s.seq.seq_id)) is not None}
        if self._suspects.add([r.request_id for r in culprits], decoding):
            log.warning("DP group %d: %d requests that each ran alone failed together; they "
                        "run alone until they finish", self.index, len(culprits))

    def suspect_ran(self, out: SchedulerOutput, touched: dict) -> None:
        """After a step: the first suspect, when it ran (alone) and its tokens are out, is
        cleared if the step was of the kind that made it suspect."""
        queue = self._suspects.queue
        if not queue:
            return
        first = queue[0]
        rows = [s for s in out.scheduled if (r := touched.get(s.seq.seq_id)) is not None
                and r.request_id == first]
        if rows:
            self._suspects.ran_alone(first, decoded=any(not s.is_prefill for s in rows))

    def requests_in(self, out: SchedulerOutput) -> list[Request]:
        """The requests a step scheduled (each once, in schedule order)."""
        return list({id(r): r for s in out.scheduled
                     if (r := self._owners.get(s.seq.seq_id)) is not None}.values())

    def fail_request(self, request: Request, error: Exception) -> None:
        """End one request with an error while the group keeps serving the others."""
        log.error("DP group %d: request %s failed: %s: %s", self.index, request.request_id,
                  type(error).__name__, error, exc_info=error)
        self.requests_failed += 1
        self._forget(request)
        for seq in request.seqs:
            if not seq.finished:
                self.scheduler.abort(seq.seq_id)
        request.fail(error)
        request.metrics.finished_time = time.monotonic()
        try:
            self._emit(request)
        except Exception:  # the caller's callback is broken too: nothing more to tell it
            log.exception("DP group %d: could not report the failure of %s", self.index,
                          request.request_id)
