"""Scheduler: decodes first, chunked prefill, FCFS admission, preemption by recompute, aborts.

A fake engine writes (token, position) into fake KV pages through the block tables and checks
every earlier position it would attend to, so prefix sharing and preemption bugs show up as
wrong KV, and its "model" picks the next token from what it read.
"""

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serving.core.kv_cache import BlockManager
from serving.core.scheduler import Scheduler, SchedulerError, SchedulerOutput
from xds_jax.sampling.params import SamplingParams
from xds_jax.sequence import Sequence


def _seq(prompt, max_tokens=4, **kw) -> Sequence:
    return Sequence(list(prompt), SamplingParams(max_tokens=max_tokens, **kw))


def _next_token(ids: list[int]) -> int:
    return (sum(ids) * 31 + len(ids)) % 97 + 1


class FakeEngine:
    """Runs SchedulerOutputs against fake KV pages and checks the scheduler's contract."""

    def __init__(self, sched: Scheduler):
        self.sched = sched
        bm = sched.block_manager
        self.kv = [[None] * bm.block_size for _ in range(bm.num_blocks)]
        self.steps = 0

    def run(self, out: SchedulerOutput) -> None:
        bm, s = self.sched.block_manager, self.sched
        assert out.num_batched_tokens == sum(x.num_tokens for x in out.scheduled)
        assert out.num_batched_tokens <= s.max_num_batched_tokens
        assert len(out.scheduled) <= s.max_num_seqs and s.num_running <= s.max_num_seqs
        assert len({x.seq.seq_id for x in out.scheduled}) == len(out.scheduled)
        bs = bm.block_size
        for x in out.scheduled:
            seq, end = x.seq, x.start + x.num_tokens
            assert x.num_tokens >= 1 and end <= seq.num_tokens
            assert x.is_last_chunk == (end == seq.num_tokens)
            assert len(x.block_table) * bs >= end  # the table covers every scheduled position
            assert len(set(x.block_table)) == len(x.block_table)
            for p in range(x.start):  # attention reads: everything before must be there
                assert self.kv[x.block_table[p // bs]][p % bs] == (seq.all_ids[p], p), p
            for p in range(x.start, end):  # writes never land in a shared block
                block = x.block_table[p // bs]
                assert bm.ref_count(block) == 1
                self.kv[block][p % bs] = (seq.all_ids[p], p)
        for x in out.scheduled:
            if x.is_last_chunk:
                x.seq.append(_next_token(x.seq.all_ids))
        self.steps += 1

    def step(self) -> SchedulerOutput:
        out = self.sched.schedule()
        self.run(out)
        self.sched.update(out)
        return out


def _make(num_blocks=64, block_size=4, max_num_seqs=8, budget=32, **kw) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, block_size), max_num_seqs, budget, **kw)


def _reference(prompt: list[int], max_tokens: int) -> list[int]:
    ids = list(prompt)
    for _ in range(max_tokens):
        ids.append(_next_token(ids))
    return ids[len(prompt):]


def test_scheduler_and_block_manager_import_no_jax():
    code = ("import sys, serving.core.kv_cache, serving.core.scheduler; "
            "print(sorted(m for m in sys.modules"
            " if m.split('.')[0] in ('jax', 'jaxlib', 'xds_jax')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, cwd=Path(__file__).parents[2])
    assert result.stdout.strip() == "[]"


def test_single_sequence_prefills_then_decodes_to_completion():
    s = _make()
    seq = _seq([5, 6, 7], max_tokens=3)
    s.add(seq)
    eng = FakeEngine(s)
    out = eng.step()
    [x] = out.scheduled
    assert (x.start, x.num_tokens, x.is_last_chunk, x.is_prefill) == (0, 3, True, True)
    out = eng.step()
    [x] = out.scheduled
    assert (x.start, x.num_tokens, x.is_prefill, x.token_ids) == (3, 1, False, [seq.all_ids[3]])
    eng.step()
    assert seq.finished and not s.has_unfinished()
    assert seq.output_ids == _reference([5, 6, 7], 3)
    assert s.block_manager.num_free_blocks == 64


def test_long_prompt_is_chunked_and_decodes_are_not_starved():
    s = _make(budget=8, chunk_size=8)
    short, long = _seq([1, 2], max_tokens=6), _seq(range(1, 30), max_tokens=2)
    s.add(short)
    eng = FakeEngine(s)
    eng.step()
    s.add(long)
    starts = []
    while not long.finished:
        out = eng.step()
        kinds = {x.seq.seq_id: x for x in out.scheduled}
        if not short.finished and short.seq_id in {x.seq.seq_id for x in out.scheduled}:
            assert kinds[short.seq_id].num_tokens == 1
        elif not short.finished:
            pytest.fail("decode starved by a long prefill")
        if long.seq_id in kinds and kinds[long.seq_id].is_prefill:
            x = kinds[long.seq_id]
            starts.append((x.start, x.num_tokens, x.is_last_chunk))
            assert out.scheduled[0].seq is short or short.finished  # decodes come first
    # 1 decode token + 7 prompt tokens per step while the short sequence decodes.
    assert starts == [(0, 7, False), (7, 7, False), (14, 7, False), (21, 7, False),
                      (28, 1, True)]
    assert long.output_ids == _reference(list(range(1, 30)), 2)


def test_chunk_size_caps_one_sequence_per_step():
    s = _make(budget=32, chunk_size=5)
    seq = _seq(range(12), max_tokens=1)
    s.add(seq)
    eng = FakeEngine(s)
    chunks = [eng.step().scheduled[0] for _ in range(3)]
    assert [(x.start, x.num_tokens, x.is_last_chunk) for x in chunks] == [
        (0, 5, False), (5, 5, False), (10, 2, True)]
    assert seq.finished


def test_budget_and_max_num_seqs_limit_admission_fcfs():
    s = _make(max_num_seqs=2, budget=10)
    seqs = [_seq([i] * 4, max_tokens=2) for i in range(1, 5)]
    for q in seqs:
        s.add(q)
    out = s.schedule()
    assert [x.seq for x in out.scheduled] == seqs[:2] and out.num_batched_tokens == 8
    assert s.num_running == 2 and s.num_waiting == 2


def test_chunked_prefill_disabled_prefills_whole_prompts_only():
    s = _make(budget=10, enable_chunked_prefill=False)
    a, b = _seq(range(1, 7)), _seq(range(1, 8))
    s.add(a)
    s.add(b)
    out = s.schedule()
    assert [(x.seq, x.num_tokens) for x in out.scheduled] == [(a, 6)]  # b does not fit whole
    with pytest.raises(SchedulerError, match="max_num_batched_tokens"):
        s.add(_seq(range(1, 12)))


def test_prefix_cache_second_request_computes_only_the_remainder():
    s = _make(block_size=4)
    system = list(range(1, 37))  # 9 full blocks
    first, second = _seq(system + [50, 51, 52, 53], 2), _seq(system + [60, 61, 62, 63], 2)
    eng = FakeEngine(s)
    s.add(first)
    while s.has_unfinished():
        eng.step()
    s.add(second)
    out = s.schedule()
    [x] = out.scheduled
    assert x.start == 36 and x.num_tokens == 4
    eng.run(out)
    s.update(out)
    while s.has_unfinished():
        eng.step()
    assert second.output_ids == _reference(system + [60, 61, 62, 63], 2)
    assert s.prefix_hit_rate == pytest.approx(36 / 80)


def test_preemption_recomputes_most_recent_and_keeps_outputs():
    # 6 blocks of 2: a and b need 3 blocks each for their prompts + 1 token, then run out.
    s = _make(num_blocks=6, block_size=2, max_num_seqs=4, budget=16)
    a, b = _seq([1, 2, 3, 4, 5], max_tokens=4), _seq([7, 8, 9, 10, 11], max_tokens=4)
    s.add(a)
    s.add(b)
    eng = FakeEngine(s)
    eng.step()
    out = eng.step()  # both decode at position 5 (block 3 of each): 6 blocks in use
    assert s.num_preemptions == 0
    out = eng.step()  # position 6 needs a new block: b (admitted last) is preempted
    assert out.preempted == [b.seq_id] and [x.seq for x in out.scheduled] == [a]
    assert list(s.waiting) == [b] and len(b.output_ids) == 2
    while s.has_unfinished():
        out = eng.step()
        for x in out.scheduled:
            if x.seq is b and x.start < 7:
                # a's next block evicted b's cached tail block (freed tail first); the head
                # blocks are hit, the rest of prompt + output is recomputed.
                assert (x.start, x.num_tokens) == (4, 3)
    assert a.output_ids == _reference([1, 2, 3, 4, 5], 4)
    assert b.output_ids == _reference([7, 8, 9, 10, 11], 4)
    assert s.block_manager.num_free_blocks == 6


def test_preempted_sequence_is_re_prefilled_over_prompt_and_output():
    bm = BlockManager(6, 2, enable_prefix_caching=False)
    s = Scheduler(bm, 4, 16)
    a, b = _seq([1, 2, 3, 4, 5], max_tokens=4), _seq([7, 8, 9, 10, 11], max_tokens=4)
    s.add(a)
    s.add(b)
    eng = FakeEngine(s)
    for _ in range(3):
        eng.step()
    assert list(s.waiting) == [b]
    while b.seq_id not in {x.seq.seq_id for x in eng.step().scheduled}:
        pass
    assert b.output_ids == _reference([7, 8, 9, 10, 11], 3)  # re-prefill sampled the 3rd
    while s.has_unfinished():
        eng.step()
    assert b.output_ids == _reference([7, 8, 9, 10, 11], 4)


def test_abort_frees_blocks_at_once_waiting_or_running():
    s = _make(num_blocks=8, block_size=4, max_num_seqs=1)
    a, b = _seq(range(1, 10)), _seq(range(1, 6))
    s.add(a)
    s.add(b)
    out = s.schedule()
    assert s.kv_usage > 0
    assert s.abort(b.seq_id) is b and b.finish_reason == "abort" and s.num_waiting == 0
    assert s.abort(a.seq_id) is a
    assert s.block_manager.num_free_blocks == 8 and not s.has_unfinished()
    s.update(out)  # a step in flight when the abort came is ignored
    assert s.abort(12345) is None
    assert s.block_manager.num_free_blocks == 8


def test_sequences_aborted_through_the_sequence_are_dropped():
    s = _make(num_blocks=8, max_num_seqs=1)
    a, b = _seq([1, 2, 3]), _seq([4, 5, 6])
    s.add(a)
    s.add(b)
    eng = FakeEngine(s)
    eng.step()
    a.abort()
    b.abort()
    assert s.schedule().is_empty and not s.has_unfinished()
    assert s.block_manager.num_free_blocks == 8


def test_requests_that_can_never_run_are_rejected_at_add():
    s = _make(num_blocks=4, block_size=4)
    with pytest.raises(SchedulerError, match="pool holds 4 blocks"):
        s.add(_seq(range(1, 15), max_tokens=4))  # 14 + 3 > 16 token slots
    s.add(_seq(range(1, 15), max_tokens=3))
    with pytest.raises(SchedulerError, match="empty prompt"):
        s.add(_seq([]))
    dup = _seq([1])
    s.add(dup)
    with pytest.raises(SchedulerError, match="already added"):
        s.add(dup)
    with pytest.raises(SchedulerError, match="max_num_seqs"):
        _make(max_num_seqs=8, budget=4)


def test_update_requires_the_sampled_token():
    s = _make()
    s.add(_seq([1, 2]))
    out = s.schedule()
    with pytest.raises(SchedulerError, match="no sampled token"):
        s.update(out)


def _run_workload(sched: Scheduler, requests, aborts, data) -> None:
    eng = FakeEngine(sched)
    seqs = []
    for prompt, max_tokens in requests:
        seqs.append(_seq(prompt, max_tokens))
        sched.add(seqs[-1])
    aborted = set()
    for _ in range(2000):
        if not sched.has_unfinished():
            break
        out = sched.schedule()
        assert out.scheduled, "no progress with unfinished requests"
        for x in out.scheduled:
            assert x.start < x.seq.num_tokens  # a prefix hit never covers the whole prompt
        eng.run(out)
        if aborts and data.draw(st.integers(0, 20)) == 0:
            victim = data.draw(st.sampled_from(seqs))
            if not victim.finished:
                sched.abort(victim.seq_id)
                aborted.add(victim.seq_id)
        sched.update(out)
        assert min(sched.block_manager._ref) >= 0
        assert sched.num_running <= sched.max_num_seqs
    assert not sched.has_unfinished()
    bm = sched.block_manager
    assert bm.num_free_blocks == bm.num_blocks and bm.usage == 0
    assert len(bm._free) + len(bm._evictable) == bm.num_blocks
    for seq, (prompt, max_tokens) in zip(seqs, requests, strict=True):
        if seq.seq_id in aborted:
            assert seq.finish_reason == "abort"
        else:
            assert seq.finish_reason == "length"
            assert seq.output_ids == _reference(prompt, max_tokens)


_prefixes = [list(range(1, 20)), list(range(40, 50)), []]


@st.composite
def _workload(draw):
    block_size = draw(st.sampled_from([1, 2, 4]))
    num_blocks = draw(st.integers(6, 24))
    max_num_seqs = draw(st.integers(1, 6))
    budget = draw(st.integers(max_num_seqs, 24))
    chunk = draw(st.one_of(st.none(), st.integers(1, 12)))
    requests = []
    for _ in range(draw(st.integers(1, 10))):
        prefix = _prefixes[draw(st.integers(0, 2))][: draw(st.integers(0, 19))]
        tail = draw(st.lists(st.integers(1, 99), min_size=0 if prefix else 1, max_size=8))
        prompt = prefix + tail
        room = num_blocks * block_size - len(prompt) + 1
        if room < 1:
            continue
        requests.append((prompt, draw(st.integers(1, min(room, 8)))))
    return block_size, num_blocks, max_num_seqs, budget, chunk, requests


@settings(max_examples=150, deadline=None)
@given(_workload(), st.booleans(), st.booleans(), st.data())
def test_random_workloads_finish_without_leaks(workload, caching, aborts, data):
    block_size, num_blocks, max_num_seqs, budget, chunk, requests = workload
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=caching)
    sched = Scheduler(bm, max_num_seqs, budget, chunk_size=chunk)
    _run_workload(sched, requests, aborts, data)


@settings(max_examples=50, deadline=None)
@given(_workload(), st.data())
def test_random_workloads_without_chunked_prefill(workload, data):
    block_size, num_blocks, max_num_seqs, budget, _, requests = workload
    sched = Scheduler(BlockManager(num_blocks, block_size), max_num_seqs, budget,
                      enable_chunked_prefill=False)
    requests = [r for r in requests if len(r[0]) <= budget]
    _run_workload(sched, requests, False, data)
