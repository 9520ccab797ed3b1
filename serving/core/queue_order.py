"""Scheduling policies: the order of a scheduler's queues and who yields a seat to whom.

Two policies (vLLM's ``--scheduling-policy``):

- ``"fcfs"``: first come, first served. New sequences queue last, a preempted one goes back
  first, the running list is in admission order (the newest is preempted when blocks run out).
- ``"priority"``: both queues in ``priority_key`` order, each sequence's ``priority`` (lower
  first), then arrival. The sequence preempted when blocks run out is so the lowest-priority
  one, and a waiting sequence that cannot start (no seat, or no blocks for its first chunk)
  preempts running sequences of strictly lower priority, lowest first, when their blocks
  would be enough (as vLLM V0's priority preemption).

No JAX, no ``xds_jax`` here (``xds_jax.engine_config.SCHEDULING_POLICIES`` checks an engine's
policy name: the twin of ``POLICIES``).
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from serving.core.kv_cache import BlockManager
    from xds_jax.sequence import Sequence

POLICIES = ("fcfs", "priority")


def priority_key(seq: Sequence) -> tuple[int, int]:
    """Where a sequence goes under the priority policy: lower ``priority`` first, then arrival
    (sequence ids are handed out as requests arrive)."""
    return seq.priority, seq.seq_id


class QueueOrder:
    """Where one policy puts sequences in the waiting queue and the running list."""

    def __init__(self, policy: str):
        if policy not in POLICIES:
            raise ValueError(f"scheduling policy must be one of {POLICIES}, got {policy!r}")
        self.policy = policy
        self.by_priority = policy == "priority"

    def queue(self, waiting: deque, item: Any, seq_of: Callable[[Any], Sequence] | None = None
              ) -> None:
        """A new arrival: last, or in its place. ``seq_of``: its sequence, where the queue
        holds something else (a PD decode group's arrivals)."""
        if self.by_priority:
            bisect.insort(waiting, item,
                          key=priority_key if seq_of is None else lambda x: priority_key(seq_of(x)))
        else:
            waiting.append(item)

    def requeue(self, waiting: deque, seq: Sequence) -> None:
        """A sequence taken off the running list: first, or in its place (before every later
        arrival of its priority)."""
        if self.by_priority:
            bisect.insort(waiting, seq, key=priority_key)
        else:
            waiting.appendleft(seq)

    def run(self, running: list, seq: Sequence) -> None:
        """A sequence that starts running: last (admission order), or in its place."""
        if self.by_priority:
            bisect.insort(running, seq, key=priority_key)
        else:
            running.append(seq)

    def victims(self, seq: Sequence, num: int, running: list, bm: BlockManager,
                max_num_seqs: int) -> list[Sequence]:
        """The fewest running sequences to preempt, lowest priority first, so that waiting
        ``seq`` gets a seat and blocks for ``num`` new tokens: of strictly lower priority
        only, and none where even all of those would not make room (and none under fcfs)."""
        if not self.by_priority:
            return []
        lower = [s for s in reversed(running) if s.priority > seq.priority]  # the list's tail
        seats = max(1, len(running) - max_num_seqs + 1)  # preempted to free a seat
        count = bm.fewest_to_free([s.seq_id for s in lower], seq.token_view(), num, seq.salt, seats,
                                   seq_id=seq.seq_id)
        return lower[:count] if count else []
