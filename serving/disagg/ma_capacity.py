"""Expert capacity of MA decode: chosen up front, checked once per step, grown on overflow.

The experts run at a fixed capacity (rows per destination rank) so the host never waits
inside a step. Each routed launch leaves an ``OverflowCheck``; after the step's passes are
dispatched the policy reads their flags (one wait) and, if any overflowed, grows that
shape's capacity to the next bucket and asks for the pass to be re-run from the same inputs
(grow-only: later steps start from the bucket that fit). Nothing is dropped: the last bucket
is ``T * K``, which cannot overflow.

Shapes count tokens, not sequences: a speculative verify pass brings ``k + 1`` tokens per
sequence (and the MTP passes their own widths), so each gets its own capacity, sized and
grown for what it carries.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from collectives.ep_moe import capacity_buckets, next_capacity
from xds_jax.multihost import fetch


@dataclasses.dataclass(frozen=True)
class OverflowCheck:
    """One routed launch: its overflow flags (device array), capacity and shape."""

    overflow: object
    capacity: int
    tokens: int  # rows per expert rank
    ranks: int  # expert ranks the dispatch ran over


class CapacityPolicy:
    """Grow-only capacity per (rows per expert rank, expert ranks).

    Args:
      top_k: experts per token.
      initial: first capacity of every shape (capped at ``T * K``), default the smallest
        bucket.
    """

    def __init__(self, top_k: int, initial: int | None = None) -> None:
        self.top_k = top_k
        self.initial = initial
        self.by_shape: dict[tuple[int, int], int] = {}

    def capacity(self, tokens: int, ranks: int) -> int:
        key = (tokens, ranks)
        if key not in self.by_shape:
            buckets = capacity_buckets(tokens, self.top_k, ranks)
            self.by_shape[key] = (buckets[0] if self.initial is None
                                  else min(self.initial, buckets[-1]))
        return self.by_shape[key]

    def check(self, overflow, tokens: int, ranks: int) -> OverflowCheck:
        """The check of a launch run at this shape's current capacity."""
        return OverflowCheck(overflow, self.capacity(tokens, ranks), tokens, ranks)

    def grow(self, checks: list[OverflowCheck]) -> bool:
        """Read the flags; grow every shape that overflowed. True when a re-run is due."""
        grew = False
        flags = fetch([c.overflow for c in checks])  # one read, the same on every process
        for c, overflow in zip(checks, flags, strict=True):
            if int(np.asarray(overflow).sum()) > 0:
                key = (c.tokens, c.ranks)
                bigger = next_capacity(c.capacity, c.tokens, self.top_k, c.ranks)
                self.by_shape[key] = max(self.by_shape[key], bigger)
                grew = True
        return grew

    def reset(self) -> None:
        """Forget the grown capacities (after an expert map change: the balanced load may
        fit smaller buckets); shapes start again from ``initial``."""
        self.by_shape.clear()

    def snapshot(self) -> dict[str, int]:
        """``{"TxN": capacity}`` for stats and logs."""
        return {f"{t}x{n}": c for (t, n), c in sorted(self.by_shape.items())}
