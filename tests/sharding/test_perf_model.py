"""The performance model reproduces xDeepServe's DeepSeek-V3 decode bookkeeping [X §7.1] and
behaves like a roofline should. CPU only: stage FLOPs come from lowering, nothing runs."""

import dataclasses
import json
from pathlib import Path

import pytest

from sharding.deployment import parse_deployment, read_deployment
from sharding.hardware import CLOUDMATRIX384, H100, H200, hardware_preset
from sharding.perf_model import colocated_decode, estimate, ma_decode
from sharding.plan import main
from sharding.stage_costs import attention_cost, experts_cost
from xds_jax.model.config_hf import load_model_config

ROOT = Path(__file__).parents[2]
V3 = ROOT / "configs" / "models" / "deepseek-v3.json"
MS = 1e-3


@pytest.fixture(scope="module")
def cfg():
    return load_model_config(V3)


def dep(name):
    return read_deployment(ROOT / "configs" / "deployments" / f"{name}.yaml")


def ma(cfg, hw=CLOUDMATRIX384, **kw):
    roles = dep("cm768-ma").roles
    return ma_decode(cfg, roles["decode_attention"], roles["decode_experts"], hw, **kw)


def colocated(cfg, hw=CLOUDMATRIX384, **kw):
    return colocated_decode(cfg, dep("cm288-decode").roles["decode"], hw, **kw)


def test_deepseek_v3_config_is_the_published_one(cfg):
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.vocab_size) == (61, 7168, 128,
                                                                                129280)
    assert (cfg.mla.q_lora_rank, cfg.mla.kv_lora_rank, cfg.mla.qk_rope_head_dim,
            cfg.mla.qk_nope_head_dim, cfg.mla.v_head_dim) == (1536, 512, 64, 128, 128)
    moe = cfg.moe
    assert (moe.num_experts, moe.num_experts_per_tok, moe.num_shared_experts,
            moe.moe_intermediate_size, len(moe.moe_layers), cfg.num_mtp_layers) == (
                256, 8, 1, 2048, 58, 1)


def test_cost_analysis_counts_the_stage_math(cfg):
    a = attention_cost(cfg, 48, 2, 3072)
    h, c, r, tokens = 128, 512, 64, 48 * 2
    assert a.core_flops == pytest.approx(2 * tokens * h * (c + r + c) * 3072, rel=0.02)
    assert a.weight_elems == pytest.approx(187.1e6, rel=0.01)
    e = experts_cost(cfg, 1, 480)
    assert e.gemm_flops == pytest.approx(2 * 3 * 7168 * 2048 * 480, rel=0.01)


def test_ma_reproduces_the_papers_iteration_tpot_and_throughput(cfg):
    e = ma(cfg)  # cm768-ma, per-die batch 96, 2 micro-batches, 90 % MTP acceptance
    assert e.dies == 768 and e.chips == 384
    assert e.iteration_s == pytest.approx(93 * MS, rel=0.1)
    assert e.tpot_s == pytest.approx(49 * MS, rel=0.1)
    assert e.tokens_per_s_per_chip == pytest.approx(2400, rel=0.1)


def test_ma_stages_match_the_paper(cfg):
    s = ma(cfg).stages
    # calibrated on these two (hardware.py): the model must still land on them
    assert s["attention"] == pytest.approx(0.7 * MS, rel=0.03)
    assert s["a2e"] == pytest.approx(0.172 * MS, rel=0.03)
    assert s["moe"] == pytest.approx(0.12 * MS, rel=0.1)  # gemm_eff calibrated here
    assert s["e2a"] == pytest.approx(0.193 * MS, rel=0.1)  # predicted
    assert s["tail"] == pytest.approx(0.48 * MS, rel=0.1)
    assert s["moe_layer"] == pytest.approx(2 * 0.7 * MS, rel=0.02)  # attention-bound


def test_colocated_dp288_predicts_the_papers_peak(cfg):
    """Out of sample: no constant was fitted to the colocated run (batch 60, TPOT 50 ms)."""
    e = colocated(cfg)
    assert e.batch_per_die == 60 and e.chips == 144
    assert e.tpot_s == pytest.approx(50 * MS, rel=0.1)
    assert e.tokens_per_s_per_chip == pytest.approx(2400, rel=0.1)


