"""Per-step timeline of device work: which stage ran where, when, and how many bytes it moved.

JAX dispatch is asynchronous, so the host time at dispatch says when work was *queued*, not
when it ran. ``Timeline.record`` keeps the dispatch time and hands the stage's output arrays
to a watcher thread per stream, which waits for them in dispatch order
(``jax.block_until_ready``) and notes when each became ready. An event's interval is then

- ``end``: the observed ready time of its outputs;
- ``start``: the latest of its dispatch time, the end of the events it depends on (``deps``)
  and the end of the previous event on the same stream (a stream runs one thing at a time).

Host-measured intervals (a wait for a KV transfer) go in with ``span``. The outputs handed to
``record`` must not be donated later (a donated buffer cannot be waited on): pass activations,
not KV pages. A disabled timeline (``Timeline(enabled=False)``) returns at once from
``record`` and never starts a thread. Times are ``time.perf_counter`` seconds.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import queue
import threading
import time
from collections import defaultdict
from pathlib import Path

import jax

log = logging.getLogger(__name__)

KV_WAIT_STAGE = "kv_wait"


@dataclasses.dataclass(frozen=True)
class Event:
    """One stage on one stream: ``[start, end]`` in seconds, ``bytes`` moved (0 if none)."""

    role: str
    stage: str
    stream: str
    start: float
    end: float
    dispatch: float
    domain: int | None = None
    micro_batch: int | None = None
    layer: int | None = None
    bytes: int = 0

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclasses.dataclass
class _Pending:
    role: str
    stage: str
    stream: str
    dispatch: float
    deps: tuple[int, ...]
    meta: dict
    ready: float | None = None  # filled by the watcher


class Timeline:
    """Records events of many streams; ``events`` resolves their start times on demand."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._items: list[_Pending] = []
        self._queues: dict[str, queue.Queue] = {}
        self._lock = threading.Lock()

    def record(self, role: str, stage: str, outputs, *, stream: str, deps=(),
               **meta) -> int | None:
        """Note a dispatched stage; returns its id (for ``deps`` of later events).

        Args:
          role: who ran it ("attention", "expert", "a2e", "e2a", ...).
          stage: what it was, e.g. "attn_l3".
          outputs: a pytree of the stage's (non-donated) output arrays.
          stream: the serial resource it ran on, e.g. "attention/d0" or "expert".
          deps: ids of events whose outputs this stage consumed (None entries are skipped).
          meta: ``domain``, ``micro_batch``, ``layer``, ``bytes``.
        """
        if not self.enabled:
            return None
        item = _Pending(role, stage, stream, time.perf_counter(),
                        tuple(d for d in deps if d is not None), meta)
        with self._lock:
            index = len(self._items)
            self._items.append(item)
            q = self._queues.get(stream)
            if q is None:
                q = self._queues[stream] = queue.Queue()
                threading.Thread(target=_watch, args=(q,), name=f"timeline-{stream}",
                                 daemon=True).start()
        q.put((item, outputs))
        return index

    def span(self, role: str, stage: str, start: float, end: float, *,
             stream: str | None = None, **meta) -> int | None:
        """Add a host-measured interval (e.g. stage ``"kv_wait"`` for a KV transfer wait)."""
        if not self.enabled:
            return None
        item = _Pending(role, stage, stream or role, start, (), meta, ready=end)
        with self._lock:
            self._items.append(item)
            return len(self._items) - 1

    def flush(self) -> None:
        """Wait until every recorded stage's outputs have been observed ready."""
        with self._lock:
            queues = list(self._queues.values())
        for q in queues:
            q.join()

    def close(self) -> None:
        """Stop the watcher threads (after ``flush``); recorded events stay readable."""
        self.flush()
        with self._lock:
            queues, self._queues = list(self._queues.values()), {}
        for q in queues:
            q.put(None)

    def clear(self) -> None:
        """Forget all events (after ``flush``)."""
        self.flush()
        with self._lock:
            self._items = []

    @property
    def events(self) -> list[Event]:
        """All events in recording order, with resolved start and end times."""
        self.flush()
        with self._lock:
            items = list(self._items)
        ends: list[float] = []
        stream_end: dict[str, float] = {}
        out = []
        for item in items:
            start = max([item.dispatch, stream_end.get(item.stream, item.dispatch)]
                        + [ends[d] for d in item.deps])
            end = max(item.ready, start)
            ends.append(end)
            stream_end[item.stream] = end
            out.append(Event(item.role, item.stage, item.stream, start, end, item.dispatch,
                             item.meta.get("domain"), item.meta.get("micro_batch"),
                             item.meta.get("layer"), int(item.meta.get("bytes", 0))))
        return out

    def chrome_trace(self) -> dict:
        """Chrome trace JSON (``chrome://tracing``, Perfetto): one process per role, one
        thread per stream, complete ("X") events in microseconds from the first event."""
        events = self.events
        t0 = min((e.start for e in events), default=0.0)
        pids = {r: i + 1 for i, r in enumerate(dict.fromkeys(e.role for e in events))}
        tids = {s: i + 1 for i, s in enumerate(dict.fromkeys(e.stream for e in events))}
        trace = []
        for role, pid in pids.items():
            trace.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 0,
                          "args": {"name": role}})
        for stream in tids:
            for role in {e.role for e in events if e.stream == stream}:
                trace.append({"ph": "M", "name": "thread_name", "pid": pids[role],
                              "tid": tids[stream], "args": {"name": stream}})
        for e in events:
            args = {"domain": e.domain, "micro_batch": e.micro_batch, "layer": e.layer,
                    "bytes": e.bytes}
            trace.append({"ph": "X", "name": e.stage, "cat": e.role, "pid": pids[e.role],
                          "tid": tids[e.stream], "ts": (e.start - t0) * 1e6,
                          "dur": e.duration * 1e6,
                          "args": {k: v for k, v in args.items() if v is not None}})
        return {"traceEvents": trace, "displayTimeUnit": "ms"}

    def save(self, path: str | Path) -> Path:
        """Write ``chrome_trace()`` as JSON; returns the path."""
        path = Path(path)
        path.write_text(json.dumps(self.chrome_trace()))
        return path

    def summary(self) -> dict:
        """Per role: ``events``, ``time_s`` (sum of durations), ``busy_s`` (union of its
        intervals), ``span_s`` (first start to last end), ``idle_fraction`` (1 - busy/span),
        ``bytes`` and ``kv_wait_s`` (its "kv_wait" spans)."""
        by_role: dict[str, list[Event]] = defaultdict(list)
        for e in self.events:
            by_role[e.role].append(e)
        out = {}
        for role, events in by_role.items():
            busy = _union_length([(e.start, e.end) for e in events])
            span = max(e.end for e in events) - min(e.start for e in events)
            out[role] = {
                "events": len(events),
                "time_s": sum(e.duration for e in events),
                "busy_s": busy,
                "span_s": span,
                "idle_fraction": 1.0 - busy / span if span > 0 else 0.0,
                "bytes": sum(e.bytes for e in events),
                "kv_wait_s": sum(e.duration for e in events if e.stage == KV_WAIT_STAGE),
            }
        return out


