"""Sequences that join or leave a scheduler other than through ``schedule``: PD hand-offs (a
prefill's KV offered on, a decode group's pulled KV admitted, a failed pull dropped), a group
taken out of service cleared, and a failed step rolled back. A mixin of
``serving.core.scheduler.Scheduler``, whose state it works on. No JAX here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from serving.core.scheduled import SchedulerError, SchedulerOutput

if TYPE_CHECKING:
    from xds_jax.sequence import Sequence


class HandOffs:
    """Joining and leaving outside ``schedule`` (``Scheduler``'s queues, blocks and counts)."""

    def detach(self, seq_id: int) -> list[int]:
        """Take a running sequence out of scheduling but keep its blocks (PD prefill: its KV
        is offered to a decode group). Returns its block table; the caller frees the blocks
        (``block_manager.free``) once they are no longer read."""
        seq = next((s for s in self.running if s.seq_id == seq_id), None)
        if seq is None:
            raise SchedulerError(f"sequence {seq_id} is not running")
        self._stop_running(seq)
        return self.block_manager.block_table(seq_id)

    def can_admit_computed(self, seq: Sequence) -> bool:
        """Whether ``seq`` can join now with KV for all but its last token written elsewhere."""
        bm, computed = self.block_manager, seq.num_tokens - 1
        cached = bm.num_cached_tokens(seq.token_view(), seq.salt, seq.seq_id)
        return (len(self.running) < self.max_num_seqs
                and bm.can_allocate(seq.seq_id, seq.token_view(), computed - cached, seq.salt))

    def admit_computed(self, seq: Sequence) -> tuple[list[int], int]:
        """Admit a sequence whose KV for all but its last token was computed elsewhere (PD
        decode). Blocks of a prefix found in this pool's cache are reused. Returns the block
        table and how many leading blocks were cached (the rest must be filled by the caller
        before the next step); the sequence decodes from the next ``schedule``."""
        self.check_fits(seq)
        if seq.seq_id in self._computed:
            raise SchedulerError(f"sequence {seq.seq_id} was already added")
        bm, computed = self.block_manager, seq.num_tokens - 1
        cached = bm.num_cached_tokens(seq.token_view(), seq.salt, seq.seq_id)
        bm.allocate(seq.seq_id, seq.token_view(), computed - cached, seq.salt)
        self._start_running(seq, computed)
        return bm.block_table(seq.seq_id), cached // bm.block_size

    def drop(self, seq_id: int) -> None:
        """Take a running sequence out and free its blocks without touching the sequence (a
        PD pull that failed: it goes on elsewhere)."""
        seq = next((s for s in self.running if s.seq_id == seq_id), None)
        if seq is None:
            raise SchedulerError(f"sequence {seq_id} is not running")
        self._release(seq)

    def clear(self) -> list[Sequence]:
        """Drop every sequence and free its blocks without touching the sequences (a group
        taken out of service: they go on elsewhere). Returns them, running first."""
        dropped = [*self.running, *self.waiting]
        for seq in list(self.running):
            self._release(seq)
        self.waiting.clear()
        self._flight.clear()
        return dropped

    def roll_back(self, output: SchedulerOutput) -> list[int]:
        """Undo a step that failed before ``update``: every sequence it scheduled goes back
        to wait (fcfs: at the front; priority: in its place) with its blocks freed, to be
        recomputed from its tokens (computed full blocks stay in the prefix cache). Returns
        their ids. Of launched steps not yet updated, roll back the newest first."""
        self._flight.land(output)
        rolled = []
        for item in reversed(output.scheduled):
            seq = item.seq
            if self._computed.get(seq.seq_id) != item.start:
                continue  # aborted or preempted since schedule
            self._release(seq)
            if not seq.finished:
                self.order.requeue(self.waiting, seq)
            rolled.append(seq.seq_id)
        return rolled
