"""Bytes, latency and load counters for the XCCL-style collectives.

Nothing here is global: a ``CollectiveStats`` is created by whoever runs the collectives
(a DP group, a benchmark, a test) and passed in. Byte counts are computed from the static
buffer shapes each call moves, so they are exact for the fixed-capacity design and cost
nothing at run time.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np


def min_payload_bytes(tokens: int, top_k: int, hidden: int, itemsize: int) -> int:
    """The least any dispatch can move: every token once per chosen expert."""
    return tokens * top_k * hidden * itemsize


@dataclass(frozen=True)
class CollectiveRecord:
    """One call of one collective.

    Attributes:
      name: e.g. ``"dispatch"``, ``"combine"``, ``"a2e"``, ``"kv_send"``.
      bytes_moved: bytes written into other ranks' buffers (padding included), all ranks.
      seconds: host wall time of the call (dispatch to ready), 0 when not timed.
      num_devices: ranks taking part.
      payload_bytes: the minimum payload for the same work (no padding), 0 if not defined.
      extra: anything else worth keeping (capacity, rounds, overflow rows).
    """

    name: str
    bytes_moved: int
    seconds: float = 0.0
    num_devices: int = 0
    payload_bytes: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def bytes_over_payload(self) -> float:
        return self.bytes_moved / self.payload_bytes if self.payload_bytes else float("nan")


class CollectiveStats:
    """Accumulates records, per-expert token counts and capacity use."""

    def __init__(self) -> None:
        self.records: list[CollectiveRecord] = []
        self.expert_tokens: np.ndarray | None = None
        self.overflow_rows = 0
        self.reruns = 0

    def record(self, rec: CollectiveRecord) -> CollectiveRecord:
        self.records.append(rec)
        return rec

    def add_expert_tokens(self, counts_E: np.ndarray) -> None:
        counts_E = np.asarray(counts_E, dtype=np.int64)
        if self.expert_tokens is None:
            self.expert_tokens = counts_E.copy()
        else:
            self.expert_tokens += counts_E

    @contextlib.contextmanager
    def timed(self, name: str, bytes_moved: int, **kwargs):
        """Time the body (the caller blocks on its result inside) and record it."""
        start = time.perf_counter()
        yield
        self.record(CollectiveRecord(name, bytes_moved, time.perf_counter() - start, **kwargs))

    def by_name(self, name: str) -> list[CollectiveRecord]:
        return [r for r in self.records if r.name == name]

    def summary(self) -> dict:
        """Totals per collective name: calls, bytes, seconds, mean latency."""
        out: dict = defaultdict(lambda: {"calls": 0, "bytes": 0, "seconds": 0.0})
        for r in self.records:
            s = out[r.name]
            s["calls"] += 1
            s["bytes"] += r.bytes_moved
            s["seconds"] += r.seconds
        for s in out.values():
            s["mean_latency_s"] = s["seconds"] / s["calls"]
        result = dict(out)
        result["overflow_rows"] = self.overflow_rows
        result["reruns"] = self.reruns
        if self.expert_tokens is not None:
            result["expert_tokens"] = self.expert_tokens.tolist()
        return result
