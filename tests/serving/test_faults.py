"""Fault injection and recovery: every fault a layout can recover from loses nothing.

Each recovery test runs a workload with the fault injected and checks that the greedy tokens
equal the single-device reference's, that every caller's stream only ever grows (no token or
character repeated, dropped or changed, one final output), and that afterwards every KV pool
is whole again (free blocks equal its size). The tiny golden Llama gets a byte tokenizer so
the streamed text is real.
"""

from __future__ import annotations

import dataclasses
import itertools
import time

import numpy as np
import pytest

from serving.core.engine import group_config_for
from serving.core.faults import (
    UnsupportedFaultError,
    parse_fault,
)
from serving.core.request import Request
from serving.disagg.deploy import build_deployed_engine
from tests.helpers import GOLDEN, tiny
from tests.serving.test_engine import params_for, reference, workload
from xds_jax import LLM
from xds_jax.engine_config import EngineConfig
from xds_jax.sequence import Sequence
from xds_jax.text.byte_tokenizer import byte_tokenizer

PD8 = "configs/deployments/cpu8-pd.yaml"


# -- running workloads ------------------------------------------------------------------------
@dataclasses.dataclass
class Stream:
    """What one caller saw: every cumulative output, in order."""

    outputs: list = dataclasses.field(default_factory=list)

    def __call__(self, out) -> None:
        self.outputs.append(out)

    def check(self) -> list[int]:
        """The stream only grows and ends once; returns the final tokens."""
        assert self.outputs and self.outputs[-1].finished
        assert sum(o.finished for o in self.outputs) == 1
        assert self.outputs[-1].error is None
        for before, after in itertools.pairwise(self.outputs):
            a, b = before.outputs[0], after.outputs[0]
            assert b.token_ids[:len(a.token_ids)] == a.token_ids
            assert b.text.startswith(a.text)
        return self.outputs[-1].outputs[0].token_ids


def requests_for(prompts: list[list[int]], tokenizer) -> tuple[list[Request], list[Stream]]:
    requests, streams = [], []
    for i, prompt in enumerate(prompts):
        stream = Stream()
        params = params_for(i)
        seq = Sequence(prompt, params, tokenizer=tokenizer)
        requests.append(Request(f"r{i}", None, prompt, params, [seq], on_output=stream))
        streams.append(stream)
    return requests, streams


def assert_pools_whole(engine) -> None:
    for g in engine.groups:
        assert g.blocks.num_free_blocks == g.config.num_blocks, f"{g.role} group {g.index}"
        assert not g.requests and g.scheduler.num_running == g.scheduler.num_waiting == 0
    assert all(not getattr(g, "held_blocks", 0) for g in engine.groups)


def run_inline(engine, model, prompts: list[list[int]]) -> list[list[int]]:
    """Run the workload with streams; check them; return the final tokens."""
    requests, streams = requests_for(prompts, byte_tokenizer(model.cfg))
    engine.run_until_done(requests)
    return [s.check() for s in streams]


def colocated(*faults: str, **options) -> LLM:
    """4 colocated DP groups on the 8-device process."""
    return LLM(str(GOLDEN / "llama"), dtype="float32", num_dp_groups=4, max_num_seqs=8,
               max_num_batched_tokens=48, staged=True, use_param_cache=False,
               faults=list(faults), **options)


def test_a_colocated_group_that_dies_loses_nothing():
    llm = colocated("group_crash:group=1:after_steps=3")
    prompts = workload(llm.cfg.vocab_size, 24, seed=1)
    assert run_inline(llm.engine, llm, prompts) == reference(llm, prompts)
    engine = llm.engine
    stats = engine.stats()
    assert stats["faults_injected"] == 1 and stats["scale_downs"] == 1
    assert stats["requests_recovered"] >= 1 and stats["rollbacks"] >= 1
    assert stats["healthy_groups"] == 3 and not engine.groups[1].healthy
    assert engine.groups[1].steps == 3
    assert [r.group for r in engine.recoveries] == [1]
    assert_pools_whole(engine)
    steps = engine.groups[1].steps  # the balancer keeps new work off the dead group
    more = workload(llm.cfg.vocab_size, 8, seed=2)
    assert run_inline(engine, llm, more) == reference(llm, more)
    assert engine.groups[1].steps == steps and all(g.steps > 3 for g in engine.groups[::2])
    assert_pools_whole(engine)


