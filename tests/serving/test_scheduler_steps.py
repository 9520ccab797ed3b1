"""Steps that do not end as scheduled: a failed step rolled back and its suspects run alone,
and speculative look-ahead slots reserved then trimmed to what was accepted. The fake engine
and reference are ``test_scheduler``'s."""

from __future__ import annotations

from serving.core.kv_cache import BlockManager
from serving.core.scheduler import Scheduler
from tests.serving.test_scheduler import FakeEngine, _make, _reference, _seq
from xds_jax.sampling.params import SamplingParams
from xds_jax.sequence import Sequence


def test_rolled_back_step_is_recomputed_and_only_runs_the_isolated_sequences():
    """A failed step is undone (blocks freed, sequences back in front of the queue); with
    ``only`` a suspect runs alone; every sequence still ends as the reference says."""
    sched = _make(num_blocks=32, block_size=4, budget=16)
    engine = FakeEngine(sched)
    seqs = [_seq([i + 1] * (3 + 2 * i), max_tokens=5) for i in range(3)]
    for s in seqs:
        sched.add(s)
    engine.step()
    engine.step()  # now all three are part-way
    failed = sched.schedule()
    assert len(failed.scheduled) == 3
    rolled = sched.roll_back(failed)
    assert sorted(rolled) == sorted(s.seq_id for s in seqs)
    assert sched.num_running == 0 and sched.block_manager.usage == 0
    assert [s.seq_id for s in sched.waiting] == [s.seq_id for s in seqs]

    suspect = {seqs[1].seq_id}
    out = sched.schedule(only=suspect)
    assert [x.seq.seq_id for x in out.scheduled] == [seqs[1].seq_id]
    engine.run(out)
    sched.update(out)
    while sched.has_unfinished():
        engine.step()
    for s in seqs:
        assert s.output_ids == _reference(s.prompt_ids, 5)
    assert sched.block_manager.usage == 0


def test_only_with_no_runnable_suspect_schedules_nothing_and_raises_nothing():
    sched = _make()
    sched.add(_seq([1, 2, 3]))
    assert sched.schedule(only={12345}).is_empty


def test_lookahead_slots_are_reserved_and_trimmed_to_the_accepted_tokens():
    """Speculative decoding: a decode reserves 1 + k slots; ``update`` keeps only the KV of
    tokens actually appended, frees blocks past them and hashes no rejected token."""
    bm = BlockManager(num_blocks=8, block_size=4)
    sched = Scheduler(bm, max_num_seqs=2, max_num_batched_tokens=16, num_lookahead_tokens=3)
    seq = Sequence(list(range(1, 8)), SamplingParams(max_tokens=20, ignore_eos=True))
    sched.add(seq)
    out = sched.schedule()
    seq.append(50)
    sched.update(out)
    out = sched.schedule()
    item = out.scheduled[0]
    assert (item.start, item.num_tokens, item.num_lookahead) == (7, 1, 3)
    assert bm.num_reserved_tokens(seq.seq_id) == 11 and len(bm.block_table(seq.seq_id)) == 3
    seq.append(51)  # one draft accepted, then the target's token
    seq.append(52)
    sched.update(out)
    assert sched.num_computed_tokens(seq.seq_id) == 9
    assert bm.num_reserved_tokens(seq.seq_id) == 9 and len(bm.block_table(seq.seq_id)) == 3
    assert bm.num_cached_blocks == 2  # blocks [1..4], [5, 6, 7, 50]: accepted tokens only
    out = sched.schedule()
    seq.append(53)
    sched.update(out)
    assert bm.num_reserved_tokens(seq.seq_id) == 10
    sched.abort(seq.seq_id)
    assert bm.num_free_blocks == 8
