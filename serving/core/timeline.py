"""Per-step timeline of device work: which stage ran where, when, and how many bytes it moved.

JAX dispatch is asynchronous, so the host time at dispatch says when work was *queued*, not
when it ran. Both ends of an event's interval are observed instead:

- ``start``: before the stage is dispatched, ``Timeline.begin(inputs)`` dispatches a marker
  program on the devices of the stage's input arrays (one per device set) that takes those
  arrays and calls back to the host. A program runs only once all its inputs are ready, and
  on GPU/TPU after the work queued before it on its devices' stream, so the callback's host
  time is when the devices could begin the stage; a stage with array inputs on several device
  sets starts at the latest of its markers. A stage with no array inputs starts at dispatch.
- ``end``: ``record`` hands the stage's output arrays to a watcher thread per stream, which
  waits for them in dispatch order (``jax.block_until_ready``) and notes when each was ready.

Nothing is inferred from the order of dispatch or from dependencies, so two stages overlap in
the timeline only if the devices were seen running them at the same time. On XLA:CPU a
program on one device runs inline at dispatch (the host waits) and one on several devices runs
on the runtime's thread pool as soon as its inputs are ready; a marker costs about as much as
dispatching a trivial program (a few hundred microseconds on a small CPU host). With
``serialize=True`` every ``record`` waits until the stage's outputs were observed ready before
it returns, so the next stage is dispatched only after it: a fully serialised schedule (each
stage alone on the machine), e.g. to time stages in isolation.

Host-measured intervals (a wait for a KV transfer) go in with ``span``. The outputs handed to
``record`` must not be donated later (a donated buffer cannot be waited on): pass activations,
not KV pages; the same holds for ``begin``'s inputs until the stage has been dispatched. A
disabled timeline (``Timeline(enabled=False)``) returns at once from ``begin``, ``record`` and
``span``, dispatches no marker and never starts a thread: programs and schedule are exactly
those of a run without tracing. Times are ``time.perf_counter`` seconds.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import logging
import queue
import threading
import time
from collections import defaultdict
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

log = logging.getLogger(__name__)

KV_WAIT_STAGE = "kv_wait"
# Stages that move data between slices, by collective name: a stage "a2e_l3" is collective
# "a2e" (the routed experts' and a dense FFN's hop), "shared_a2e_l1" is "shared_a2e".
COLLECTIVES = ("a2e", "e2a", "shared_a2e", "shared_e2a", "kv_transfer")

# Markers in flight, by id: one jitted marker program serves every timeline, so its callback
# finds the ``Start`` to fill here (each id is removed once its marker has run).
_starts: dict[int, Start] = {}
_starts_lock = threading.Lock()
_marker_ids = itertools.count()


@dataclasses.dataclass(frozen=True)
class Event:
    """One stage on one stream: ``[start, end]`` in seconds, ``bytes`` moved (0 if none).

    ``observed_start``: the start came from a marker run on the devices (False: the stage had
    no array inputs, or it is a host span; its start is the host time it was dispatched).
    ``deps``: ids of the events whose outputs it consumed (kept for readers; not used to
    place it)."""

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
    observed_start: bool = False
    deps: tuple[int, ...] = ()

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclasses.dataclass
class Start:
    """What ``Timeline.begin`` returns: the dispatch time, the markers' outputs (the watcher
    waits for them) and the latest host time a marker reported (set by their callbacks)."""

    dispatch: float
    markers: list = dataclasses.field(default_factory=list)
    observed: float | None = None


@dataclasses.dataclass
class _Pending:
    role: str
    stage: str
    stream: str
    dispatch: float
    deps: tuple[int, ...]
    meta: dict
    ready: float | None = None  # filled by the watcher
    begun: Start | None = None
    done: threading.Event = dataclasses.field(default_factory=threading.Event)


class Timeline:
    """Records events of many streams, with start and end times observed on the devices."""

    def __init__(self, enabled: bool = True, *, serialize: bool = False) -> None:
        self.enabled = enabled
        self.serialize = serialize
        self._items: list[_Pending] = []
        self._queues: dict[str, queue.Queue] = {}
        self._lock = threading.Lock()

    def begin(self, inputs) -> Start | None:
        """Dispatch start markers on the devices of ``inputs`` (a pytree; its ``jax.Array``
        leaves, and those held in fields of dataclass leaves, count); call it right before
        dispatching the stage and pass the result to ``record(begun=...)``."""
        if not self.enabled:
            return None
        begun = Start(time.perf_counter())
        by_devices: dict[frozenset, list[jax.Array]] = defaultdict(list)
        for a in input_arrays(inputs):
            by_devices[frozenset(a.sharding.device_set)].append(a)
        for arrays in by_devices.values():
            ident = next(_marker_ids) % 2**31  # an int32 operand
            with _starts_lock:
                _starts[ident] = begun
            begun.markers.append(_marker(np.int32(ident), *arrays))
        return begun

    def record(self, role: str, stage: str, outputs, *, stream: str, deps=(),
               begun: Start | None = None, **meta) -> int | None:
        """Note a dispatched stage; returns its id (for ``deps`` of later events).

        Args:
          role: who ran it ("attention", "expert", "a2e", "e2a", ...).
          stage: what it was, e.g. "attn_l3".
          outputs: a pytree of the stage's (non-donated) output arrays.
          stream: the serial resource it ran on, e.g. "attention/d0" or "expert" (a label:
            the trace's thread; events are placed by what was observed, not by streams).
          deps: ids of events whose outputs this stage consumed (None entries are skipped).
          begun: ``begin(inputs)``'s result, from right before the stage was dispatched
            (None: the start is the host time of this call).
          meta: ``domain``, ``micro_batch``, ``layer``, ``bytes``.
        """
        if not self.enabled:
            return None
        item = _Pending(role, stage, stream, begun.dispatch if begun else time.perf_counter(),
                        tuple(d for d in deps if d is not None), meta, begun=begun)
        with self._lock:
            index = len(self._items)
            self._items.append(item)
            q = self._queues.get(stream)
            if q is None:
                q = self._queues[stream] = queue.Queue()
                threading.Thread(target=_watch, args=(q,), name=f"timeline-{stream}",
                                 daemon=True).start()
        q.put((item, outputs))
        if self.serialize:
            item.done.wait()
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

    def wait(self, index: int) -> None:
        """Wait until event ``index`` (``record``'s return) has been observed ready."""
        with self._lock:
            item = self._items[index]
        if item.ready is None:
            item.done.wait()

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
        """All events in recording order, with their observed start and end times."""
        self.flush()
        with self._lock:
            items = list(self._items)
        out = []
        for item in items:
            begun = item.begun
            observed = begun is not None and begun.observed is not None
            start = min(begun.observed if observed else item.dispatch, item.ready)
            out.append(Event(item.role, item.stage, item.stream, start, item.ready,
                             item.dispatch, item.meta.get("domain"),
                             item.meta.get("micro_batch"), item.meta.get("layer"),
                             int(item.meta.get("bytes", 0)), observed, item.deps))
        return out

    def collective_latency(self) -> dict[str, float]:
        """Mean observed duration (s) of each collective's events seen ready so far (see
        ``COLLECTIVES``; none recorded: absent). Reads without waiting for the watchers, so a
        metrics scrape never blocks on the devices."""
        with self._lock:
            items = [i for i in self._items if i.ready is not None]
        seconds: dict[str, list[float]] = defaultdict(list)
        for item in items:
            name = item.stage.rsplit("_l", 1)[0] if "_l" in item.stage else item.stage
            if name in COLLECTIVES:
                begun = item.begun
                start = begun.observed if begun and begun.observed is not None else item.dispatch
                seconds[name].append(item.ready - min(start, item.ready))
        return {name: sum(v) / len(v) for name, v in seconds.items()}

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


def input_arrays(inputs) -> list[jax.Array]:
    """The ``jax.Array`` leaves of ``inputs``, and the arrays held in fields of its dataclass
    leaves (e.g. a micro-batch's token and position arrays)."""
    out = []
    for leaf in jax.tree.leaves(inputs):
        if isinstance(leaf, jax.Array):
            out.append(leaf)
        elif dataclasses.is_dataclass(leaf) and not isinstance(leaf, type):
            out += [v for f in dataclasses.fields(leaf)
                    if isinstance(v := getattr(leaf, f.name), jax.Array)]
    return out


def _note_start(ident: np.ndarray) -> np.ndarray:
    """A marker's callback: its devices have reached the stage, every input ready."""
    now = time.perf_counter()
    with _starts_lock:
        begun = _starts.pop(int(ident), None)
    if begun is not None:
        begun.observed = max(now, begun.observed or now)
    return np.asarray(ident, np.int32)


@functools.partial(jax.jit, keep_unused=True)
def _marker(ident, *arrays):
    """Runs when all ``arrays`` are ready (and, on GPU/TPU, after earlier work on their
    devices): calls back to note the time; its output is the id, returned by the callback."""
    return io_callback(_note_start, jax.ShapeDtypeStruct((), jnp.int32), ident)


def _watch(q: queue.Queue) -> None:
    """Watcher loop of one stream: wait for each event's start markers and outputs in order,
    note the time the outputs were ready."""
    while True:
        got = q.get()
        if got is None:
            return
        item, outputs = got
        markers = item.begun.markers if item.begun is not None else []
        try:
            jax.block_until_ready((markers, outputs))
        except Exception as e:  # noqa: BLE001 - the caller sees the failure; the event still ends
            log.warning("timeline: stage %s on %s failed: %s", item.stage, item.stream, e)
        item.ready = time.perf_counter()
        if item.begun is not None:
            item.begun.markers = []
        item.done.set()
        q.task_done()