def test_when_no_group_is_left_requests_end_with_an_error_not_a_hang():
    from serving.core.balancer import NoHealthyGroupError

    llm = LLM(str(GOLDEN / "llama"), dtype="float32", max_num_seqs=8, staged=True,
              use_param_cache=False, faults=["group_crash:group=0:after_steps=1"])
    requests, streams = requests_for([[5, 6, 7], [8, 9]], byte_tokenizer(llm.cfg))
    llm.engine.run_until_done(requests)
    for stream in streams:
        last = stream.outputs[-1]
        assert last.finished and "NoHealthyGroupError" in last.error
        assert isinstance(last.failure, NoHealthyGroupError)
        assert last.outputs[0].finish_reason == "abort"
    with pytest.raises(NoHealthyGroupError):
        llm.engine.submit(requests_for([[1, 2]], None)[0][0])
    assert_pools_whole(llm.engine)


def pd_engine(*faults: str, decode_blocks: int | None = None, prefill_blocks: int | None = None):
    """cpu8-pd (2 TP=2 prefill groups, 4 decode groups); small decode pools make prefilled
    sequences wait for room, so offers are still unpulled when a group dies."""
    model = tiny("llama")
    options = EngineConfig(deployment=PD8, max_num_seqs=8, max_num_batched_tokens=48,
                           staged=True, faults=faults)
    config = group_config_for(model.params, model.cfg, 256, options)
    decode = dataclasses.replace(config, num_blocks=decode_blocks or config.num_blocks)
    prefill = dataclasses.replace(config, num_blocks=prefill_blocks or config.num_blocks)
    engine = build_deployed_engine(model.params, model.cfg, 256, options,
                                   decode_config=decode, prefill_config=prefill)
    return model, engine


@pytest.mark.parametrize("decode_blocks, after_steps", [(None, 2), (8, 3)])
def test_a_decode_group_that_dies_is_prefilled_again_and_pulled_elsewhere(decode_blocks,
                                                                         after_steps):
    model, engine = pd_engine(f"group_crash:role=decode:group=0:after_steps={after_steps}",
                              decode_blocks=decode_blocks)
    prompts = workload(model.cfg.vocab_size, 16, seed=3)
    assert run_inline(engine, model, prompts) == reference(model, prompts)
    stats = engine.stats()
    dead = engine.router.decode[0]
    assert not dead.healthy and stats["healthy_groups"] == 5
    assert stats["faults_injected"] == stats["scale_downs"] == 1
    assert stats["requests_recovered"] >= 1
    prefill_tokens = sum(g.generated_tokens for g in engine.entry)
    assert prefill_tokens > len(prompts)  # each re-prefill samples the next token there
    if decode_blocks:  # arrivals were waiting in the dead group: their offers cancelled
        assert stats["kv_offers_cancelled"] > 0
    assert_pools_whole(engine)


@pytest.mark.parametrize("decode_blocks, after_steps", [(None, 1), (8, 6)])
def test_a_prefill_group_that_dies_has_its_prompts_prefilled_elsewhere(decode_blocks,
                                                                       after_steps):
    model, engine = pd_engine(f"group_crash:role=prefill:group=0:after_steps={after_steps}",
                              decode_blocks=decode_blocks)
    prompts = workload(model.cfg.vocab_size, 16, seed=5)
    assert run_inline(engine, model, prompts) == reference(model, prompts)
    stats = engine.stats()
    assert not engine.entry[0].healthy and engine.entry[1].healthy
    assert stats["faults_injected"] == stats["scale_downs"] == 1
    assert stats["requests_recovered"] >= 1
    if decode_blocks:  # its offers no decode group had pulled yet: withdrawn, prefilled again
        assert stats["kv_offers_cancelled"] > 0
    assert_pools_whole(engine)


