"""Graceful shutdown: drain the requests in flight, refuse new ones with 503, then stop.

uvicorn on its own closes the listening socket at the first SIGTERM, waits a few seconds and
cancels what still runs, then re-raises the signal (the process dies by SIGTERM). Behind a load
balancer that loses requests. ``DrainingServer`` puts a drain in front: at the first SIGTERM or
SIGINT the app answers new requests (and ``/health``) with 503 and ``Retry-After`` while the
admitted ones run to their end, for at most ``timeout_s`` seconds; whatever is still running
then is aborted (its streams end with ``finish_reason: "abort"``) and uvicorn shuts down as
usual. A SIGTERM drain exits with status 0; a Ctrl-C drain still exits as an interrupt (130).
A second signal stops at once. A timeout of 0 aborts what runs at the first signal (its
streams still end with "abort") and exits as a drain does.
"""

from __future__ import annotations

import logging
import signal
import time
from types import FrameType

import uvicorn

from serving.entrypoints.server_state import Served

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """A ``uvicorn.Server`` that drains ``served`` for up to ``timeout_s`` seconds on a signal."""

    def __init__(self, config: uvicorn.Config, served: Served, timeout_s: float):
        super().__init__(config)
        self.served, self.timeout_s = served, timeout_s
        self.drain_requested = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler only sets flags: the work happens on the event loop (on_tick).
        if self.drain_requested:  # a second signal: stop at once
            self.force_exit = True
            super().handle_exit(sig, frame)
            return
        self.drain_requested = True
        if sig == signal.SIGINT:
            self._captured_signals.append(sig)  # re-raised after shutdown: exit as Ctrl-C

    async def on_tick(self, counter: int) -> bool:
        if self.drain_requested and not self.should_exit:
            self._drain_step()
        return await super().on_tick(counter)

    def _drain_step(self) -> None:
        served = self.served
        if not served.draining:
            served.start_drain(self.timeout_s)
        left = served.admission.requests
        if left == 0:
            log.info("drained; shutting down")
            self.should_exit = True
        elif served.drain_deadline is not None and time.monotonic() >= served.drain_deadline:
            log.warning("shutdown timeout (%.0f s) reached: aborting %d requests still in "
                        "flight", self.timeout_s, left)
            served.abort_all()
            self.should_exit = True