def format_summary(summary: dict) -> str:
    """A fixed-width table of ``Timeline.summary()``, one row per role."""
    head = f"{'role':<14}{'events':>8}{'time ms':>11}{'busy ms':>11}{'span ms':>11}" \
           f"{'idle %':>8}{'MiB':>10}{'kv wait ms':>12}"
    rows = [head, "-" * len(head)]
    for role, s in summary.items():
        rows.append(f"{role:<14}{s['events']:>8}{s['time_s'] * 1e3:>11.2f}"
                    f"{s['busy_s'] * 1e3:>11.2f}{s['span_s'] * 1e3:>11.2f}"
                    f"{s['idle_fraction'] * 100:>8.1f}{s['bytes'] / 2**20:>10.3f}"
                    f"{s['kv_wait_s'] * 1e3:>12.2f}")
    return "\n".join(rows)


def _union_length(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by possibly overlapping intervals."""
    total, cur_start, cur_end = 0.0, None, None
    for start, end in sorted(intervals):
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


def _watch(q: queue.Queue) -> None:
    """Watcher loop of one stream: wait for each event's outputs in order, note the time."""
    while True:
        got = q.get()
        if got is None:
            return
        item, outputs = got
        try:
            jax.block_until_ready(outputs)
        except Exception as e:  # noqa: BLE001 - the caller sees the failure; the event still ends
            log.warning("timeline: stage %s on %s failed: %s", item.stage, item.stream, e)
        item.ready = time.perf_counter()
        q.task_done()
