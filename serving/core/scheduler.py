"""Host-pure continuous batching: waiting and running queues, chunked prefill, preemption.

Each step ``schedule`` picks, within a token budget, one token for every decoding sequence,
then prefill chunks: first for sequences already part-way through their prompt, then for new
ones from the waiting queue. When blocks run out the last running sequence is preempted by
recompute: its blocks are freed (computed full blocks stay in the prefix cache) and it goes
back to wait, to be prefilled again over prompt + output. No JAX here.

Which sequence is last, where a preempted one waits, and which running sequences a waiting one
may preempt are the policy's (``serving.core.queue_order``): fcfs (the most recently admitted;
back to the front of the queue; none), or by priority (the lowest-priority one; in its place;
those of lower priority). A sequence this step had already scheduled is preempted only for one
of higher priority, taken out of the step; a preempted sequence waits at least a step.

Asynchronous scheduling (``launched``): a step may be scheduled while the previous one still
runs. Its sequences count the KV slots that step writes and the token it samples as already
there (``in_flight``, kept by ``serving.core.in_flight.InFlight``); a decode row's input is
then that unsampled token, which the runner takes on device. ``update`` of the earlier step
turns them into known tokens; a sequence whose in-flight token is its last (``max_tokens``)
is not scheduled again.
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING

from serving.core.in_flight import InFlight
from serving.core.kv_cache import BlockManager
from serving.core.queue_order import QueueOrder
from serving.core.scheduled import ScheduledSeq, SchedulerError, SchedulerOutput
from serving.core.scheduler_handoffs import HandOffs

if TYPE_CHECKING:
    from xds_jax.sequence import Sequence, TokenView


class Scheduler(HandOffs):
    """Continuous-batching scheduler over one ``BlockManager``.

    Args:
        block_manager: KV block bookkeeping of this group.
        max_num_seqs: most sequences running (holding blocks) at once.
        max_num_batched_tokens: most tokens computed in one step; at least ``max_num_seqs`` so
            that every running sequence can always decode.
        chunk_size: most prefill tokens of one sequence in one step (default: the budget).
        enable_chunked_prefill: if False a prompt is prefilled in one step and prompts longer
            than the budget are rejected; only a recompute longer than the budget is split.
        num_lookahead_tokens: KV slots reserved past each decoding sequence's last token
            (speculative decoding: a step appends 1 .. 1 + this many tokens); ``update``
            trims each reservation back to the tokens actually accepted.
        policy: ``"fcfs"`` or ``"priority"`` (``serving.core.queue_order``).
    """

    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 chunk_size: int | None = None, enable_chunked_prefill: bool = True,
                 num_lookahead_tokens: int = 0, policy: str = "fcfs"):
        try:
            self.order = QueueOrder(policy)
        except ValueError as e:
            raise SchedulerError(str(e)) from None
        if max_num_seqs < 1:
            raise SchedulerError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        if max_num_batched_tokens < max_num_seqs:
            raise SchedulerError(f"max_num_batched_tokens ({max_num_batched_tokens}) must be >= "
                                 f"max_num_seqs ({max_num_seqs}) so every sequence can decode")
        chunk_size = max_num_batched_tokens if chunk_size is None else chunk_size
        if chunk_size < 1:
            raise SchedulerError(f"chunk_size must be >= 1, got {chunk_size}")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.chunk_size = chunk_size if enable_chunked_prefill else max_num_batched_tokens
        self.num_lookahead_tokens = num_lookahead_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order (or priority order: self.order)
        self._computed: dict[int, int] = {}  # seq_id -> tokens whose KV is written
        self._flight = InFlight()  # launched steps not yet updated (asynchronous scheduling)
        self.num_preemptions = 0

    # -- queues -------------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def kv_usage(self) -> float:
        return self.block_manager.usage

    @property
    def prefix_hit_rate(self) -> float:
        """Fraction of prompt tokens found in the prefix cache at admission."""
        bm = self.block_manager
        return bm.prefix_hit_tokens / bm.prefix_query_tokens if bm.prefix_query_tokens else 0.0

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def in_flight(self, seq_id: int) -> int:
        """Sampled tokens of a running sequence still in flight (not yet appended)."""
        return self._flight.tokens(seq_id)

    def num_computed_tokens(self, seq_id: int) -> int:
        """Tokens of a running sequence whose KV is written (0 if not running)."""
        return self._computed.get(seq_id, 0)

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence; raise ``SchedulerError`` if it could never run."""
        if seq.finished:
            raise SchedulerError(f"sequence {seq.seq_id} is already finished")
        if not seq.prompt_ids:
            raise SchedulerError(f"sequence {seq.seq_id} has an empty prompt")
        if any(s.seq_id == seq.seq_id for s in self.waiting) or seq.seq_id in self._computed:
            raise SchedulerError(f"sequence {seq.seq_id} was already added")
        self.check_fits(seq)
        if not self.enable_chunked_prefill and seq.num_tokens > self.max_num_batched_tokens:
            raise SchedulerError(
                f"prompt of sequence {seq.seq_id} has {seq.num_tokens} tokens, more than "
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) with chunked prefill off")
        self.order.queue(self.waiting, seq)

    def _start_running(self, seq: Sequence, computed: int) -> None:
        self.order.run(self.running, seq)
        self._computed[seq.seq_id] = computed

    def check_fits(self, seq: Sequence) -> None:
        """Raise ``SchedulerError`` if the sequence could never fit this pool, even alone."""
        bm = self.block_manager
        # The last sampled token never needs KV.
        most = len(seq.prompt_ids) + max((seq.max_tokens or 1) - 1, 0)
        most = max(most, seq.num_tokens)
        if most > bm.num_blocks * bm.block_size:
            raise SchedulerError(
                f"sequence {seq.seq_id} needs KV for {most} tokens (prompt "
                f"{len(seq.prompt_ids)} + max_tokens {seq.max_tokens}) but the pool holds "
                f"{bm.num_blocks} blocks of {bm.block_size} = {bm.num_blocks * bm.block_size} "
                "tokens")

    def abort(self, seq_id: int) -> Sequence | None:
        """Drop a sequence now, freeing its blocks; marks it aborted. None if unknown."""
        for seq in self.waiting:
            if seq.seq_id == seq_id:
                self.waiting.remove(seq)
                seq.abort()
                return seq
        for seq in self.running:
            if seq.seq_id == seq_id:
                self._release(seq)
                seq.abort()
                return seq
        return None

    def _release(self, seq: Sequence) -> None:
        self._stop_running(seq)
        self.block_manager.free(seq.seq_id)

    def _stop_running(self, seq: Sequence) -> None:
        """Forget a running sequence's scheduling state (its blocks are the caller's)."""
        self.running.remove(seq)
        del self._computed[seq.seq_id]
        self._flight.forget(seq.seq_id)

    def _preempt(self, seq: Sequence) -> None:
        self._release(seq)
        self.order.requeue(self.waiting, seq)
        self.num_preemptions += 1

    def launched(self, output: SchedulerOutput) -> None:
        """The step ``output`` was launched and the next one may be scheduled before its
        ``update``: its KV slots and sampled tokens count as there (asynchronous scheduling)."""
        self._flight.launch(output)

    # -- one step -----------------------------------------------------------------------------
    def schedule(self, only: set[int] | None = None) -> SchedulerOutput:
        """Pick this step's work; the engine runs it, appends sampled tokens, calls ``update``.

        ``only``: schedule just these sequence ids (a group isolating a suspect request after
        a failed step); others wait, though they may still be preempted to make room."""
        bm = self.block_manager
        allowed = (lambda seq: True) if only is None else (lambda seq: seq.seq_id in only)
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        done: set[int] = set()
        preempted: list[int] = []  # for blocks a running sequence needs
        made_room: list[int] = []  # for a waiting sequence of higher priority
        for seq in [s for s in self.running if s.finished]:  # e.g. seq.abort() by the engine
            self._release(seq)

        def unschedule(victim: Sequence, into: list[int]) -> None:
            """Preempt ``victim`` (priority policy: for a sequence of higher priority), taking
            it out of this step if it was scheduled; its id goes ``into`` the list."""
            nonlocal budget
            item = next((x for x in scheduled if x.seq is victim), None)
            if item is not None:
                scheduled.remove(item)
                done.discard(victim.seq_id)
                budget += item.num_tokens
            self._preempt(victim)
            into.append(victim.seq_id)

        def admissible(seq: Sequence, num: int) -> bool:
            """A seat and blocks for ``seq``'s first ``num`` tokens, made (priority policy) by
            preempting running sequences of lower priority."""
            def fits() -> bool:
                return (len(self.running) < self.max_num_seqs
                        and bm.can_allocate(seq.seq_id, seq.token_view(), num, seq.salt))

            if fits():
                return True
            victims = [] if only is not None else self.order.victims(
                seq, num, self.running, bm, self.max_num_seqs)
            for victim in victims:
                unschedule(victim, made_room)
                if fits():
                    return True
            return False

        def emit(seq: Sequence, start: int, num: int, lookahead: int = 0) -> None:
            nonlocal budget
            scheduled.append(ScheduledSeq(seq, start, num, bm.block_table(seq.seq_id),
                                          start + num == self._num_tokens(seq), lookahead))
            done.add(seq.seq_id)
            budget -= num

        def make_room(seq: Sequence, num: int, may_preempt_self: bool) -> bool:
            """Preempt the last running sequences (the newest, or the lowest-priority ones)
            until ``num`` more slots of ``seq`` fit; one this step scheduled only for a
            sequence of higher priority."""
            while not bm.can_append(seq.seq_id, num):
                victim = self.running[-1]
                if victim is seq and not may_preempt_self:
                    return False
                if victim.seq_id in done:
                    if not (self.order.by_priority and victim.priority > seq.priority):
                        return False
                    unschedule(victim, preempted)
                    continue
                self._preempt(victim)
                preempted.append(victim.seq_id)
                if victim is seq:
                    return False
            return True

        for seq in list(self.running):  # decodes
            if seq.seq_id not in self._computed or not allowed(seq):
                continue  # preempted above, or held back
            start = self._start(seq)
            if self._num_tokens(seq) - start != 1 or self._last_in_flight(seq):
                continue
            ahead = self._lookahead(seq)
            if make_room(seq, 1 + ahead, may_preempt_self=True):
                bm.append(seq.seq_id, self._token_ids(seq), 1, ahead)
                emit(seq, start, 1, ahead)

        for seq in list(self.running):  # prefills already under way
            if budget == 0:
                break
            if (seq.seq_id in done or seq.seq_id not in self._computed or not allowed(seq)
                    or self._last_in_flight(seq)):
                continue
            start = self._start(seq)
            want = min(self._num_tokens(seq) - start, self.chunk_size, budget)
            # A prefill never preempts itself: when it is the newest, older ones run and free.
            if self._fitting(seq.seq_id, want) == 0:
                make_room(seq, 1, may_preempt_self=False)
            num = self._fitting(seq.seq_id, want)
            if num > 0:
                bm.append(seq.seq_id, self._token_ids(seq), num)
                emit(seq, start, num)

        while self.waiting and not preempted and budget > 0:
            seq = self.waiting[0] if only is None else next(
                (s for s in self.waiting if s.seq_id in only or s.finished), None)
            if seq is None or seq.seq_id in made_room:  # preempted now: it waits a step
                break
            if seq.finished:  # aborted through the sequence itself
                self.waiting.remove(seq)
                continue
            if self._behind_first_sample(seq):
                break
            cached = bm.num_cached_tokens(seq.token_view(), seq.salt, seq.seq_id)
            remaining = seq.num_tokens - cached
            if (not self.enable_chunked_prefill and budget < remaining
                    and remaining <= self.max_num_batched_tokens):
                break
            num = min(remaining, self.chunk_size, budget)
            if not admissible(seq, num):
                break
            self.waiting.remove(seq)
            bm.allocate(seq.seq_id, seq.token_view(), num, seq.salt)
            self._start_running(seq, cached)
            if seq.num_cached_tokens is None:  # its first admission (vLLM's count)
                seq.num_cached_tokens = cached
                seq.first_scheduled_time = time.monotonic()
            emit(seq, cached, num)

        # Nothing runs and nothing can start: an error only if no block is held at all (blocks
        # of detached sequences, e.g. PD prefills waiting for their transfer, come back later).
        if (not scheduled and not preempted and self.waiting and not self.running
                and bm.usage == 0 and only is None):
            seq = self.waiting[0]
            raise SchedulerError(f"sequence {seq.seq_id} with {seq.num_tokens} tokens cannot fit "
                                 f"the KV pool even alone; set max_tokens or enlarge the pool")
        return SchedulerOutput(scheduled, preempted + made_room,
                               self.max_num_batched_tokens - budget)

    def _start(self, seq: Sequence) -> int:
        """The first position a new step computes: past the KV written and in flight."""
        return self._computed[seq.seq_id] + self._flight.slots(seq.seq_id)

    def _num_tokens(self, seq: Sequence) -> int:
        """Tokens of a sequence, counting those sampled by launched steps."""
        return seq.num_tokens + self._flight.tokens(seq.seq_id)

    def _token_ids(self, seq: Sequence) -> TokenView:
        """All its tokens for the block manager (which reserves by their count); a token in
        flight is a placeholder, never hashed: hashes cover computed KV only."""
        return seq.token_view(self._flight.tokens(seq.seq_id))

    def _last_in_flight(self, seq: Sequence) -> bool:
        """Its token in flight is its last (``max_tokens``): nothing more to schedule."""
        flying = self._flight.tokens(seq.seq_id)
        return bool(flying) and seq.max_tokens is not None \
            and len(seq.output_ids) + flying >= seq.max_tokens

    def _behind_first_sample(self, seq: Sequence) -> bool:
        """Another sample of an n > 1 request waits while the first one's prompt is being
        prefilled here: it then finds the prompt's blocks in the prefix cache, so the prompt
        is prefilled once rather than n times side by side (2x the first token's wait at n=2)."""
        first = seq.fork_of
        if first is None or first.finished or not self.block_manager.enable_prefix_caching:
            return False
        computed = self._computed.get(first.seq_id)
        return computed is not None and computed < len(first.prompt_ids)

    def _lookahead(self, seq: Sequence) -> int:
        """Draft slots worth reserving: none past the sequence's ``max_tokens``."""
        if seq.max_tokens is None:
            return self.num_lookahead_tokens
        return max(0, min(self.num_lookahead_tokens, seq.max_tokens - len(seq.output_ids) - 1))

    def _fitting(self, seq_id: int, num: int) -> int:
        """Most of ``num`` new tokens the sequence's blocks plus the free pool can hold."""
        bm = self.block_manager
        slack = len(bm.block_table(seq_id)) * bm.block_size - bm.num_reserved_tokens(seq_id)
        return min(num, slack + bm.num_free_blocks * bm.block_size)

    def update(self, output: SchedulerOutput) -> list[Sequence]:
        """Record that the step ran: its KV is written and sampled tokens are appended.

        Advances computed counts, registers newly computed full blocks in the prefix cache and
        frees finished sequences. Sequences aborted since ``schedule`` are skipped.

        Returns:
            The sequences that finished (and were released) in this update.
        """
        self._flight.land(output)
        finished = []
        for item in output.scheduled:
            seq = item.seq
            if self._computed.get(seq.seq_id) != item.start:
                continue  # aborted (or preempted and re-admitted) since schedule
            computed = item.start + item.num_tokens
            if item.num_lookahead:  # speculative: keep the accepted tokens' KV only
                computed = min(seq.num_tokens - 1, computed + item.num_lookahead)
                self.block_manager.trim(seq.seq_id, computed)
            self._computed[seq.seq_id] = computed
            self.block_manager.mark_computed(seq.seq_id, seq.token_view(), computed)
            if seq.finished:
                self._release(seq)
                finished.append(seq)
            elif computed >= seq.num_tokens:
                raise SchedulerError(f"sequence {seq.seq_id} reached its last token but no "
                                     f"sampled token was appended before update()")
        return finished
