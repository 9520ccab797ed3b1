"""Asynchronous scheduling gives exactly what the synchronous engine gives.

The same workloads run on two engines over the tiny golden Llama (with a byte tokenizer, so
stop strings are real text), one stepping synchronously and one launching step n + 1 before
it finishes step n: greedy and seeded sampling, n > 1, logprobs, min_tokens, stop strings
and stop ids, max_tokens, aborts, penalties (which fall back to one step at a time), failed
steps and a crashed group. The streams only grow, nothing is emitted past a stop, and every
KV pool is whole afterwards.
"""

from __future__ import annotations

import numpy as np
import pytest

from serving.core.request import Request
from serving.core.runner import ModelRunner
from tests.helpers import GOLDEN
from tests.serving.test_engine import params_for, reference, workload
from tests.serving.test_faults import Stream, assert_pools_whole, colocated, run_inline
from xds_jax import LLM, SamplingParams
from xds_jax.sequence import Sequence
from xds_jax.text.byte_tokenizer import byte_tokenizer


def engine(async_scheduling: bool, **options) -> LLM:
    return LLM(str(GOLDEN / "llama"), dtype="float32", max_num_seqs=8,
               max_num_batched_tokens=48, staged=True, use_param_cache=False,
               async_scheduling=async_scheduling, **options)


def count_overlaps(llm: LLM) -> list[int]:
    """Counts the launches each group made with a step still in flight."""
    counts = []
    for i, g in enumerate(llm.engine.groups):
        counts.append(0)
        launch = g.runner.launch

        def counted(scheduled, after=None, i=i, launch=launch):
            counts[i] += bool(after)
            return launch(scheduled, after)

        g.runner.launch = counted
    return counts


def mixed_params(i: int) -> SamplingParams:
    """Every sampling feature a step carries, one per request."""
    kind = i % 7
    if kind == 0:
        return SamplingParams(temperature=0, max_tokens=3 + i % 11, ignore_eos=True)
    if kind == 1:
        return SamplingParams(temperature=0.9, top_p=0.8, seed=i, max_tokens=9, n=2,
                              ignore_eos=True)
    if kind == 2:
        return SamplingParams(temperature=0.7, top_k=5, seed=i, max_tokens=8, logprobs=3)
    if kind == 3:
        return SamplingParams(temperature=0, max_tokens=12, stop=["<tok_2", "<tok_3"])
    if kind == 4:
        return SamplingParams(temperature=1.0, seed=i, min_tokens=5, max_tokens=10,
                              stop_token_ids=[3, 17, 40])
    if kind == 5:  # penalties count every output token: these steps never overlap
        return SamplingParams(temperature=0.5, seed=i, repetition_penalty=1.3,
                              presence_penalty=0.5, max_tokens=7)
    return SamplingParams(temperature=0, max_tokens=10, logprobs=0, stop_token_ids=[11, 12])


def run_streams(llm: LLM, prompts: list[list[int]], params) -> list[Stream]:
    tokenizer = byte_tokenizer(llm.cfg)
    requests, streams = [], []
    for i, prompt in enumerate(prompts):
        stream, p = Stream(), params(i)
        seqs = [Sequence(prompt, p, index=j, seed=(p.seed or 0) + j, tokenizer=tokenizer)
                for j in range(p.n)]
        requests.append(Request(f"r{i}", None, prompt, p, seqs, on_output=stream))
        streams.append(stream)
    llm.engine.run_until_done(requests)
    return streams


def finals(streams: list[Stream]) -> tuple[list, list]:
    """What each request ended with, and its logprobs (rows batch differently in the two
    engines, so those agree to float32 rounding)."""
    out, logprobs = [], []
    for s in streams:
        s.check()
        final = s.outputs[-1].outputs
        out.append([(c.token_ids, c.text, c.finish_reason, c.stop_reason,
                     None if c.logprobs is None else [sorted(e) for e in c.logprobs])
                    for c in final])
        logprobs += [lp.logprob for c in final for e in c.logprobs or [] for lp in e.values()]
        logprobs += [c.cumulative_logprob or 0.0 for c in final]
    return out, logprobs


def test_every_sampling_feature_matches_the_synchronous_engine():
    sync, overlapped = engine(False), engine(True)
    counts = count_overlaps(overlapped)
    prompts = workload(sync.cfg.vocab_size, 28, seed=4)
    want, want_lps = finals(run_streams(sync, prompts, mixed_params))
    got, got_lps = finals(run_streams(overlapped, prompts, mixed_params))
    assert got == want
    np.testing.assert_allclose(got_lps, want_lps, rtol=1e-4, atol=1e-4)
    assert overlapped.engine.groups[0].overlap and not sync.engine.groups[0].overlap
    assert counts[0] > 10  # most steps launched with the previous one in flight
    for llm in (sync, overlapped):
        assert_pools_whole(llm.engine)
    # A stop string cuts the text and nothing past the stop ever reached a stream.
    stopped = [c for r in want for c in r if isinstance(c[3], str)]
    assert stopped and all(c[3] not in c[1] for c in stopped)


def test_greedy_matches_the_reference_and_steady_state_compiles_nothing():
    llm = engine(True)
    prompts = workload(llm.cfg.vocab_size, 24, seed=7)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        [params_for(i) for i in range(len(prompts))])
    assert [o.outputs[0].token_ids for o in outs] == reference(llm, prompts)
    runner = llm.engine.groups[0].runner
    # Long decodes of 8 fresh prompts (no prefix-cache hits): the first run compiles what
    # it needs, the next ones nothing, prefill, decode and on-device inputs alike.
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    counts = []
    for _ in range(3):
        fresh = [rng.integers(0, llm.cfg.vocab_size, 20).tolist() for _ in range(8)]
        outs = llm.generate([{"prompt_token_ids": p} for p in fresh], params)
        assert all(len(o.outputs[0].token_ids) == 60 for o in outs)
        counts.append(runner.compile_count)
    assert counts[0] == counts[1] == counts[2]
    assert any(key[0] == "inputs" for key in runner._shapes_seen)
    assert_pools_whole(llm.engine)


