"""A DP group's failed steps: roll back, then find the request at fault.

A step that raises before its tokens are recorded is rolled back (its sequences are recomputed
from their tokens). A step of one request fails that request alone, the group serving on; a
step of several makes each of them suspect, and the first suspect still there runs alone in
the next step (``_isolated``), so that a second failure names one request. A suspect that ran
alone without failing is cleared when its tokens are out (``DPGroup.complete``).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from serving.core.request import Request
    from serving.core.scheduled import SchedulerOutput

log = logging.getLogger(__name__)


class RequestIsolation:
    """Mixin of ``DPGroup``: the group's ``index``, ``scheduler``, ``requests``, ``_owners``,
    ``_suspects``, ``rollbacks``, ``requests_failed``, ``_forget`` and ``_emit``."""

    def _isolated(self) -> set[int] | None:
        """While requests of a failed step are suspect, the sequences of the first one still
        here: it runs alone, so a failure names one request. None when nothing is suspect."""
        while self._suspects and self._suspects[0] not in self.requests:
            self._suspects.pop(0)
        if not self._suspects:
            return None
        return {s.seq_id for s in self.requests[self._suspects[0]].seqs}

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
        else:
            ids = [r.request_id for r in culprits]
            self._suspects = ids + [i for i in self._suspects if i not in ids]

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
        request.fail(f"{type(error).__name__}: {error}")
        request.metrics.finished_time = time.monotonic()
        try:
            self._emit(request)
        except Exception:  # the caller's callback is broken too: nothing more to tell it
            log.exception("DP group %d: could not report the failure of %s", self.index,
                          request.request_id)
