"""`xds plan`: per-role bytes and limits for the shipped deployments."""

import json
from pathlib import Path

import pytest

from sharding.deployment import read_deployment
from sharding.plan import format_plan, main, param_groups, plan_deployment
from xds_jax.model.config_hf import load_model_config

ROOT = Path(__file__).parents[2]
TINY_V3 = ROOT / "configs" / "models" / "deepseek-v3-tiny.json"


def dep(name):
    return read_deployment(ROOT / "configs" / "deployments" / f"{name}.yaml")


def test_single_device_holds_every_parameter():
    cfg = load_model_config(TINY_V3)
    g = param_groups(cfg)
    total = (g["attention"] + g["dense_mlp"] + g["vocab"] + g["replicated"]
             + g["shared_experts"] + cfg.moe.num_experts * g["expert"])
    (role,) = plan_deployment(cfg, dep("single")).roles
    assert role.param_bytes == 2 * total
    assert role.kv_bytes_per_token == cfg.kv_bytes_per_token(2)
    assert role.max_context == cfg.max_position_embeddings and role.max_batch > 0


def test_more_devices_mean_fewer_bytes_each_and_a_bigger_batch():
    cfg = load_model_config(TINY_V3)
    single = plan_deployment(cfg, dep("single"), memory_gib=1).roles[0]
    pd = {r.role: r for r in plan_deployment(cfg, dep("cpu8-pd"), memory_gib=1).roles}
    assert pd["decode"].param_bytes < single.param_bytes
    assert pd["decode"].max_batch >= single.max_batch
    assert pd["prefill"].mesh == {"dp": 2, "tp": 2}


def test_ma_layout_splits_experts_from_attention():
    cfg = load_model_config(TINY_V3)
    roles = {r.role: r for r in plan_deployment(cfg, dep("cm768-ma")).roles}
    g = param_groups(cfg)
    assert roles["decode_experts"].param_bytes == 2 * max(g["expert"], g["shared_experts"])
    assert roles["decode_experts"].kv_bytes_per_token == 0
    assert roles["decode_experts"].dispatch_bytes > 0
    assert roles["decode_attention"].mesh == {"domain": 3, "dp": 160}


def test_tiny_memory_leaves_no_batch():
    cfg = load_model_config(TINY_V3)
    (role,) = plan_deployment(cfg, dep("single"), memory_gib=0.022).roles
    assert role.max_batch == 0 and role.max_context < cfg.max_position_embeddings


def test_format_names_every_role():
    cfg = load_model_config(TINY_V3)
    text = format_plan(plan_deployment(cfg, dep("cm384"), model_name="tiny"))
    for word in ("prefill", "decode_attention", "decode_experts", "dp=24 x tp=4", "ep=96",
                 "288 for 256 experts", "max batch"):
        assert word in text


@pytest.mark.parametrize("name", ["single", "cpu8-pd", "cpu16-ma", "cm384", "cm768-ma"])
def test_cli_prints_a_plan_for_every_shipped_deployment(name, capsys):
    args = ["--model", str(TINY_V3), "--deployment",
            str(ROOT / "configs" / "deployments" / f"{name}.yaml")]
    assert main(args) == 0
    assert name in capsys.readouterr().out
    assert main(args + ["--json"]) == 0
    assert json.loads(capsys.readouterr().out)["deployment"] == name


def test_cli_reports_errors_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nroles:\n  prefill: {devices: {start: 0, count: 3}, dp: 1, tp: 3}\n"
                   "  decode: {devices: {start: 3, count: 1}, dp: 1}\n")
    assert main(["--model", str(TINY_V3), "--deployment", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "tp = 3" in err
    assert main(["--model", str(tmp_path / "none.json"), "--deployment", str(bad)]) == 2
