"""Steps launched but not yet updated (asynchronous scheduling), counted per sequence.

A step may be scheduled while the previous one still runs. The scheduler then counts, per
sequence, the KV slots launched steps write (``slots``) and the tokens they sample
(``tokens``) as already there; a launched step's ``update`` or roll-back lands it and they
stop counting. No JAX here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from serving.core.scheduled import SchedulerOutput


class InFlight:
    """Per-sequence KV slots and sampled tokens of launched steps not yet landed."""

    def __init__(self) -> None:
        self._launched: set[int] = set()  # id() of launched SchedulerOutputs
        self._slots: dict[int, int] = {}
        self._tokens: dict[int, int] = {}

    def __bool__(self) -> bool:
        """Anything in flight."""
        return bool(self._slots or self._tokens)

    def slots(self, seq_id: int) -> int:
        """KV slots launched steps write for the sequence."""
        return self._slots.get(seq_id, 0)

    def tokens(self, seq_id: int) -> int:
        """Tokens launched steps sample for the sequence (not yet appended)."""
        return self._tokens.get(seq_id, 0)

    def launch(self, output: SchedulerOutput) -> None:
        """``output`` was launched: its slots and sampled tokens count from now on."""
        self._launched.add(id(output))
        for item in output.scheduled:
            seq_id = item.seq.seq_id
            self._slots[seq_id] = self.slots(seq_id) + item.num_tokens
            if item.is_last_chunk:
                self._tokens[seq_id] = self.tokens(seq_id) + 1

    def land(self, output: SchedulerOutput) -> None:
        """``output`` was updated or rolled back: its slots and tokens no longer count (a step
        never launched lands as a no-op)."""
        if id(output) not in self._launched:
            return
        self._launched.discard(id(output))
        for item in output.scheduled:
            seq_id = item.seq.seq_id
            if seq_id not in self._slots:
                continue  # forgotten since
            self._slots[seq_id] -= item.num_tokens
            if item.is_last_chunk:
                self._tokens[seq_id] -= 1
            if not self._slots[seq_id]:
                del self._slots[seq_id]
            if not self._tokens.get(seq_id, 1):
                del self._tokens[seq_id]

    def forget(self, seq_id: int) -> None:
        """The sequence stopped running: nothing of it counts any more."""
        self._slots.pop(seq_id, None)
        self._tokens.pop(seq_id, None)

    def clear(self) -> None:
        self._launched.clear()
        self._slots.clear()
        self._tokens.clear()
