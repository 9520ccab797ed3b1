"""Expert-parallel decode (a ``decode`` role with ``ep: N``, ``serving.disagg.ep_decode``):
colocated and PD, DeepSeek-V3 (MLA, grouped sigmoid routing, shared experts) and Qwen3-MoE,
greedy tokens of concurrent requests identical to each request alone on one device; every
decode device holds only its share of the expert slots; EPLB rebalances and INT8 dispatch
work there; a dense model keeps plain DP groups."""

import jax
import pytest

from collectives.a2e import A2E
from serving.disagg.ma import MAPool
from serving.entrypoints.metrics import EngineCollector
from tests.collectives.cases import need_devices
from tests.helpers import GOLDEN
from tests.serving.test_disaggregation import layout, run_and_compare
from xds_jax import LLM, SamplingParams
from xds_jax.errors import ConfigError

CPU8_PD_EP = "configs/deployments/cpu8-pd-ep.yaml"
EVERY_2 = {"window_size": 1, "step_interval": 2}  # a rebalance every other step


def ep_pool(llm) -> MAPool:
    (pool,) = [d for d in llm.engine.drivers if isinstance(d, MAPool)]
    return pool


def assert_slots_on_own_devices(pool: MAPool, devices: list) -> None:
    """One domain whose ranks are ``devices``; every MoE layer's slot weights split over the
    same devices, each holding ``slots_per_device`` slots (not every expert)."""
    (domain,) = pool.domains
    assert domain.devices == devices and len(pool.groups) == len(devices)
    routed = pool.parts[0].routed
    assert isinstance(routed, A2E) and routed.mode == "colocated"
    emap = pool.expert_map
    for weights in routed.weights.values():
        for w in weights.values():
            assert {s.device for s in w.addressable_shards} == set(devices)
            assert {s.data.shape[0] for s in w.addressable_shards} == {emap.slots_per_device}


def test_colocated_ep_decode_mla_moe_matches_reference(tmp_path):
    """Decode only: 4 DP ranks, DeepSeek-V3's routed experts over them."""
    need_devices(8)
    dep = layout(tmp_path, "ep4", decode=(0, 4, {"ep": 4}))
    llm = run_and_compare(str(GOLDEN / "deepseek_v3"), dep, count=6, max_tokens=4,
                          staged=True)
    pool = ep_pool(llm)
    assert_slots_on_own_devices(pool, jax.devices()[:4])
    assert pool.layout.describe()["a2e_mode"] == "colocated"


@pytest.mark.parametrize("name", ["olmoe", "granitemoeshared", "glm4_moe"])
def test_shipped_cpu8_pd_ep_newer_moe_families_match_reference(name):
    """OLMoE (whole-projection q/k norms, top-k without renormalising), Granite MoE Shared
    (fused expert weights, an ungated shared MLP, multipliers folded in) and GLM-4.5
    (DeepSeek's router and shared expert behind GQA with biases, q/k norms and half-width
    RoPE) through the shipped cpu8-pd-ep: TP=2 prefill, KV pulled into EP decode ranks."""
    need_devices(8)
    llm = run_and_compare(str(GOLDEN / name), CPU8_PD_EP, count=6, max_tokens=4, staged=True)
    assert llm.engine.stats()["kv_transfers"] > 0
    assert_slots_on_own_devices(ep_pool(llm), jax.devices()[4:8])


def test_shipped_cpu8_pd_ep_mla_moe_matches_reference():
    """The shipped cpu8-pd-ep: DeepSeek-V3's KV (MLA latents) pulled from TP=2 prefill groups
    into EP decode ranks, 2 of the 8 expert slots on each."""
    need_devices(8)
    llm = run_and_compare(str(GOLDEN / "deepseek_v3"), CPU8_PD_EP, count=6, max_tokens=4,
                          staged=True)
    assert llm.engine.stats()["kv_transfers"] > 0
    assert_slots_on_own_devices(ep_pool(llm), jax.devices()[4:8])


def test_pd_ep_decode_rebalances_and_keeps_tokens(tmp_path):
    """PD with EP decode, Qwen3-MoE, 4 redundant slots and a rebalance every other step."""
    need_devices(8)
    dep = layout(tmp_path, "pdep", prefill=(0, 4, {"dp": 2, "tp": 2}),
                 decode=(4, 4, {"ep": 4, "redundant_slots": 4}))
    llm = run_and_compare(str(GOLDEN / "qwen3_moe"), dep, count=8, max_tokens=5,
                          enable_eplb=True, eplb_config=EVERY_2)
    stats = llm.engine.stats()
    assert stats["kv_transfers"] > 0 and stats["eplb_rebalances"] > 0
    # the last window counted on both sides: what the attention ranks routed per expert is
    # what the expert ranks received
    by_expert, by_device = stats["expert_load"], stats["expert_device_load"]
    assert sorted(by_device) == sorted(by_expert) and by_expert
    for layer, counts in by_expert.items():
        assert len(by_device[layer]) == 4 and sum(by_device[layer]) == sum(counts) > 0
    families = {f.name: f for f in EngineCollector(llm.engine, "m").collect()}
    samples = families["xds:expert_device_load"].samples
    assert len(samples) == 4 * len(by_device)
    assert sum(s.value for s in samples) == sum(map(sum, by_device.values()))
    pool = ep_pool(llm)
    assert_slots_on_own_devices(pool, jax.devices()[4:8])
    assert all(m.num_redundant == 4 for m in pool.rebalancer.maps.values())


def test_shipped_cpu8_pd_ep_int8_dispatch(tmp_path):
    """The shipped cpu8-pd-ep with INT8 dispatch payloads: the rows of the dispatch travel as
    INT8; where no dispatch runs (cpu8-pd, a dense model) the option is refused."""
    need_devices(8)
    llm = LLM(str(GOLDEN / "qwen3_moe"), dtype="float32", deployment=CPU8_PD_EP,
              max_num_seqs=4, use_param_cache=False, dispatch_dtype="int8")
    routed = ep_pool(llm).parts[0].routed
    assert routed.int8 and routed.moe.int8_dispatch and not routed.int8_hop
    out = llm.generate([{"prompt_token_ids": [3, 4, 5]}],
                       SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 3
    for model, dep in (("qwen3_moe", "configs/deployments/cpu8-pd.yaml"), ("llama", CPU8_PD_EP)):
        with pytest.raises(ConfigError, match="runs no expert dispatch"):
            LLM(str(GOLDEN / model), deployment=dep, dispatch_dtype="int8",
                use_param_cache=False)
        with pytest.raises(ConfigError, match="micro_batches 3: .* runs no MA or EP decode"):
            LLM(str(GOLDEN / model), deployment=dep, micro_batches=3, use_param_cache=False)
    with pytest.raises(ConfigError, match="micro_batches 3: a layout without a deployment"):
        LLM(str(GOLDEN / "llama"), micro_batches=3, use_param_cache=False)


def test_dense_model_on_ep_decode_keeps_dp_groups():
    """A dense model has no routed experts: its EP decode devices are plain DP groups."""
    need_devices(8)
    llm = run_and_compare(str(GOLDEN / "llama"), CPU8_PD_EP, count=4, max_tokens=3)
    assert not any(isinstance(d, MAPool) for d in llm.engine.drivers)
