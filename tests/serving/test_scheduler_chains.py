"""Chained decode steps (``num_scheduler_steps``) give exactly what one step a launch gives.

The workloads of ``test_async_scheduling`` (every sampling feature: greedy and seeded draws,
n > 1, logprobs, min_tokens, stop strings and ids, max_tokens, penalties, which fall back to
one step a launch) run on an engine launching up to four decode steps back to back and on
one launching one; the streams only grow, nothing is emitted past a stop, and every KV pool
is whole afterwards. A pool too small for every row's reserved slots preempts and still ends
as the reference says; the chains reuse the one-step programs (no compile of their own).
"""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from serving.entrypoints.cli_args import add_engine_options
from tests.helpers import GOLDEN
from tests.serving.test_async_scheduling import engine, finals, mixed_params, run_streams
from tests.serving.test_engine import params_for, reference, workload
from tests.serving.test_faults import assert_pools_whole
from xds_jax import LLM, SamplingParams
from xds_jax.errors import ConfigError


def count_chains(llm: LLM) -> list[int]:
    """Records, per launch of the first group, how many decode steps it chained."""
    runner = llm.engine.groups[0].runner
    chains = []
    launch = runner._launch_decodes

    def counted(items, sampled, sources):
        pending = launch(items, sampled, sources)
        chains.append(len(pending))
        return pending

    runner._launch_decodes = counted
    return chains


def test_every_sampling_feature_matches_one_step_a_launch():
    one, chained = engine(False), engine(False, num_scheduler_steps=4)
    chains = count_chains(chained)
    prompts = workload(one.cfg.vocab_size, 28, seed=4)
    want, want_lps = finals(run_streams(one, prompts, mixed_params))
    got, got_lps = finals(run_streams(chained, prompts, mixed_params))
    assert got == want
    np.testing.assert_allclose(got_lps, want_lps, rtol=1e-4, atol=1e-4)
    assert chains.count(4) > 3 and 1 in chains  # penalised rows run one step a launch
    for llm in (one, chained):
        assert_pools_whole(llm.engine)
    stopped = [c for r in want for c in r if isinstance(c[3], str)]
    assert stopped and all(c[3] not in c[1] for c in stopped)


def test_greedy_matches_the_reference_with_no_program_of_its_own():
    one, chained = engine(False), engine(False, num_scheduler_steps=3)
    chains = count_chains(chained)
    prompts = workload(chained.cfg.vocab_size, 24, seed=7)
    requests = [{"prompt_token_ids": p} for p in prompts]
    params = [params_for(i) for i in range(len(prompts))]
    outs = chained.generate(requests, params)
    assert [o.outputs[0].token_ids for o in outs] == reference(chained, prompts)
    one.generate(requests, params)
    # Rows near max_tokens chain fewer steps (their own reserved slots), never past it.
    assert 3 in chains and 2 in chains
    def decode_programs(llm):  # (rows x 1 token, rows x blocks)
        return {k for k in llm.engine.groups[0].runner._shapes_seen if k[0][1:] == (1,)}

    assert decode_programs(chained) and decode_programs(chained) <= decode_programs(one)
    assert_pools_whole(chained.engine)


def test_a_pool_short_of_the_reserved_slots_preempts_and_ends_as_the_reference():
    """16 blocks of 16 tokens for 8 sequences of up to ~100 tokens, each reserving 7 slots
    ahead: sequences are preempted and recomputed; every output equals the reference."""
    llm = engine(False, num_scheduler_steps=8, kv_cache_bytes=1)
    group = llm.engine.groups[0]
    assert group.scheduler.num_lookahead_tokens == 7
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, llm.cfg.vocab_size, int(n)).tolist()
               for n in rng.integers(20, 60, 8)]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    want = engine(False).generate([{"prompt_token_ids": p} for p in prompts], params)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in want]
    assert group.scheduler.num_preemptions > 0
    assert_pools_whole(llm.engine)


def test_async_scheduling_takes_one_step_a_launch():
    llm = engine(True, num_scheduler_steps=4)
    group = llm.engine.groups[0]
    assert group.overlap and group.runner.num_scheduler_steps == 1
    assert group.scheduler.num_lookahead_tokens == 0


@pytest.mark.parametrize("bad", [0, -2, 65, 2.5, True, "4"])
def test_bad_num_scheduler_steps_is_refused_by_name(bad):
    with pytest.raises(ConfigError, match="num_scheduler_steps"):
        LLM(str(GOLDEN / "llama"), num_scheduler_steps=bad)


def test_the_command_line_sets_it():
    parser = argparse.ArgumentParser()
    add_engine_options(parser)
    assert parser.parse_args([]).num_scheduler_steps == 1
    assert parser.parse_args(["--num-scheduler-steps", "8"]).num_scheduler_steps == 8
    with pytest.raises(SystemExit):
        parser.parse_args(["--num-scheduler-steps", "0"])