def test_aborts_mid_run_end_with_a_prefix_and_return_every_block():
    llm = engine(True)
    prompts = workload(llm.cfg.vocab_size, 12, seed=9)
    params = [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)] * len(prompts)
    want = reference_with(llm, prompts, params)
    streams = [Stream() for _ in prompts]
    requests = [Request(f"r{i}", None, p, sp, [Sequence(p, sp)], on_output=streams[i])
                for i, (p, sp) in enumerate(zip(prompts, params, strict=True))]
    engine_ = llm.engine
    for r in requests:
        engine_.submit(r)
    group = engine_.groups[0]
    for step in range(40):
        group.step()
        if step in (3, 4, 9):  # with a step in flight: its tokens for these are dropped
            for r in requests[step % 12::5][:2]:
                engine_.abort(r.request_id)
        if all(r.finished for r in requests):
            break
    while group.step():
        pass
    for i, s in enumerate(streams):
        last = s.outputs[-1].outputs[0]
        assert want[i][:len(last.token_ids)] == last.token_ids, f"request {i}"
        if last.finish_reason != "abort":
            assert last.token_ids == want[i]
    assert sum(s.outputs[-1].outputs[0].finish_reason == "abort" for s in streams) >= 3
    assert_pools_whole(engine_)


def reference_with(llm: LLM, prompts, params) -> list[list[int]]:
    outs = engine(False).generate([{"prompt_token_ids": p} for p in prompts], params)
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("where", ["launch", "finish"])
def test_a_failing_request_fails_alone_and_drops_the_step_in_flight(monkeypatch, where):
    """A step that raises (at its launch, or reading its tokens) with another in flight:
    both are rolled back, the culprit is isolated and fails alone, the rest equal the
    synchronous engine."""
    poison = 7
    original = getattr(ModelRunner, where)

    def poisoned(self, arg, *rest, **kw):
        seqs = ([s.seq for s in arg] if where == "launch" else
                [s for _, sampled in arg if sampled for s in sampled.seqs if s])
        if any(s.prompt_ids[0] == poison and len(s.output_ids) >= 2 for s in seqs):
            raise RuntimeError("poisoned row")
        return original(self, arg, *rest, **kw)

    llm = engine(True)
    prompts = workload(llm.cfg.vocab_size, 10, seed=2)
    prompts[3] = [poison] + prompts[3]
    params = [SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)] * len(prompts)
    want = reference_with(llm, prompts, params)
    monkeypatch.setattr(ModelRunner, where, poisoned)
    assert llm.engine.groups[0].overlap  # the patch keeps the runner's own launch/finish
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    for i, o in enumerate(outs):
        if i == 3:
            assert o.outputs[0].finish_reason == "abort"  # LLM reports a failure as abort
        else:
            assert o.outputs[0].token_ids == want[i], f"request {i}"
    stats = llm.engine.stats()
    assert stats["rollbacks"] >= 2 and llm.engine.groups[0].requests_failed == 1
    assert_pools_whole(llm.engine)


def test_a_crashed_group_with_a_step_in_flight_loses_nothing():
    llm = colocated("group_crash:group=1:after_steps=3", async_scheduling=True)
    assert all(g.overlap for g in llm.engine.groups)
    prompts = workload(llm.cfg.vocab_size, 24, seed=1)
    assert run_inline(llm.engine, llm, prompts) == reference(llm, prompts)
    stats = llm.engine.stats()
    assert stats["scale_downs"] == 1 and stats["requests_recovered"] >= 1
    assert_pools_whole(llm.engine)


def test_on_by_default_unless_steps_are_chained():
    """As vLLM's: groups schedule asynchronously unless ``num_scheduler_steps`` chains decode
    steps (then they chain); an explicit ``True`` overlaps, one step a launch; ``False`` (and
    the CLI's ``--no-async-scheduling``) turns it off."""
    from serving.core.dp_group import GroupConfig
    from serving.entrypoints import cli

    assert GroupConfig().overlaps_steps and not GroupConfig(async_scheduling=False).overlaps_steps
    assert not GroupConfig(num_scheduler_steps=4).overlaps_steps
    assert GroupConfig(async_scheduling=True, num_scheduler_steps=4).overlaps_steps
    default, chained = engine(None), engine(None, num_scheduler_steps=4)
    explicit = engine(True, num_scheduler_steps=4)
    assert default.engine.groups[0].overlap
    assert default.engine.groups[0].runner.num_scheduler_steps == 1
    assert not chained.engine.groups[0].overlap
    assert chained.engine.groups[0].runner.num_scheduler_steps == 4
    assert explicit.engine.groups[0].overlap
    assert explicit.engine.groups[0].runner.num_scheduler_steps == 1
    prompts = workload(default.cfg.vocab_size, 6, seed=3)
    want = reference(default, prompts)
    for llm in (default, chained):
        counts = count_overlaps(llm)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            [params_for(i) for i in range(len(prompts))])
        assert [o.outputs[0].token_ids for o in outs] == want
        assert (counts[0] > 0) == (llm is default)
    parse = cli.build_parser().parse_args
    assert parse(["generate", "Hi"]).async_scheduling is None
    assert parse(["generate", "--no-async-scheduling", "Hi"]).async_scheduling is False
    assert parse(["generate", "--async-scheduling", "Hi"]).async_scheduling is True
