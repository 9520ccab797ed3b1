"""Scheduler bookkeeping of launched steps (asynchronous scheduling), host-pure.

A fake pipelined engine schedules step n + 1 right after launching step n (``launched``),
then finishes step n: it writes step n's (token, position) pairs into fake KV pages through
the block tables, checks every earlier position of the row reads back what was written
there, picks the next token from what it read, appends it and calls ``update``. The same
workloads run one step at a time; every sequence must end with the same tokens, under
preemption, aborts and ``max_tokens``, and every block must come back.
"""

import random

import pytest

from serving.core.kv_cache import BlockManager
from serving.core.scheduler import Scheduler, SchedulerOutput
from xds_jax.sampling.params import SamplingParams
from xds_jax.sequence import Sequence


class PipelinedFake:
    def __init__(self, sched: Scheduler, overlap: bool):
        self.sched, self.overlap = sched, overlap
        bm = sched.block_manager
        self.kv = [[None] * bm.block_size for _ in range(bm.num_blocks)]

    def finish(self, out: SchedulerOutput) -> None:
        """Device side then host side of a step: write and read KV, append, update."""
        bs = self.sched.block_manager.block_size
        for x in out.scheduled:
            seq = x.seq
            assert x.start + x.num_tokens <= seq.num_tokens  # its inputs are known by now
            for p in range(x.start, x.start + x.num_tokens):
                self.kv[x.block_table[p // bs]][p % bs] = (seq.all_ids[p], p)
        for x in out.scheduled:
            seq = x.seq
            if not x.is_last_chunk or seq.finished:
                continue  # an aborted sequence drops its token
            end = x.start + x.num_tokens
            read = [self.kv[x.block_table[p // bs]][p % bs] for p in range(end)]
            assert read == [(t, p) for p, t in enumerate(seq.all_ids[:end])], seq.seq_id
            seq.append((sum(t for t, _ in read) * 31 + end) % 97 + 1)
        self.sched.update(out)

    def run(self, seqs: list[Sequence], aborts: dict[int, int], limit: int = 500) -> None:
        for s in seqs:
            self.sched.add(s)
        flight = None
        for step in range(limit):
            for i in [i for i, at in aborts.items() if at == step]:
                self.sched.abort(seqs[i].seq_id)
            out = self.sched.schedule()
            if out.scheduled:
                if self.overlap:
                    self.sched.launched(out)
                else:
                    self.finish(out)
                    out = None
            if flight is not None:
                self.finish(flight)
            flight = out if out is not None and out.scheduled else None
            if flight is None and not self.sched.has_unfinished():
                return
        raise AssertionError("did not finish")


def workload(rng: random.Random, count: int) -> list[tuple[list[int], int]]:
    shared = [rng.randrange(1, 90) for _ in range(20)]
    work = []
    for i in range(count):
        tail = [rng.randrange(1, 90) for _ in range(rng.randrange(1, 40))]
        work.append(((shared + tail) if i % 3 == 0 else tail, rng.randrange(1, 14)))
    return work


@pytest.mark.parametrize("seed, num_blocks", [(0, 64), (1, 20), (2, 19), (3, 26)])
def test_overlapped_steps_give_the_synchronous_tokens(seed, num_blocks):
    """Small pools preempt sequences with a step in flight; some requests are aborted."""
    rng = random.Random(seed)
    work = workload(rng, 14)
    aborts = {rng.randrange(14): rng.randrange(2, 30) for _ in range(3)}
    results = []
    for overlap in (False, True):
        bm = BlockManager(num_blocks, 4)
        sched = Scheduler(bm, max_num_seqs=6, max_num_batched_tokens=24, chunk_size=10)
        seqs = [Sequence(p, SamplingParams(max_tokens=m)) for p, m in work]
        PipelinedFake(sched, overlap).run(seqs, aborts)
        assert bm.num_free_blocks == num_blocks and not sched._flight
        results.append([(s.output_ids, s.finish_reason) for s in seqs])
    sync, overlapped = results
    for i, ((want, why), (got, got_why)) in enumerate(zip(sync, overlapped, strict=True)):
        if why == "abort" or got_why == "abort":  # aborted at another point of its run
            assert want[:len(got)] == got or got[:len(want)] == want, i
        else:
            assert (got, got_why) == (want, why), i


def test_a_launched_step_is_counted_by_the_next_schedule():
    bm = BlockManager(16, 4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=16)
    seq = Sequence([5, 6, 7], SamplingParams(max_tokens=2))
    sched.add(seq)
    first = sched.schedule()
    sched.launched(first)
    assert sched.in_flight(seq.seq_id) == 1
    second = sched.schedule()  # decodes position 3, whose token is still in flight
    [item] = second.scheduled
    assert (item.start, item.num_tokens, item.is_last_chunk) == (3, 1, True)
    sched.launched(second)
    assert not sched.schedule().scheduled  # its token in flight at position 4 is its last
    seq.append(8)
    sched.update(first)
    assert sched.in_flight(seq.seq_id) == 1 and sched.num_computed_tokens(seq.seq_id) == 3
    seq.append(9)
    assert seq.finished
    assert sched.update(second) == [seq] and bm.num_free_blocks == 16
    assert sched.in_flight(seq.seq_id) == 0


def test_small_pools_preempt_with_a_step_in_flight():
    """The workloads above do preempt while a step is in flight (else they test less)."""
    rng = random.Random(2)
    work = workload(rng, 14)
    bm = BlockManager(19, 4)
    sched = Scheduler(bm, max_num_seqs=6, max_num_batched_tokens=24, chunk_size=10)
    PipelinedFake(sched, True).run([Sequence(p, SamplingParams(max_tokens=m)) for p, m in work],
                                   {})
    assert sched.num_preemptions > 0
