"""Faults of an MA step on the shipped cpu16-ma (tiny DeepSeek-V3, 8 experts in 6 devices x 2
slots: devices 0, 1, 4, 5 hold the replicated experts 0-3, devices 2 and 3 the only copies of
experts 4-7): an expert rank lost mid-step scales the expert slice down and the step re-runs;
a transient hop error rolls the step back on every rank and re-runs it; one that persists
fails the step's requests and the pool serves on. Greedy tokens always equal the
single-device reference's, and every KV pool is whole afterwards."""

import numpy as np
import pytest

from collectives.expert_map import ExpertMap, ExpertMapError, build_expert_map
from serving.core.engine import Engine
from serving.core.faults import UnsupportedFaultError
from serving.disagg.eplb_config import EplbConfig
from serving.disagg.ma import MAPool
from serving.disagg.ma_layout import MALayout
from serving.disagg.ma_recovery import STEP_RETRIES
from serving.entrypoints.metrics import EngineCollector
from tests.collectives.cases import need_devices
from tests.helpers import tiny
from tests.serving.test_ma import CPU16, GROUP, assert_matches_reference, requests_for


def test_losing_a_device_keeps_every_other_slot_or_names_the_lost_experts():
    emap = build_expert_map(8, 6, 2)  # slots 8-11 replicate experts 0-3
    smaller = emap.without_device(0)
    assert smaller.num_devices == 5 and smaller.slot_expert_P.tolist() == [
        2, 3, 4, 5, 6, 7, 0, 1, 2, 3]
    assert smaller.replica_counts().tolist() == [1, 1, 2, 2, 1, 1, 1, 1]
    with pytest.raises(ExpertMapError, match=r"leave experts \[4, 5\] with no replica"):
        emap.without_device(2)
    with pytest.raises(ExpertMapError, match=r"experts \[0, 1\]"):
        smaller.without_device(3)  # the deployment's device 4: the last copy of 0 and 1
    with pytest.raises(ExpertMapError, match="device 6 does not exist"):
        emap.without_device(6)
    no_spare = ExpertMap(np.arange(8, dtype=np.int32), 4, 2, 8)
    with pytest.raises(ExpertMapError, match="0 redundant slots"):
        no_spare.without_device(1)


def build(faults=(), mode="trampoline", eplb=None):
    need_devices(16)
    m = tiny("deepseek_v3")
    pool = MAPool(m.params, m.cfg, MALayout.load(CPU16, m.cfg, a2e_mode=mode), GROUP,
                  eplb=eplb)
    engine = Engine(None, m.cfg, groups=pool.groups, drivers=[pool], faults=faults)
    return m, pool, engine


def assert_pools_whole(pool) -> None:
    for g in pool.groups:
        assert g.blocks.num_free_blocks == g.config.num_blocks, f"rank {g.index}"


@pytest.mark.mesh16
@pytest.mark.parametrize("mode, eplb", [("trampoline", None),
                                        ("direct", {"window_size": 1, "step_interval": 2})])
def test_expert_rank_down_scales_the_expert_slice_down_mid_step(mode, eplb):
    """With EPLB the rank goes in the first step (before a rebalance could leave it the
    only copy of an expert) and later rebalances place replicas on the 5 devices left."""
    m, pool, engine = build([f"expert_rank_down:rank=0:after_steps={0 if eplb else 2}"],
                            mode, EplbConfig.parse(True, eplb) if eplb else None)
    lost = pool.layout.expert_devices[0]
    domain_programs = [id(d) for d in pool.domains]
    requests = requests_for(m.cfg.vocab_size, 10, seed=4)
    engine.run_until_done(requests)
    assert_matches_reference(m.params, m.cfg, requests)
    stats = engine.stats()
    assert stats["scale_downs"] == stats["rollbacks"] == stats["faults_injected"] == 1
    assert stats["ma_expert_slots"] == 10 and stats["ma_redundant_slots"] == 2
    # the lost device holds no slot of any service and no layer's map names it
    assert lost not in pool.layout.expert_devices and len(pool.layout.expert_devices) == 5
    for part in pool.parts:
        assert lost not in part.routed.run_devices and len(part.routed.expert_devices) == 5
        assert all(lost not in {s.device for s in leaf.addressable_shards}
                   for tree in part.routed.weights.values() for leaf in tree.values())
    assert [id(d) for d in pool.domains] == domain_programs  # attention untouched
    assert_pools_whole(pool)
    families = {f.name: f for f in EngineCollector(engine, "m").collect()}
    assert families["xds:scale_downs"].samples[0].value == 1
    if pool.rebalancer is not None:
        assert stats["eplb_rebalances"] > 0  # rebalanced on the 5 devices left
        assert all(emap.num_devices == 5 and emap.num_redundant == 2
                   for emap in pool.rebalancer.maps.values())
        return

    # what the slice can no longer lose is refused, naming why
    for spec, match in (("expert_rank_down:rank=4", r"experts \[0, 1\] with no replica"),
                        ("expert_rank_down:rank=0", "out of service already"),
                        ("expert_rank_down:rank=6", "rank 6 does not exist")):
        with pytest.raises(UnsupportedFaultError, match=match):
            engine.faults.add(spec)
    engine.faults.add("expert_rank_down:rank=5")  # experts 2, 3 still on device 1
    more = requests_for(m.cfg.vocab_size, 4, seed=5)
    engine.run_until_done(more)
    assert_matches_reference(m.params, m.cfg, more)
    assert engine.stats()["scale_downs"] == 2 and len(pool.layout.expert_devices) == 4


