"""MTP speculative decoding under MA decode: the attention ranks draft (the MTP block's
routed experts on the expert slice), one pipeline pass verifies k + 1 tokens per sequence.
Greedy output equals the reference loop, counters move, KV blocks come back after aborts."""

import pytest

import serving.core.spec_decode as spec_decode
from tests.mtp_checkpoint import make_mimic_checkpoint
from tests.serving.test_disaggregation import ma
from tests.serving.test_spec_decode import (  # noqa: F401 (an autouse fixture)
    PROMPTS,
    abort_mid_speculation,
    assert_same,
    draft_at_every_batch_size,
    mixed_params,
    run,
    spec,
)
from xds_jax import LLM


@pytest.fixture(scope="module")
def mimic_moe(tmp_path_factory):
    return str(make_mimic_checkpoint(tmp_path_factory.mktemp("mimic_moe"), moe=True))


def check_drafted(llm, colocated, k: int) -> None:
    """Drafts moved the counters, and exactly as a colocated group's: the same rows drafted
    (from their first decode step) and the same drafts were accepted."""
    stats, alone = llm.engine.stats(), colocated.engine.stats()
    assert stats["spec_num_drafts"] > 0
    assert 0 < stats["spec_accepted_tokens"] <= stats["spec_draft_tokens"]
    assert len(stats["spec_accepted_per_position"]) == k
    for key in ("spec_num_drafts", "spec_draft_tokens", "spec_accepted_per_position"):
        assert stats[key] == alone[key], key
    assert stats["kv_usage"] == 0


def test_ma_only_greedy_equals_reference(mimic_moe, tmp_path):
    """MA without a prefill role (8 devices): prefill passes on the attention ranks feed the
    MTP block too, so decode drafts from its first step."""
    params = mixed_params()
    _, ref = run(mimic_moe, None, params)
    colocated, _ = run(mimic_moe, 2, params)
    llm, got = run(mimic_moe, 2, params, deployment=ma(tmp_path, domains=1, dp=2, experts=2))
    assert_same(ref, got)
    check_drafted(llm, colocated, 2)



def test_ma_steps_past_the_batch_size_limit_decode_without_drafting(mimic_moe, tmp_path,
                                                                     monkeypatch):
    """``disable_by_batch_size`` holds on MA as on a colocated group, per attention rank: a
    pass where some rank decodes more rows than the limit verifies one token per row (the
    MTP block still covers the positions), later passes draft; a limit of 0 never drafts.
    Output stays the reference's either way."""
    params = mixed_params()
    _, ref = run(mimic_moe, None, params)
    unlimited, _ = run(mimic_moe, 2, params)
    monkeypatch.setattr(spec_decode, "DISABLE_BY_BATCH_SIZE", 2)
    layout = ma(tmp_path, domains=1, dp=2, experts=2)
    llm, got = run(mimic_moe, 2, params, deployment=layout)
    assert_same(ref, got)
    drafts = llm.engine.stats()["spec_num_drafts"]
    assert 0 < drafts < unlimited.engine.stats()["spec_num_drafts"]
    assert llm.engine.stats()["kv_usage"] == 0
    llm = LLM(mimic_moe, dtype="float32", use_param_cache=False, max_num_seqs=8,
              deployment=layout, speculative_config={**spec(2), "disable_by_batch_size": 0})
    assert_same(ref, llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params))
    assert llm.engine.stats()["spec_num_drafts"] == 0

@pytest.mark.mesh16
def test_cpu16_ma_greedy_equals_reference(mimic_moe, k=3):
    """PD (TP=2 prefill groups, sending the MTP pages and hidden) + MA (2 domains of 3
    ranks, a 6-device expert slice)."""
    params = mixed_params()
    _, ref = run(mimic_moe, None, params)
    colocated, _ = run(mimic_moe, k, params)
    llm, got = run(mimic_moe, k, params, deployment="configs/deployments/cpu16-ma.yaml",
                   trace=True)
    assert_same(ref, got)
    check_drafted(llm, colocated, k)
    mtp_layer = llm.cfg.num_layers  # the MTP block's routed experts ran on the expert slice
    assert any(e.role == "expert" and e.layer == mtp_layer for e in llm.engine.timeline.events)


def test_ep_decode_greedy_equals_reference(mimic_moe):
    """Expert-parallel decode (cpu8-pd-ep: TP=2 prefill groups, 4 decode ranks holding a
    quarter of the routed-expert slots each) is an MA pool over the same devices, so it
    drafts the same way: MTP block on each rank, its experts dispatched over the 4."""
    params = mixed_params()
    _, ref = run(mimic_moe, None, params)
    colocated, _ = run(mimic_moe, 2, params)
    llm, got = run(mimic_moe, 2, params, deployment="configs/deployments/cpu8-pd-ep.yaml")
    assert_same(ref, got)
    check_drafted(llm, colocated, 2)


def test_ma_kv_blocks_return_after_aborts_mid_speculation(mimic_moe, tmp_path):
    llm = LLM(mimic_moe, dtype="float32", use_param_cache=False, speculative_config=spec(2),
              max_num_seqs=4, deployment=ma(tmp_path, domains=1, dp=2, experts=2))
    pool = llm.engine.drivers[-1]
    abort_mid_speculation(llm, pool, 40)
    for g in pool.groups:
        assert g.blocks.num_free_blocks == g.blocks.num_blocks
        assert not g.runner.pending
