"""Deployment YAML parsing, validation errors, role meshes and partition rules."""

from pathlib import Path

import jax
import pytest
import yaml
from jax.sharding import PartitionSpec as P

import sharding
from sharding import (
    DeploymentFieldError,
    DeploymentSyntaxError,
    ExpertSlotsError,
    HeadsNotDivisibleError,
    OverlappingRangesError,
    TooFewDevicesError,
    UnknownRoleError,
    load_deployment,
    parse_deployment,
    read_deployment,
)
from sharding.rules import ShardingRuleError, logical_to_spec, named_sharding
from xds_jax.model.config_hf import load_model_config

DEPLOYMENTS = Path(__file__).parents[2] / "configs" / "deployments"
TINY_V3 = Path(__file__).parents[2] / "configs" / "models" / "deepseek-v3-tiny.json"
SHIPPED = ["single", "cpu8-pd", "cpu8-pd-ep", "cpu16-ma", "cm384", "cm768-ma"]


def base(**roles):
    return {"name": "t", "roles": roles or {
        "prefill": {"devices": {"start": 0, "count": 4}, "dp": 2, "tp": 2},
        "decode": {"devices": {"start": 4, "count": 4}, "dp": 4}}}


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_deployments_validate_with_the_tiny_deepseek(name):
    spec = read_deployment(DEPLOYMENTS / f"{name}.yaml")
    spec.check_model(load_model_config(TINY_V3))
    assert spec.name == name


def test_shipped_sizes_match_the_design():
    cm384 = read_deployment(DEPLOYMENTS / "cm384.yaml")
    assert cm384.num_devices == 384 and cm384.roles["prefill"].tp == 4
    assert cm384.roles["decode_attention"].mesh_shape == (3, 64)
    cm768 = read_deployment(DEPLOYMENTS / "cm768-ma.yaml")
    attn, exp = cm768.roles["decode_attention"], cm768.roles["decode_experts"]
    assert attn.mesh_shape == (3, 160) and exp.devices.count == 288
    assert exp.routed_devices == 256 and exp.shared_devices == 32 and exp.expert_slots() == 256


def test_cpu8_pd_meshes_are_built_from_jax_devices():
    dep = load_deployment(DEPLOYMENTS / "cpu8-pd.yaml", model=load_model_config(TINY_V3))
    devs = jax.devices()
    pre, dec = dep.mesh("prefill"), dep.mesh("decode")
    assert pre.axis_names == ("dp", "tp") and dict(pre.shape) == {"dp": 2, "tp": 2}
    assert list(pre.devices.flat) == devs[:4] and list(dec.devices.flat) == devs[4:]
    with pytest.raises(UnknownRoleError, match="decode_attention"):
        dep.role("decode_attention")


def test_single_device_layout():
    dep = load_deployment(DEPLOYMENTS / "single.yaml")
    assert dep.mesh("decode").devices.size == 1


@pytest.mark.parametrize("raw, error, match", [
    ("roles: [", DeploymentSyntaxError, "not valid YAML"),
    ("- a\n- b", DeploymentSyntaxError, "mapping"),
    ("name: t\nroles: {}\nextra: 1", DeploymentFieldError, "extra"),
])
def test_malformed_yaml(tmp_path, raw, error, match):
    path = tmp_path / "bad.yaml"
    path.write_text(raw)
    with pytest.raises(error, match=match):
        read_deployment(path)


def test_overlapping_ranges():
    raw = base(prefill={"devices": {"start": 0, "count": 4}, "dp": 4},
               decode={"devices": {"start": 3, "count": 2}, "dp": 2})
    with pytest.raises(OverlappingRangesError, match=r"prefill.*overlap.*decode"):
        parse_deployment(raw)


def test_unknown_role_and_unknown_field():
    with pytest.raises(UnknownRoleError, match="'encode'"):
        parse_deployment(base(encode={"devices": {"start": 0, "count": 1}}))
    with pytest.raises(DeploymentFieldError, match=r"roles.decode.*'domains'"):
        parse_deployment(base(decode={"devices": {"start": 0, "count": 1}, "domains": 1}))


