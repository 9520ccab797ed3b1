"""The sharding of every parameter and KV page, pinned per role (as MaxText's sharding tests
do): a TP=3 and a TP=4 prefill group, a TP=1 decode group, an MA attention domain and the
expert slice; and the runner places its weights exactly so."""

import dataclasses
import re

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from serving.core.runner import ModelRunner
from sharding.logical import LOGICAL_AXES, expert_slot_axes, param_logical_axes
from sharding.params import kv_page_shardings, param_shardings
from sharding.placement import abstract_caches, abstract_params
from sharding.rules import RULES, tree_shardings
from tests.helpers import GOLDEN
from xds_jax.model.config_hf import load_model_config
from xds_jax.model.fused import fuse_projections
from xds_jax.model.out_major import OUT_MAJOR_LEAVES
from xds_jax.model.params import init_params

LLAMA = load_model_config(GOLDEN / "llama" / "config.json")  # 4 heads, 2 KV heads
V3 = load_model_config(GOLDEN / "deepseek_v3" / "config.json")  # MLA, 8 experts + shared
QWEN2_MOE = load_model_config(GOLDEN / "qwen2_moe" / "config.json")  # biases, shared gate
# SmolLM2's head counts (9 query, 3 KV heads: cpu10-pd-tp3), tied embeddings, tiny sizes
SMOL = dataclasses.replace(LLAMA, num_heads=9, num_kv_heads=3, head_dim=8,
                           tie_word_embeddings=True)

R = P()  # replicated (no dim split)

# Leaf path (layer index dropped) -> spec on a TP=4 prefill group, of the loaders' tree (K/V
# and gate/up fused at load time, xds_jax.model.fused).
LLAMA_TP4 = {
    "embed": P(None, None), "lm_head": P(None, None), "final_norm": P(None),
    "input_norm": P(None), "post_norm": P(None),
    "attn/q": P(None, "tp"), "attn/kv": P(None, None),  # 2 KV heads
    "attn/o": P("tp", None),
    "mlp/gate_up": P(None, "tp"), "mlp/down": P("tp", None),
}
SMOL_TP3 = LLAMA_TP4 | {"attn/kv": P(None, "tp")}
del SMOL_TP3["lm_head"]  # tied
V3_TP4 = {
    "embed": P(None, None), "lm_head": P(None, None), "final_norm": P(None),
    "input_norm": P(None), "post_norm": P(None),
    "attn/q_a": P(None, None), "attn/q_a_norm": P(None), "attn/q_b": P(None, "tp"),
    "attn/kv_a": P(None, None), "attn/kv_a_norm": P(None), "attn/kv_b": P(None, "tp"),
    "attn/o": P("tp", None),
    "mlp/gate_up": P(None, "tp"), "mlp/down": P("tp", None),
    "moe/router": P(None, None), "moe/router_bias": P(None),
    "moe/experts/gate": P(None, None, "tp"), "moe/experts/up": P(None, None, "tp"),
    "moe/experts/down": P(None, "tp", None),  # every group holds every expert
    "moe/shared/gate_up": P(None, "tp"), "moe/shared/down": P("tp", None),
}
QWEN2_MOE_TP4 = {k: v for k, v in V3_TP4.items()
                 if not k.startswith(("attn/", "mlp/")) and k != "moe/router_bias"} | {
    "attn/q": P(None, "tp"), "attn/kv": P(None, None),
    "attn/o": P("tp", None), "attn/q_bias": P("tp"), "attn/kv_bias": P(None),
    "moe/shared_gate": P(None, None),
}


def _key(path) -> str:
    return re.sub(r"^layers/\d+/", "", "/".join(
        str(getattr(p, "key", getattr(p, "idx", p))) for p in path))


def specs(shardings) -> dict[str, P]:
    """Leaf path (layer index dropped) -> spec; every layer must agree."""
    out: dict[str, P] = {}
    for path, s in jax.tree_util.tree_leaves_with_path(shardings):
        key = _key(path)
        assert out.setdefault(key, s.spec) == s.spec, key
    return out


def pinned(cfg, role: str, mesh, params=None) -> dict[str, P]:
    params = params if params is not None else abstract_params(cfg, "float32",
                                                               output_major=False)
    return specs(param_shardings(params, cfg, mesh, role))


@pytest.mark.parametrize("cfg, tp, want", [(LLAMA, 4, LLAMA_TP4), (SMOL, 3, SMOL_TP3),
                                           (V3, 4, V3_TP4), (QWEN2_MOE, 4, QWEN2_MOE_TP4)],
                         ids=["llama-tp4", "smol-tp3", "v3-tp4", "qwen2moe-tp4"])
def test_prefill_group_parameters(cfg, tp, want):
    mesh = AbstractMesh((tp,), ("tp",))
    assert pinned(cfg, "prefill", mesh) == want
    # stored [out, in] (xds_jax.model.out_major, CPU loads): the same split, dims reversed
    flipped = pinned(cfg, "prefill", mesh, abstract_params(cfg, "float32", output_major=True))
    moved = {k for k in flipped if k.endswith("_t")}
    assert moved == {k + "_t" for k in want if k.split("/")[-1] in OUT_MAJOR_LEAVES
                     and "experts/" not in k and not (cfg.mla and k.startswith("attn/"))}
    for key, spec in flipped.items():
        base = key.removesuffix("_t")
        want_spec = P(*reversed(tuple(want[base]) + (None,) * (2 - len(want[base])))) \
            if key in moved else want[key]
        assert tuple(spec) + (None,) * (len(want_spec) - len(spec)) == tuple(want_spec), key