@pytest.mark.mesh16
def test_expert_rank_down_without_a_replica_is_refused_when_armed():
    _, pool, engine = build()
    with pytest.raises(UnsupportedFaultError, match=r"device 2 would leave experts \[4, 5\]"):
        engine.faults.add("expert_rank_down:rank=2")
    assert engine.faults.injected == 0 and len(pool.layout.expert_devices) == 6


@pytest.mark.mesh16
def test_collective_error_rolls_the_step_back_on_every_rank_and_reruns_it():
    m, pool, engine = build([f"collective_error:after_steps=1:times={STEP_RETRIES}"])
    requests = requests_for(m.cfg.vocab_size, 10, seed=6)
    engine.run_until_done(requests)
    assert_matches_reference(m.params, m.cfg, requests)
    stats = engine.stats()
    assert stats["rollbacks"] == stats["faults_injected"] == STEP_RETRIES
    assert stats["scale_downs"] == 0
    assert_pools_whole(pool)


@pytest.mark.mesh16
def test_collective_error_beyond_the_retries_fails_the_steps_requests_not_the_pool():
    m, pool, engine = build([f"collective_error:after_steps=1:times={STEP_RETRIES + 1}"])
    requests = requests_for(m.cfg.vocab_size, 6, seed=7)
    engine.run_until_done(requests)
    failed = [r for r in requests if r.error is not None]
    assert failed and all(f"failed {STEP_RETRIES + 1} times in a row" in r.error
                          and "collective_error" in r.error for r in failed)
    served = [r for r in requests if r.error is None]
    assert_matches_reference(m.params, m.cfg, served)
    assert engine.stats()["rollbacks"] == STEP_RETRIES + 1
    assert all(g.healthy for g in pool.groups)
    after = requests_for(m.cfg.vocab_size, 3, seed=8)
    engine.run_until_done(after)
    assert_matches_reference(m.params, m.cfg, after)
    assert_pools_whole(pool)


@pytest.mark.mesh16
def test_pd_plus_ma_through_llm_recovers_both_hop_faults():
    """The user's path: ``LLM(..., deployment=cpu16-ma, faults=[...])`` (prefill groups in
    front of the MA slices) with an expert rank lost and a collective error; the tokens are
    the reference's."""
    from tests.helpers import GOLDEN
    from tests.serving.test_disaggregation import run_and_compare

    need_devices(16)
    llm = run_and_compare(str(GOLDEN / "deepseek_v3"), CPU16, count=8, max_tokens=6,
                          faults=["expert_rank_down:rank=5:after_steps=2",
                                  "collective_error:after_steps=4"])
    stats = llm.engine.stats()
    assert (stats["faults_injected"], stats["scale_downs"], stats["rollbacks"]) == (2, 1, 2)
    assert stats["ma_expert_slots"] == 10 and stats["healthy_groups"] == stats["num_groups"]


def test_collective_error_mid_speculation_rolls_back_the_drafting_state(tmp_path_factory,
                                                                        tmp_path):
    """MA with MTP drafting (8 devices: 1 domain x 2 ranks, 2 expert devices; the MTP block's
    experts on the slice too), ``LLM(faults=...)``: hop errors after drafts were made roll
    the step back; every rank's pending hiddens stay those of the sequence's last accepted
    positions after each step, greedy output equals the reference, every block comes back."""
    from serving.core.request import Request
    from tests.mtp_checkpoint import make_mimic_checkpoint
    from tests.serving.test_disaggregation import ma
    from tests.serving.test_spec_decode import PROMPTS, mixed_params, run, spec
    from xds_jax import LLM

    need_devices(8)
    model = str(make_mimic_checkpoint(tmp_path_factory.mktemp("mimic_moe"), moe=True))
    params = mixed_params()
    _, ref = run(model, None, params)
    llm = LLM(model, dtype="float32", use_param_cache=False, max_num_seqs=8,
              speculative_config={**spec(2), "disable_by_batch_size": 8},  # draft every step
              deployment=ma(tmp_path, domains=1, dp=2, experts=2),
              faults=[f"collective_error:after_steps=4:times={STEP_RETRIES}"])
    engine, pool = llm.engine, llm.engine.drivers[-1]
    requests = [Request(f"r{i}", None, p, sp, llm.make_sequences(p, sp))
                for i, (p, sp) in enumerate(zip(PROMPTS, params, strict=True))]
    for r in requests:
        engine.submit(r)
    drafted_before_fault = None
    while pool.step():
        stats = engine.stats()
        if stats["rollbacks"] and drafted_before_fault is None:
            drafted_before_fault = stats["spec_num_drafts"]
        for g in pool.groups:
            for p in g.runner.spec.pending.values():
                if not p.seq.finished:  # the next token of the last pending hidden is the last
                    assert p.first + len(p.hidden) == p.seq.num_tokens - 1
    stats = engine.stats()
    assert stats["rollbacks"] == stats["faults_injected"] == STEP_RETRIES
    assert drafted_before_fault and stats["spec_num_drafts"] > drafted_before_fault
    for r, expected in zip(requests, ref, strict=True):
        assert [s.output_ids for s in r.seqs] == [o.token_ids for o in expected.outputs]
        assert [s.finish_reason for s in r.seqs] == [o.finish_reason for o in expected.outputs]
    assert_pools_whole(pool)
    assert all(not g.runner.spec.pending for g in pool.groups)