@pytest.mark.parametrize("spec, retries, reprefills", [
    ("kv_transfer_fail:times=1:group=0", 1, 0),  # the retry succeeds
    ("kv_transfer_fail:times=2:group=0", 1, 1),  # the retry fails too: prefilled again
    ("kv_transfer_fail:times=3", None, None),  # whichever pulls come next
])
def test_failed_kv_transfers_are_retried_then_prefilled_again(spec, retries, reprefills):
    model, engine = pd_engine(spec)
    prompts = workload(model.cfg.vocab_size, 12, seed=7)
    assert run_inline(engine, model, prompts) == reference(model, prompts)
    stats = engine.stats()
    failures = stats["faults_injected"]
    assert failures == parse_fault(spec).times
    assert stats["kv_transfer_retries"] + stats["kv_reprefills"] == failures  # 1 retry each
    if retries is not None:
        assert (stats["kv_transfer_retries"], stats["kv_reprefills"]) == (retries, reprefills)
    assert stats["requests_recovered"] == stats["kv_reprefills"]
    assert stats["healthy_groups"] == 6
    assert stats["kv_transfers"] == len(prompts)  # each pulled once, in the end
    assert_pools_whole(engine)


@pytest.mark.parametrize("spec, retries, reprefills", [
    ("kv_transfer_fail:times=1:after_chunks=1", 1, 0),  # the retry pulls it whole
    ("kv_transfer_fail:times=2:group=0:after_chunks=2", 1, 1),  # the retry fails too
])
def test_a_kv_pull_failing_after_some_chunks_frees_them_retries_then_prefills_again(
        spec, retries, reprefills):
    """Prompts of 130-200 tokens pull 3-4 chunks of 4 blocks: the pull fails once
    ``after_chunks`` landed; the blocks they were written into are freed, and the offer is
    pulled again from its first chunk, or cancelled and prefilled again."""
    model, engine = pd_engine(spec)
    rng = np.random.default_rng(11)
    prompts = [rng.integers(0, model.cfg.vocab_size, n).tolist()
               for n in (150, 140, 200, 131, 170, 135)]
    assert run_inline(engine, model, prompts) == reference(model, prompts)
    stats = engine.stats()
    assert stats["faults_injected"] == parse_fault(spec).times
    assert (stats["kv_transfer_retries"], stats["kv_reprefills"]) == (retries, reprefills)
    assert stats["kv_transfers"] == len(prompts)
    assert_pools_whole(engine)


def run_threaded(engine, fault: str, requests: list[Request], settled) -> None:
    """Start the engine's threads (the server's engine), arm ``fault``, submit ``requests``
    and wait until ``settled()``; shut down."""
    engine.start()
    try:
        engine.faults.add(fault)
        for r in requests:
            engine.submit(r)
        deadline = time.monotonic() + 300
        while not settled():
            assert time.monotonic() < deadline, engine.stats()
            time.sleep(0.05)
    finally:
        engine.shutdown()


def test_a_group_that_dies_in_a_started_engine_loses_nothing():
    """Threaded: the group's loop thread ends; its requests finish on the other groups."""
    llm = colocated()
    prompts = workload(llm.cfg.vocab_size, 16, seed=8)
    want = reference(llm, prompts)
    assert run_inline(llm.engine, llm, prompts) == want  # warm-up
    requests, streams = requests_for(prompts, byte_tokenizer(llm.cfg))
    run_threaded(llm.engine, "group_crash:group=2:after_steps=2", requests,
                 lambda: all(r.finished for r in requests))
    assert [s.check() for s in streams] == want
    stats = llm.engine.stats()
    assert stats["scale_downs"] == 1 and stats["healthy_groups"] == 3
    assert stats["requests_recovered"] >= 1 and stats["rejoins"] == 0
    assert_pools_whole(llm.engine)


