"""The heartbeat monitor of a started engine: stalled groups out, woken ones back in.

As xDeepServe's DP masters, a group proves its loop is alive by beating: at the top of every
step (an idle loop steps every 50 ms) and after each launch (``DPGroup._beat``). A group that
drives itself and stays silent for ``timeout_s`` is taken out of service
(``Engine.recover``: its work moves); one whose work has moved and that beats again rejoins,
empty (``Engine.rejoin``). The monitor looks every quarter of the timeout, so a stall is found
within 1.25 timeouts. A group whose runner started compiling since its last beat gets
``COMPILE_GRACE_S`` more: a compile is slow, not stuck. MA pools are not watched (their
groups' recovery is not built).
"""

from __future__ import annotations

import threading
import time
from typing import Any

COMPILE_GRACE_S = 600.0  # more silence allowed while a group compiles a new step program


def watch_heartbeats(engine: Any, groups: list, timeout_s: float,
                     stop: threading.Event) -> None:
    """Watch ``groups`` of ``engine`` until ``stop`` is set (the engine's monitor thread)."""
    while not stop.wait(timeout_s / 4):
        engine.retry_evacuations()
        for g in groups:
            age = time.monotonic() - g.last_heartbeat
            compiling = g.runner.compile_count != g.beat_compiles
            if g.healthy and age > timeout_s + (COMPILE_GRACE_S if compiling else 0):
                engine.recover(g, f"no heartbeat for {age:.1f} s")
            elif g.drained and age < timeout_s:
                engine.rejoin(g)