def test_expert_parallel_decode_fields():
    """ep spans the role's devices, each a DP rank; expert-slot fields need ep."""
    spec = parse_deployment(base(decode={"devices": {"start": 0, "count": 4}, "ep": 4,
                                         "redundant_slots": 4}))
    role = spec.roles["decode"]
    assert role.expert_parallel and role.dp == 4 and role.expert_slots(8) == 12
    for bad, match in (({"ep": 2}, r"decode.ep = 2: .*must equal devices.count \(4\)"),
                       ({"ep": 4, "dp": 2, "tp": 2}, r"ep must equal .* got tp 2"),
                       ({"slots_per_device": 3}, r"set ep: 4")):
        with pytest.raises(DeploymentFieldError, match=match):
            parse_deployment(base(decode={"devices": {"start": 0, "count": 4}} | bad))
    small = parse_deployment(base(decode={"devices": {"start": 0, "count": 4}, "ep": 4,
                                          "slots_per_device": 1}))
    with pytest.raises(ExpertSlotsError, match=r"roles.decode.slots_per_device: .* fewer"):
        small.check_model(load_model_config(TINY_V3))


@pytest.mark.parametrize("role, match", [
    ({"devices": {"start": 0, "count": 4}, "dp": 3}, r"dp 3 x tp 1 = 3 != devices.count 4"),
    ({"devices": {"start": 0, "count": 4}, "dp": 0}, r"decode.dp must be >= 1"),
    ({"devices": {"start": 0, "count": 4}, "dp": "4"}, r"decode.dp must be an integer"),
    ({"devices": [0, 4], "dp": 4}, r"decode.devices must be \{start: N, count: M\}"),
])
def test_field_errors_name_the_field(role, match):
    with pytest.raises(DeploymentFieldError, match=match):
        parse_deployment(base(decode=role))


def test_role_combinations():
    attn = {"devices": {"start": 0, "count": 4}, "domains": 2, "dp": 2}
    with pytest.raises(DeploymentFieldError, match="needs both"):
        parse_deployment(base(decode_attention=attn))
    with pytest.raises(DeploymentFieldError, match="cannot be combined"):
        parse_deployment(base(decode={"devices": {"start": 8, "count": 1}, "dp": 1},
                              decode_attention=attn,
                              decode_experts={"devices": {"start": 4, "count": 4}}))
    with pytest.raises(DeploymentFieldError, match="needs decode"):
        parse_deployment(base(prefill={"devices": {"start": 0, "count": 1}, "dp": 1}))
    with pytest.raises(DeploymentFieldError, match="shared_devices"):
        parse_deployment(base(decode_attention=attn, decode_experts={
            "devices": {"start": 4, "count": 2}, "shared_devices": 2}))


def test_too_few_devices():
    spec = parse_deployment(base(decode={"devices": {"start": 0, "count": 16}, "dp": 16}))
    with pytest.raises(TooFewDevicesError, match="needs 16 devices, JAX has 8"):
        sharding.build_deployment(spec)


def test_tp_must_divide_heads_and_slots_must_cover_experts():
    model = load_model_config(TINY_V3)  # 4 heads, 256 experts
    spec = parse_deployment(base(prefill={"devices": {"start": 0, "count": 3}, "tp": 3},
                                 decode={"devices": {"start": 3, "count": 1}}))
    with pytest.raises(HeadsNotDivisibleError, match=r"roles.prefill.tp = 3 .* 4 attention"):
        spec.check_model(model)
    ma = parse_deployment(base(
        decode_attention={"devices": {"start": 0, "count": 2}, "domains": 1, "dp": 2},
        decode_experts={"devices": {"start": 2, "count": 4}, "slots_per_device": 32}))
    with pytest.raises(ExpertSlotsError, match="128 expert slots, fewer than the model's 256"):
        sharding.build_deployment(ma, model=model)
    auto = parse_deployment(base(
        decode_attention={"devices": {"start": 0, "count": 2}, "domains": 1, "dp": 2},
        decode_experts={"devices": {"start": 2, "count": 6}, "redundant_slots": 10}))
    auto.check_model(model)
    assert auto.roles["decode_experts"].resolved_slots_per_device(256) == 45