@pytest.mark.parametrize("layout, role", [(None, "decode"), (PD8, "decode"), (PD8, "prefill")])
def test_a_stalled_group_is_detected_fenced_and_its_work_moved(layout, role):
    """Threaded (the server's engine): a group blocks inside a step; the heartbeat monitor
    takes it out within the timeout plus a check interval, its requests finish elsewhere
    (PD: prefilled again), the late step is dropped (no token twice), and once it beats
    again it rejoins, empty."""
    timeout, stall = 2.0, 6.0
    options = dict(deployment=layout) if layout else dict(num_dp_groups=4)
    llm = LLM(str(GOLDEN / "llama"), dtype="float32", max_num_seqs=8,
              max_num_batched_tokens=48, staged=True, use_param_cache=False,
              heartbeat_timeout_s=timeout, **options)
    engine = llm.engine
    target = next(g for g in engine.groups if g.role == role)
    prompts = workload(llm.cfg.vocab_size, 16, seed=4)
    want = reference(llm, prompts)
    assert run_inline(engine, llm, prompts) == want  # warm-up: the shapes compile here
    requests, streams = requests_for(prompts, byte_tokenizer(llm.cfg))

    def settled() -> bool:  # all done, the stall over, every group back in service
        return (all(r.finished for r in requests) and bool(engine.faults.fired)
                and time.monotonic() > engine.faults.fired[0][0] + stall + 0.5
                and engine.stats()["healthy_groups"] == len(engine.groups))

    fault = f"group_stall:role={role}:group=0:seconds={stall}:after_steps=2"
    run_threaded(engine, fault, requests, settled)
    assert [s.check() for s in streams] == want
    stalled_at = engine.faults.fired[0][0]
    detected = next(r for r in engine.recoveries if r.group == target.index)
    assert "no heartbeat" in detected.reason
    assert detected.time - stalled_at < timeout * 1.25 + 1.0
    assert target.rollbacks == 1  # the late step, dropped
    stats = engine.stats()
    assert stats["faults_injected"] == 1 and stats["requests_recovered"] >= 1
    assert stats["rejoins"] >= 1
    assert_pools_whole(engine)


def test_pd_plus_ma_recovers_a_prefill_group_and_refuses_ma_faults(tmp_path):
    """2 prefill groups feeding MA attention (2 domains of 1 rank, 4 expert devices): a
    prefill group that dies recovers as in PD; stalls of the MA groups, and losing an expert
rank without spare slots, are refused."""
    from tests.serving.test_disaggregation import ma

    deployment = ma(tmp_path, domains=2, dp=1, experts=4, prefill=(2, 1))
    llm = LLM(str(GOLDEN / "deepseek_v3"), dtype="float32", deployment=deployment,
              max_num_seqs=8, max_num_batched_tokens=48, staged=True, use_param_cache=False,
              faults=["group_crash:role=prefill:group=0:after_steps=1"])
    prompts = workload(llm.cfg.vocab_size, 8, seed=6)
    assert run_inline(llm.engine, llm, prompts) == reference(llm, prompts)
    stats = llm.engine.stats()
    assert stats["scale_downs"] == 1 and stats["requests_recovered"] >= 1
    assert_pools_whole(llm.engine)
    with pytest.raises(UnsupportedFaultError, match="not supported yet"):
        llm.engine.faults.add("group_stall:role=decode:group=0:seconds=1")
    with pytest.raises(UnsupportedFaultError, match="no replica"):  # 4 x 2 slots, none spare
        llm.engine.faults.add("expert_rank_down:rank=1:after_steps=2")


def test_xds_serve_arms_faults_after_its_warm_up_request():
    """The warm-up must not set a fault off nor count toward its after_steps: a crash of the
    only group "at once" would keep the server from starting (it did)."""
    from serving.entrypoints.cli_args import build_parser
    from serving.entrypoints.launch import load_engine
    from tests.helpers import GOLDEN

    # --precompile-seconds 0: compiling the buckets ahead runs no step (the faults are armed
    # after it either way) and is not what this checks (tests/serving/test_precompile.py)
    args = build_parser().parse_args([
        "serve", "--model", str(GOLDEN / "llama"), "--dtype", "float32", "--kv-cache-gib",
        "0.01", "--fault", "group_crash:group=0:after_steps=1", "--precompile-seconds", "0"])
    engine = load_engine(args)
    try:
        stats = engine.engine.stats()
        assert stats["faults_injected"] == 0 and all(g.healthy for g in engine.engine.groups)
        assert [str(spec) for spec in engine.engine.faults.pending] == [
            "group_crash:group=0:after_steps=1"]
    finally:
        engine.shutdown()
