"""What one scheduler step hands the runner: the scheduled sequences and their KV slots, and
the error for a request the scheduler can never run. No JAX here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from xds_jax.sequence import Sequence


class SchedulerError(ValueError):
    """A request the scheduler can never run, or a broken engine/scheduler contract."""


@dataclass(frozen=True)
class ScheduledSeq:
    """One sequence's work in a step: KV for ``seq.all_ids[start:start + num_tokens]``.

    ``block_table`` covers positions ``0 .. start + num_tokens - 1``. ``is_last_chunk`` means
    the step reaches the sequence's last token, so logits are sampled and one token appended.
    """

    seq: Sequence
    start: int
    num_tokens: int
    block_table: list[int]
    is_last_chunk: bool
    num_lookahead: int = 0  # KV slots reserved past the last token, for speculative drafts

    @property
    def token_ids(self) -> list[int]:
        return self.seq.ids_between(self.start, self.start + self.num_tokens)

    @property
    def is_prefill(self) -> bool:
        return self.num_tokens > 1 or self.start < len(self.seq.prompt_ids)


@dataclass(frozen=True)
class SchedulerOutput:
    """The work of one step: decodes first, then prefill chunks, at most once per sequence."""

    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[int] = field(default_factory=list)
    num_batched_tokens: int = 0

    @property
    def is_empty(self) -> bool:
        return not self.scheduled
