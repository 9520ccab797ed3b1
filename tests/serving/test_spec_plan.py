"""``xds plan --speculative-config``: the MTP block and its KV pages are counted where the
engine puts them, on every layout (PD groups hold the whole tree and one more layer of pages;
MA attention ranks and EP ranks the first MTP block but its routed experts, which are one
more layer of slots on the expert slice): the plan's bytes per device are the engine's with
speculation on, for a DeepSeek-V3 checkpoint with an MTP layer and for SmolLM2 with its
shipped draft head."""

import jax
import pytest

from sharding.deployment import read_deployment
from sharding.placement import abstract_params
from sharding.plan import main, plan_deployment
from tests.helpers import GOLDEN
from tests.mtp_checkpoint import make_mtp_checkpoint
from tests.serving.test_disaggregation import ma
from tests.serving.test_spec_decode import PD_TP1, spec
from tests.sharding.test_engine_bytes import assert_plan_is_engine
from xds_jax import LLM
from xds_jax.loading.draft_heads import ASSETS
from xds_jax.loading.loader import load_config

SPEC = '{"method": "mtp", "num_speculative_tokens": 2}'


@pytest.fixture(scope="module")
def v3_mtp(tmp_path_factory):
    return str(make_mtp_checkpoint(tmp_path_factory.mktemp("v3_mtp")))


def check(model: str, deployment: str, draft_head=None):
    """The drafting plan's bytes per device are the engine's; returns the plan and the plan
    of the same deployment without drafting."""
    layout = read_deployment(deployment)
    if len(jax.devices()) < layout.num_devices:
        pytest.skip("needs more devices")
    llm = LLM(model, dtype="float32", deployment=deployment, max_model_len=64, max_num_seqs=2,
              use_param_cache=False, speculative_config=spec(2))
    if draft_head is None:  # the plan's default drafting tree is the tree the loader made
        planned = abstract_params(llm.cfg, "float32", with_mtp=True)
        assert jax.tree.leaves(planned) == jax.tree.leaves(jax.eval_shape(lambda: llm.params))
    plan = plan_deployment(llm.cfg, layout, dtype="float32", drafting=True,
                           draft_head=draft_head)
    assert_plan_is_engine(plan, llm)
    return plan, plan_deployment(llm.cfg, layout, dtype="float32")


def assert_mtp_counted(plan, plain, cfg) -> None:
    """Every role that attends has one more layer of KV and more weights."""
    for with_mtp, without in zip(plan.roles, plain.roles, strict=True):
        if with_mtp.role == "decode_experts":
            assert with_mtp.kv_bytes_per_token == 0
            continue
        layers = cfg.num_layers
        assert with_mtp.kv_bytes_per_token * layers == without.kv_bytes_per_token * (layers + 1)
        assert with_mtp.param_bytes > without.param_bytes, with_mtp.role


@pytest.mark.parametrize("deployment", ["cpu8-pd", "cpu8-pd-ep"])
def test_pd_plans_count_the_mtp_layer(v3_mtp, deployment):
    plan, plain = check(v3_mtp, f"configs/deployments/{deployment}.yaml")
    assert_mtp_counted(plan, plain, load_config(v3_mtp))


def test_ma_plan_counts_the_mtp_layer_and_its_expert_slots(v3_mtp, tmp_path):
    """8 devices: 2 domains x 2 ranks, 4 expert devices; the expert devices hold one more
    layer of slots (the MTP block is MoE)."""
    plan, plain = check(v3_mtp, ma(tmp_path, 2, 2, 4, redundant_slots=4))
    experts = [r for r in plan.roles if r.role == "decode_experts"][0]
    before = [r for r in plain.roles if r.role == "decode_experts"][0]
    cfg = load_config(v3_mtp)
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_layers))
    assert experts.param_bytes * moe_layers == before.param_bytes * (moe_layers + 1)


@pytest.mark.mesh16
def test_cpu16_ma_plan_counts_the_mtp_layer(v3_mtp):
    plan, plain = check(v3_mtp, "configs/deployments/cpu16-ma.yaml")
    assert_mtp_counted(plan, plain, load_config(v3_mtp))


def test_smollm2_plan_counts_the_shipped_draft_head(tmp_path):
    """PD (1 prefill group, 2 decode groups): the head (its block, draft vocabulary and head
    rows) on every group, one more layer of pages."""
    layout = tmp_path / "pd.yaml"
    layout.write_text(PD_TP1)
    plan, plain = check("smollm2", str(layout), draft_head=ASSETS / "smollm2")
    assert_mtp_counted(plan, plain, load_config("smollm2"))


def test_cli_plans_drafting_and_refuses_what_the_engine_refuses(v3_mtp, capsys):
    base = ["--model", v3_mtp, "--deployment", "configs/deployments/cpu8-pd.yaml"]
    assert main([*base, "--speculative-config", SPEC]) == 0
    assert "MTP drafting" in capsys.readouterr().out
    assert main([*base, "--speculative-config", '{"method": "eagle"}']) == 1
    assert "speculative_config.method must be 'mtp'" in capsys.readouterr().err
    assert main([*base, "--speculative-config", "{nope"]) == 1
    assert "not valid JSON" in capsys.readouterr().err
    llama = ["--model", str(GOLDEN / "llama"), "--deployment",
             "configs/deployments/cpu8-pd.yaml", "--speculative-config", SPEC]
    assert main(llama) == 1
    assert "no MTP layers" in capsys.readouterr().err