def test_other_hardware_gives_its_own_numbers(cfg):
    cm, h100, h200 = ma(cfg), ma(cfg, H100), ma(cfg, H200)
    # 448 GPUs per domain + experts span 56 nodes: A2E/E2A go over 50 GB/s InfiniBand and the
    # expert pool's E2A stream (3 domains x 2 micro-batches) bounds each layer
    assert h200.iteration_s == pytest.approx(114.9 * MS, rel=0.05)
    assert h200.tokens_per_s_per_chip == pytest.approx(992, rel=0.05)
    assert abs(h200.iteration_s - cm.iteration_s) > 0.1 * cm.iteration_s
    assert h200.stages["moe_layer"] == pytest.approx(6 * h200.stages["e2a"])
    assert h200.stages["attention"] < h100.stages["attention"] < cm.stages["attention"]
    # within one node the H200's HBM shows: 8-GPU colocated decode (H100s could not hold
    # the weights; the model does not check memory)
    node = parse_deployment({"name": "node", "roles": {"decode": {
        "devices": {"start": 0, "count": 8}, "dp": 8}}})
    d100 = colocated_decode(cfg, node.roles["decode"], H100)
    d200 = colocated_decode(cfg, node.roles["decode"], H200)
    assert d200.tpot_s == pytest.approx(25.7 * MS, rel=0.05)
    assert d100.tpot_s == pytest.approx(32.0 * MS, rel=0.05)
    assert hardware_preset("h200") is H200
    with pytest.raises(ValueError, match="presets"):
        hardware_preset("tpu")


def test_more_bandwidth_is_never_slower(cfg):
    fast = dataclasses.replace(CLOUDMATRIX384, hbm_bandwidth=2 * CLOUDMATRIX384.hbm_bandwidth,
                               link_bandwidth=2 * CLOUDMATRIX384.link_bandwidth)
    for batch in (8, 60, 96):
        assert ma(cfg, fast, batch_per_die=batch).iteration_s <= ma(
            cfg, batch_per_die=batch).iteration_s
        assert colocated(cfg, fast, batch_per_die=batch).iteration_s <= colocated(
            cfg, batch_per_die=batch).iteration_s


def test_doubling_a_memory_bound_batch_raises_throughput(cfg):
    small, large = colocated(cfg, batch_per_die=4), colocated(cfg, batch_per_die=8)
    assert large.iteration_s < 1.5 * small.iteration_s
    assert large.tokens_per_s_per_chip > 1.3 * small.tokens_per_s_per_chip


def test_mtp_acceptance_divides_the_iteration(cfg):
    e0, e9 = ma(cfg, mtp_acceptance=0.0), ma(cfg, mtp_acceptance=0.9)
    assert e0.iteration_s == e9.iteration_s
    assert e0.tpot_s == pytest.approx(1.9 * e9.tpot_s)


def test_pd_decode_does_not_depend_on_the_prefill_pool(cfg):
    def pd(prefill_dies):
        spec = parse_deployment({"name": "pd", "roles": {
            "prefill": {"devices": {"start": 0, "count": prefill_dies}, "dp": prefill_dies // 4,
                        "tp": 4},
            "decode": {"devices": {"start": prefill_dies, "count": 288}, "dp": 288}}})
        return {e.layout: e for e in estimate(cfg, spec, CLOUDMATRIX384)}

    small, large = pd(32), pd(128)
    assert small["pd-decode"].tpot_s == large["pd-decode"].tpot_s == colocated(cfg).tpot_s
    assert large["pd-prefill"].tpot_s == small["pd-prefill"].tpot_s  # per prompt, per group


def test_plan_perf_cli(cfg, capsys):
    args = ["--model", str(V3), "--deployment", str(ROOT / "configs/deployments/cm768-ma.yaml"),
            "--perf"]
    assert main(args) == 0
    assert "tokens/s/chip" in capsys.readouterr().out
    assert main(args + ["--json", "--hardware", "h200", "--batch-per-die", "64"]) == 0
    (e,) = json.loads(capsys.readouterr().out)
    assert (e["layout"], e["hardware"], e["batch_per_die"]) == ("ma", "h200", 64)
    assert main(args + ["--hardware", "nope"]) == 1
