"""The priority scheduling policy: queues in (priority, arrival) order, the lowest-priority
sequence preempted when blocks run out, a waiting sequence preempting running ones of strictly
lower priority to start; outputs as if each ran alone (fake KV engine of test_scheduler)."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serving.core.kv_cache import BlockManager
from serving.core.queue_order import POLICIES, priority_key
from serving.core.scheduler import Scheduler, SchedulerError
from tests.serving.test_async_scheduler import PipelinedFake, workload
from tests.serving.test_scheduler import FakeEngine, _make, _reference, _seq, _workload
from xds_jax.engine_config import SCHEDULING_POLICIES, EngineConfig, check_priority
from xds_jax.errors import ConfigError, SamplingParamsError
from xds_jax.sampling.params import SamplingParams
from xds_jax.sequence import Sequence


def _finish_order(eng: FakeEngine, seqs) -> list:
    """Step ``eng`` (its fake KV pages kept) until its scheduler is done; the order in which
    ``seqs`` finished."""
    s, order = eng.sched, []
    while s.has_unfinished():
        eng.step()
        order += [q for q in seqs if q.finished and q not in order]
    return order


def test_the_policies_are_the_engine_config_s():
    assert POLICIES == SCHEDULING_POLICIES
    with pytest.raises(SchedulerError, match="scheduling policy must be one of"):
        _make(policy="lottery")
    with pytest.raises(ConfigError, match="scheduling_policy must be one of 'fcfs', 'priority'"):
        EngineConfig(scheduling_policy="sjf")


def test_a_priority_other_than_zero_needs_the_priority_policy():
    assert check_priority(0, "fcfs") == 0 and check_priority(-3, "priority") == -3
    with pytest.raises(SamplingParamsError, match="^priority 2 needs priority scheduling"):
        check_priority(2, "fcfs")
    for bad in (1.5, "1", True, None):
        with pytest.raises(SamplingParamsError, match="^priority must be an integer"):
            check_priority(bad, "priority")


def test_one_seat_runs_waiting_sequences_by_priority_then_arrival():
    prio = [3, 1, 2, 1, 0]
    for policy, expected in (("priority", [4, 1, 3, 2, 0]), ("fcfs", [0, 1, 2, 3, 4])):
        s = _make(max_num_seqs=1, policy=policy)
        seqs = [_seq([10 + i, 20 + i], max_tokens=2) for i in range(5)]
        for q, p in zip(seqs, prio, strict=True):
            q.priority = p
            s.add(q)
        if policy == "priority":
            assert list(s.waiting) == sorted(seqs, key=priority_key)
        order = _finish_order(FakeEngine(s), seqs)
        assert order == [seqs[i] for i in expected], policy
        for q in seqs:
            assert q.output_ids == _reference(q.prompt_ids, 2)


def test_blocks_running_out_preempt_the_lowest_priority_not_the_newest():
    # As test_scheduler's preemption case: 6 blocks of 2, a and b need a 4th block each at
    # position 6. a arrived first but has the lower priority (a higher number): a goes.
    s = _make(num_blocks=6, block_size=2, max_num_seqs=4, budget=16, policy="priority")
    a, b = _seq([1, 2, 3, 4, 5], max_tokens=4), _seq([7, 8, 9, 10, 11], max_tokens=4)
    a.priority, b.priority = 1, 0
    s.add(a)
    s.add(b)
    assert list(s.waiting) == [b, a]
    eng = FakeEngine(s)
    eng.step()
    eng.step()
    out = eng.step()
    assert out.preempted == [a.seq_id] and [x.seq for x in out.scheduled] == [b]
    assert list(s.waiting) == [a]
    while s.has_unfinished():
        eng.step()
    assert a.output_ids == _reference([1, 2, 3, 4, 5], 4)
    assert b.output_ids == _reference([7, 8, 9, 10, 11], 4)
    assert s.block_manager.num_free_blocks == 6


def test_a_waiting_sequence_preempts_a_lower_priority_one_for_its_seat():
    s = _make(max_num_seqs=1, policy="priority")
    low, high, same = (_seq([1, 2, 3], max_tokens=6), _seq([4, 5], max_tokens=3),
                       _seq([6, 7], max_tokens=2))
    low.priority, high.priority, same.priority = 5, 0, 5
    s.add(low)
    eng = FakeEngine(s)
    eng.step()
    eng.step()  # low decodes
    s.add(same)  # equal priority: waits its turn, no preemption
    out = eng.step()
    assert not out.preempted and [x.seq for x in out.scheduled] == [low]
    s.add(high)
    out = eng.step()
    assert out.preempted == [low.seq_id] and [x.seq for x in out.scheduled] == [high]
    assert list(s.waiting) == [low, same]  # low arrived before same: it goes first again
    assert _finish_order(eng, [low, high, same]) == [high, low, same]
    for q, n in ((low, 6), (high, 3), (same, 2)):
        assert q.output_ids == _reference(q.prompt_ids, n)
    assert s.num_preemptions == 1


def test_a_waiting_sequence_preempts_for_blocks_only_where_they_would_be_enough():
    # 8 blocks of 2: low will hold 3 (4 prompt tokens + 2 decoded), filler 4 (7 + 1).
    s = _make(num_blocks=8, block_size=2, max_num_seqs=4, budget=16, policy="priority")
    low = _seq([1, 2, 3, 4], max_tokens=8)
    low.priority = 1
    s.add(low)
    eng = FakeEngine(s)
    eng.step()
    filler = _seq([20, 21, 22, 23, 24, 25, 26], max_tokens=2)
    filler.priority = 1
    s.add(filler)
    eng.step()  # filler takes 4 blocks, low 3: one free (the next step grows neither)
    high = _seq(list(range(30, 47)), max_tokens=1)  # 17 tokens: 9 blocks, more than exists
    high.priority = 0
    with pytest.raises(SchedulerError, match="needs KV"):
        s.add(high)
    big = _seq(list(range(30, 39)), max_tokens=1)  # 9 tokens: 5 blocks; 1 free + 3 + 4 held
    big.priority = 0
    s.add(big)
    out = eng.step()
    # filler (admitted last among priority 1) goes first; its 4 blocks + 1 free suffice.
    assert out.preempted == [filler.seq_id]
    assert big in [x.seq for x in out.scheduled] and low in [x.seq for x in out.scheduled]
    _finish_order(eng, [low, filler, big])
    for q, n in ((low, 8), (filler, 2), (big, 1)):
        assert q.output_ids == _reference(q.prompt_ids, n)


def test_no_preemption_where_the_lower_priority_blocks_would_not_make_room():
    s = _make(num_blocks=8, block_size=2, max_num_seqs=4, budget=16, policy="priority")
    keep = _seq(list(range(1, 10)), max_tokens=2)  # 5 blocks, priority 0
    low = _seq([50, 51], max_tokens=6)  # 2 blocks, priority 2
    keep.priority, low.priority = 0, 2
    s.add(keep)
    s.add(low)
    eng = FakeEngine(s)
    eng.step()
    waiting = _seq(list(range(60, 68)), max_tokens=1)  # 8 tokens: 4 blocks; 1 free + 2 of low
    waiting.priority = 1
    s.add(waiting)
    out = eng.step()
    assert not out.preempted and waiting in s.waiting
    _finish_order(eng, [keep, low, waiting])
    assert s.num_preemptions == 0
    for q, n in ((keep, 2), (low, 6), (waiting, 1)):
        assert q.output_ids == _reference(q.prompt_ids, n)


@settings(max_examples=100, deadline=None)
@given(_workload(), st.booleans(), st.data())
def test_random_workloads_under_priority_finish_in_order_without_leaks(workload, caching, data):
    block_size, num_blocks, max_num_seqs, budget, chunk, requests = workload
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=caching)
    s = Scheduler(bm, max_num_seqs, budget, chunk_size=chunk, policy="priority")
    eng, seqs = FakeEngine(s), []
    for prompt, max_tokens in requests:
        seqs.append(_seq(prompt, max_tokens))
        seqs[-1].priority = data.draw(st.integers(-2, 2))
        s.add(seqs[-1])
    for _ in range(2000):
        if not s.has_unfinished():
            break
        assert list(s.waiting) == sorted(s.waiting, key=priority_key)
        assert s.running == sorted(s.running, key=priority_key)
        out = eng.step()
        assert out.scheduled, "no progress with unfinished requests"
        if len(seqs) < len(requests) + 8 and data.draw(st.integers(0, 4)) == 0:  # arrivals
            prompt, max_tokens = data.draw(st.sampled_from(requests))
            seqs.append(_seq(prompt, max_tokens))
            seqs[-1].priority = data.draw(st.integers(-2, 2))
            s.add(seqs[-1])
    assert not s.has_unfinished()
    assert bm.num_free_blocks == bm.num_blocks
    for q in seqs:
        assert q.finish_reason == "length"
        assert q.output_ids == _reference(q.prompt_ids, q.max_tokens)


def test_no_preemption_when_the_victim_holds_the_waiting_sequence_s_own_prefix():
    # 8 blocks of 2. low holds the cached blocks of P; W's prompt starts with P. Freeing low
    # frees them, but W would take them back: 2 free + low's 3 < W's 4 new + 2 revived.
    s = _make(num_blocks=8, block_size=2, max_num_seqs=4, budget=32, policy="priority")
    P = [1, 2, 3, 4]
    keep, low = _seq([40, 41, 42, 43, 44, 45], max_tokens=8), _seq(P + [5], max_tokens=8)
    keep.priority, low.priority = 0, 1
    s.add(keep)
    s.add(low)
    eng = FakeEngine(s)
    eng.step()
    waiting = _seq(P + list(range(60, 68)), max_tokens=1)
    waiting.priority = 0
    s.add(waiting)
    out = eng.step()
    assert not out.preempted and low in s.running and waiting in s.waiting
    _finish_order(eng, [keep, low, waiting])
    for q, n in ((keep, 8), (low, 8), (waiting, 1)):
        assert q.output_ids == _reference(q.prompt_ids, n)


def test_victims_sharing_blocks_make_room_together():
    # a and b (one prompt) share its two full blocks: neither alone frees enough for the
    # 9-token prompt, both together do, and are taken out of the step that scheduled them.
    s = _make(num_blocks=8, block_size=2, max_num_seqs=4, budget=32, policy="priority")
    keep, a = _seq([40, 41, 42], max_tokens=8), _seq([1, 2, 3, 4, 5], max_tokens=8)
    keep.priority, a.priority = 0, 1
    s.add(keep)
    s.add(a)
    eng = FakeEngine(s)
    eng.step()
    b = _seq([1, 2, 3, 4, 5], max_tokens=8)
    b.priority = 1
    s.add(b)
    eng.step()
    high = _seq(list(range(70, 79)), max_tokens=1)
    high.priority = 0
    s.add(high)
    out = eng.step()
    assert out.preempted == [b.seq_id, a.seq_id]
    assert [x.seq for x in out.scheduled] == [keep, high]
    assert _finish_order(eng, [keep, a, b, high])[0] is high
    for q, n in ((keep, 8), (a, 8), (b, 8), (high, 1)):
        assert q.output_ids == _reference(q.prompt_ids, n)


def test_a_high_priority_prefill_under_way_preempts_a_scheduled_lower_decode():
    # high's prompt is prefilled in chunks; when its next chunk finds no block, low (lower
    # priority, already scheduled to decode this step) is taken out of the step and preempted.
    s = _make(num_blocks=6, block_size=2, max_num_seqs=4, budget=8, chunk_size=4,
              policy="priority")
    low = _seq([1, 2, 3], max_tokens=8)
    low.priority = 5
    s.add(low)
    eng = FakeEngine(s)
    eng.step()
    high = _seq(list(range(20, 30)), max_tokens=2)
    high.priority = 0
    s.add(high)
    starved = 0
    while not high.finished:
        out = eng.step()
        starved += high not in [x.seq for x in out.scheduled] and not high.finished
    assert starved == 0 and s.num_preemptions >= 1
    _finish_order(eng, [low, high])
    assert low.output_ids == _reference(low.prompt_ids, 8)
    assert high.output_ids == _reference(high.prompt_ids, 2)


@pytest.mark.parametrize("seed", range(12))
def test_late_arrivals_preempt_sequences_with_a_step_in_flight(seed):
    """Asynchronous scheduling (step n + 1 scheduled before step n is updated) with requests
    of random priorities arriving while others run: victims may have a step in flight; every
    sequence still ends with its own tokens and every block comes back."""
    rng = random.Random(seed)
    work = workload(rng, 12)
    num_blocks = rng.choice([19, 26, 40])
    bm = BlockManager(num_blocks, 4)
    s = Scheduler(bm, max_num_seqs=rng.choice([2, 3, 6]), max_num_batched_tokens=24,
                  chunk_size=10, policy="priority")
    fake = PipelinedFake(s, True)
    seqs = [Sequence(p, SamplingParams(max_tokens=m)) for p, m in work]
    arrival = [0 if i < 4 else rng.randrange(1, 40) for i in range(len(seqs))]
    for q in seqs:
        q.priority = rng.randrange(-2, 3)
    flight, preempted_in_flight = None, 0
    for step in range(800):
        for q, at in zip(seqs, arrival, strict=True):
            if at == step:
                s.add(q)
        out = s.schedule()
        if flight is not None:
            preempted_in_flight += len(set(out.preempted) & {x.seq.seq_id for x in
                                                              flight.scheduled})
        assert s.running == sorted(s.running, key=priority_key)
        if out.scheduled:
            s.launched(out)
        if flight is not None:
            fake.finish(flight)
        flight = out if out.scheduled else None
        if flight is None and step >= max(arrival) and all(q.finished for q in seqs):
            break
    assert all(q.output_ids == _reference(q.prompt_ids, q.max_tokens) for q in seqs)
    assert not s.running and not s._flight and bm.num_free_blocks == num_blocks
    if seed == 0:
        assert preempted_in_flight > 0  # the case this test is for happens
