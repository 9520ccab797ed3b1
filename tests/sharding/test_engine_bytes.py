"""``xds plan``'s per-device bytes are what the engine puts on each device: the shipped
cpu8-pd, cpu16-ma and cm384 layouts built through ``LLM(deployment=...)`` with the tiny
Llama and the 256-expert DeepSeek-V3 config, every role's weight and KV bytes counted from
the shards on each device; with int8 weights too (their scales placed with them), where
the plan's weight bytes per device come out near half of float32's bfloat16."""

from collections import defaultdict

import jax
import pytest

from serving.disagg.ma import MAPool
from sharding.deployment import read_deployment
from sharding.placement import abstract_params
from sharding.plan import plan_deployment
from tests.helpers import GOLDEN
from xds_jax import LLM

DEPLOYMENTS = "configs/deployments"
MODELS = {"llama": str(GOLDEN / "llama"), "v3-256": "configs/models/deepseek-v3-tiny.json"}


def _bytes_on_devices(trees) -> dict:
    """Bytes per device of the arrays in ``trees``, each array counted once."""
    arrays = {id(a): a for a in jax.tree.leaves(trees)}
    out: dict = defaultdict(int)
    for a in arrays.values():
        for shard in a.addressable_shards:
            out[shard.device] += shard.data.nbytes
    return out


def engine_bytes(engine) -> tuple[dict, dict, dict]:
    """(weight bytes per device, KV bytes per device, KV token slots of each device's pool)."""
    weights, kv, tokens = [], [], {}
    for group in engine.groups:
        runner = group.runner
        if hasattr(runner, "params"):  # a ModelRunner (MA ranks' runners are views)
            weights.append(runner.params)
            kv.append(runner.caches)
            kv.append(getattr(runner, "mtp_cache", None))  # a SpecRunner's MTP pages
            tokens |= {d: group.config.num_blocks * group.config.block_size
                       for d in runner.devices}
    for pool in (d for d in engine.drivers if isinstance(d, MAPool)):
        for dom in pool.domains:
            weights.append(dom.params)
            kv.append(dom.caches)
            tokens |= {d: dom.num_blocks * dom.block_size for d in dom.devices}
        weights += pool.expert_side_weights()
    return _bytes_on_devices(weights), _bytes_on_devices(kv), tokens


def check(model: str, deployment: str, quantization: str | None = None):
    """The plan's bytes per device are the engine's; returns the plan."""
    if len(jax.devices()) < read_deployment(f"{DEPLOYMENTS}/{deployment}.yaml").num_devices:
        pytest.skip("needs more devices")
    llm = LLM(MODELS[model], dtype="float32", deployment=f"{DEPLOYMENTS}/{deployment}.yaml",
              max_model_len=64, max_num_seqs=2, use_param_cache=False,
              quantization=quantization)
    # the plan's default tree is the tree the loader made
    planned_tree = abstract_params(llm.cfg, "float32", quantization=quantization)
    assert jax.tree.structure(planned_tree) == jax.tree.structure(llm.params)
    assert jax.tree.leaves(planned_tree) == jax.tree.leaves(jax.eval_shape(lambda: llm.params))
    plan = plan_deployment(llm.cfg, read_deployment(f"{DEPLOYMENTS}/{deployment}.yaml"),
                           dtype="float32", quantization=quantization)
    assert_plan_is_engine(plan, llm)
    return plan


def assert_plan_is_engine(plan, llm) -> None:
    """Every role's weight and KV bytes per device are the engine's, and the engine placed
    nothing on a device the plan does not name."""
    weights, kv, tokens = engine_bytes(llm.engine)
    devices = jax.devices()
    for role in plan.roles:
        start = int(role.devices.split("..")[0])
        on_devices = devices[start:start + len(role.weight_bytes())]
        assert [weights[d] for d in on_devices] == role.weight_bytes(), role.role
        assert role.param_bytes == max(weights[d] for d in on_devices)
        assert [kv[d] for d in on_devices] == [
            role.kv_bytes_per_token * tokens.get(d, 0) for d in on_devices], role.role
    # nothing the engine placed is missing from the plan
    assert set(weights) <= set(devices[:plan_devices(plan)])


def plan_devices(plan) -> int:
    return max(int(r.devices.split("..")[1]) + 1 for r in plan.roles)


@pytest.mark.parametrize("model", ["llama", "v3-256"])
def test_cpu8_pd_plan_equals_engine_bytes(model):
    check(model, "cpu8-pd")


@pytest.mark.parametrize("model", ["llama", "v3-256"])
def test_cpu8_pd_int8_plan_equals_engine_bytes_and_quarters_float32(model):
    """int8 weights with their scales (TP-split on the prefill pool) are what the plan
    counts, and about a quarter of float32's bytes per device (half of bfloat16's)."""
    fp32, int8 = check(model, "cpu8-pd"), check(model, "cpu8-pd", "int8")
    for a, b in zip(fp32.roles, int8.roles, strict=True):
        assert 0.25 < b.param_bytes / a.param_bytes < 0.3, (a.role, a.param_bytes, b.param_bytes)


@pytest.mark.mesh16
@pytest.mark.parametrize("model", ["llama", "v3-256"])
@pytest.mark.parametrize("quantization", [None, "int8"])
def test_cpu16_ma_plan_equals_engine_bytes(model, quantization):
    check(model, "cpu16-ma", quantization)


@pytest.mark.mesh384
def test_cm384_plan_equals_engine_bytes():
    check("v3-256", "cm384")


@pytest.mark.parametrize("model", ["llama", "v3-256"])
def test_cpu8_pd_ep_plan_equals_engine_bytes(model):
    """EP decode: each decode device holds the attention weights and 64 of the 256 expert
    slots (a dense model: the whole model, as plain DP groups)."""
    check(model, "cpu8-pd-ep")