@pytest.mark.parametrize("cfg", [LLAMA, V3, QWEN2_MOE], ids=["llama", "v3", "qwen2moe"])
def test_decode_group_tp1_and_attention_ranks_replicate_every_weight(cfg):
    got = pinned(cfg, "decode", AbstractMesh((1,), ("tp",)))
    assert all(s == P(*(None,) * len(s)) for s in got.values())
    got = pinned(cfg, "decode_attention", AbstractMesh((3,), ("dp",)))
    assert all(s == P(*(None,) * len(s)) for s in got.values())


def test_kv_pages():
    def spec(cfg, role, mesh):
        caches = abstract_caches(cfg, 12, 16, "float32")  # 12 pages: any owner count here
        (s,) = set(specs(kv_page_shardings(caches, cfg, mesh, role)).values())
        return s

    tp = lambda n: AbstractMesh((n,), ("tp",))  # noqa: E731
    # spelt without trailing Nones, as a step program returns the pages it was given
    assert spec(LLAMA, "prefill", tp(2)) == P(None, None, "tp")
    assert spec(LLAMA, "prefill", tp(4)) == P()  # 2 KV heads
    assert spec(SMOL, "prefill", tp(3)) == P(None, None, "tp")
    assert spec(V3, "prefill", tp(4)) == P()  # one latent head
    assert spec(LLAMA, "decode", tp(1)) == P()
    # an attention domain: each rank owns its pages (role mesh: split over domain and dp)
    assert spec(V3, "decode_attention", AbstractMesh((3,), ("dp",))) == P("dp")
    assert spec(V3, "decode_attention", AbstractMesh((2, 3), ("domain", "dp"))) == P(
        ("domain", "dp"))


def test_expert_slots_split_over_the_routed_devices():
    mesh = AbstractMesh((4,), ("ep",))
    slots = {k: jax.ShapeDtypeStruct((12, 64, 32) if k != "down" else (12, 32, 64), "float32")
             for k in ("gate", "up", "down")}
    got = tree_shardings(mesh, "decode_experts", {k: expert_slot_axes(k) for k in slots}, slots)
    assert {k: s.spec for k, s in got.items()} == {k: P("ep", None, None) for k in slots}
    assert got["gate"].shard_shape((12, 64, 32)) == (3, 64, 32)


def test_every_role_table_names_every_logical_axis_once():
    for role, table in RULES.items():
        assert [name for name, _ in table] == list(LOGICAL_AXES), role


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3", "qwen3_moe", "qwen2_moe",
                                  "mixtral", "deepseek_v3", "deepseek_v3_noqlora"])
def test_every_parameter_of_every_architecture_has_logical_axes(name):
    cfg = load_model_config(GOLDEN / name / "config.json")
    tree = abstract_params(cfg, "float32", with_mtp=True)
    axes = param_logical_axes(tree)
    for a, x in zip(jax.tree.leaves(tree), jax.tree.leaves(
            axes, is_leaf=lambda t: isinstance(t, tuple)), strict=True):
        assert len(x) == a.ndim


@pytest.mark.parametrize("cfg, tp, want", [(LLAMA, 4, LLAMA_TP4), (SMOL, 3, SMOL_TP3),
                                           (V3, 4, V3_TP4)], ids=["llama", "smol", "v3"])
def test_runner_places_weights_by_the_rules(cfg, tp, want):
    params = fuse_projections(init_params(cfg, dtype=np.float32), cfg)  # as loaders make it
    runner = ModelRunner(params, cfg, 4, 16, jax.devices()[:tp])
    assert specs(jax.tree.map(lambda a: a.sharding, runner.params)) == want
    axes = set(specs(jax.tree.map(lambda a: a.sharding, runner.caches)).values())
    assert axes == set(specs(kv_page_shardings(runner.caches, cfg, runner.params["embed"]
                                               .sharding.mesh, "prefill")).values())


def test_program_specs_of_the_ma_arrays_come_from_the_rules():
    """Micro-batch rows, service inputs and hop payloads: one block per device of the
    program's mesh, by each role's ``batch`` rule; weights whole."""
    from jax.sharding import AbstractMesh
    from jax.sharding import PartitionSpec as P

    from sharding.rules import UNION_AXIS, program_spec

    domain = AbstractMesh((3,), ("dp",))
    experts = AbstractMesh((4,), ("ep",))
    union = AbstractMesh((7,), (UNION_AXIS,))
    assert program_spec(domain, "decode_attention", "batch") == P("dp")
    assert program_spec(AbstractMesh((1,), ("dp",)), "decode_attention", "batch") == P("dp")
    assert program_spec(experts, "decode_experts", "batch") == P("ep")
    assert program_spec(union, "transfer", "batch") == P(UNION_AXIS)
    assert program_spec(domain, "decode_attention") == P()
    assert program_spec(experts, "decode_experts", "batch", "embed") == P("ep", None)