def test_yaml_roundtrip_of_a_shipped_file_is_plain_data():
    raw = yaml.safe_load((DEPLOYMENTS / "cm384.yaml").read_text())
    assert parse_deployment(raw, "cm384").roles == read_deployment(
        DEPLOYMENTS / "cm384.yaml").roles


def test_partition_rules_table():
    assert logical_to_spec("prefill", ("vocab", "embed")) == P(None, None)
    # decode groups hold every expert: no expert parallelism
    assert logical_to_spec("decode", ("experts", "embed", "mlp")) == P(None, None, "tp")
    assert logical_to_spec("decode_attention", ("batch", "embed")) == P(("domain", "dp"), None)
    assert logical_to_spec("decode_experts", ("expert_slots", None, None)) == P("ep", None, None)
    # 2 KV heads under TP = 4 stay replicated.
    assert logical_to_spec("prefill", ("kv_heads", None), (2, 8), {"dp": 1, "tp": 4}) == P(None,
                                                                                            None)
    with pytest.raises(ShardingRuleError, match="role"):
        logical_to_spec("encode", ("vocab",))
    with pytest.raises(ShardingRuleError, match="logical axis"):
        logical_to_spec("prefill", ("seq",))
    dep = load_deployment(DEPLOYMENTS / "cpu8-pd.yaml")
    s = named_sharding(dep.mesh("prefill"), "prefill", ("heads", None), (4, 16))
    assert s.spec == P("tp", None) and s.mesh.shape["tp"] == 2


@pytest.mark.mesh16
def test_cpu16_ma_meshes_and_domains():
    if len(jax.devices()) != 16:
        pytest.skip("needs 16 devices")
    dep = load_deployment(DEPLOYMENTS / "cpu16-ma.yaml", model=load_model_config(TINY_V3))
    attn = dep.role("decode_attention")
    assert attn.mesh.axis_names == ("domain", "dp") and attn.mesh.devices.shape == (2, 3)
    assert list(attn.domain_mesh(1).devices) == jax.devices()[7:10]
    assert dep.role("decode_experts").routed_mesh().devices.size == 6


@pytest.mark.mesh384
def test_cm384_meshes_use_every_device_once():
    if len(jax.devices()) != 384:
        pytest.skip("needs 384 devices")
    dep = load_deployment(DEPLOYMENTS / "cm384.yaml", model=load_model_config(TINY_V3))
    used = [d for r in dep.roles.values() for d in r.mesh.devices.flat]
    assert sorted(d.id for d in used) == [d.id for d in jax.devices()]


def test_roles_may_set_their_own_capacity():
    spec = parse_deployment(base(
        prefill={"devices": {"start": 0, "count": 2}, "dp": 1, "tp": 2, "max_num_seqs": 4},
        decode={"devices": {"start": 2, "count": 2}, "dp": 2, "kv_cache_gib": 0.5,
                "max_num_batched_tokens": 256}))
    assert spec.roles["prefill"].capacity == {"max_num_seqs": 4}
    assert spec.roles["decode"].capacity == {"kv_cache_bytes": 1 << 29,
                                             "max_num_batched_tokens": 256}
    for bad in (0, -1, "1G", True):
        with pytest.raises(DeploymentFieldError, match="kv_cache_gib must be a positive"):
            parse_deployment(base(decode={"devices": {"start": 0, "count": 1}, "dp": 1,
                                          "kv_cache_gib": bad}))
    with pytest.raises(DeploymentFieldError, match="unknown field"):
        parse_deployment(base(
            decode_attention={"devices": {"start": 0, "count": 2}, "domains": 1, "dp": 2},
            decode_experts={"devices": {"start": 2, "count": 2}, "max_num_seqs": 4}))
