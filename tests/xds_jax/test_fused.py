"""Fused projections: the fused layouts compute the unfused matmuls, and TP splits them into
whole KV heads (key with its value) and whole gate/up pairs."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from sharding.params import param_shardings
from tests.helpers import tiny
from xds_jax.model.fused import (
    fuse_projections,
    fuse_query,
    split_gate_up,
    split_kv,
    split_qkv,
    unfuse_layer,
)
from xds_jax.model.layers import project, swiglu
from xds_jax.model.out_major import has_weight, in_major_layer, out_major, weight_for
from xds_jax.model.params import init_params
from xds_jax.model.quant import quantize_params
from xds_jax.model.reference import reference_logits

RNG = np.random.default_rng(0)


def test_fused_kv_and_gate_up_equal_the_separate_matmuls():
    cfg = tiny("qwen2").cfg  # attention biases, 2 query heads per KV head
    layer = init_params(cfg, seed=1)["layers"][0]
    fused = fuse_projections({"layers": [layer]}, cfg)["layers"][0]
    assert set(fused["attn"]) >= {"q", "q_bias", "kv", "kv_bias"} and "k" not in fused["attn"]
    x = jnp.asarray(RNG.normal(size=(2, 3, cfg.hidden_size)), jnp.float32)
    k, v = split_kv(project(fused["attn"], "kv", x), cfg)
    for got, name in ((k, "k"), (v, "v")):
        want = project(layer["attn"], name, x).reshape(2, 3, cfg.num_kv_heads, cfg.head_dim)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    g, u = split_gate_up(project(fused["mlp"], "gate_up", x))
    np.testing.assert_allclose(np.asarray(g), np.asarray(project(layer["mlp"], "gate", x)),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(u), np.asarray(project(layer["mlp"], "up", x)),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(swiglu(fused["mlp"], x)),
                               np.asarray(swiglu(layer["mlp"], x)), rtol=1e-5, atol=1e-6)


def test_unfuse_layer_gives_back_the_separate_weights():
    for name in ("qwen2", "llama"):  # with and without attention biases
        cfg = tiny(name).cfg
        layer = init_params(cfg, seed=2)["layers"][0]
        back = unfuse_layer(fuse_projections({"layers": [layer]}, cfg)["layers"][0], cfg)
        assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(layer)
        for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(layer),
                        strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_loaded_models_are_fused_and_match_unfused_logits():
    m = tiny("qwen3_moe")  # shared-expert-free MoE: attention fused, experts as they are
    assert has_weight(m.params["layers"][0]["attn"], "kv")
    assert "gate" in m.params["layers"][-1]["moe"]["experts"]
    unfused = init_params(m.cfg, seed=3)
    tokens = jnp.asarray(RNG.integers(0, m.cfg.vocab_size, 9))
    for q in (None, "int8"):
        want = reference_logits(quantize_params(unfused, q), m.cfg, tokens)
        got = reference_logits(quantize_params(fuse_projections(unfused, m.cfg), q), m.cfg,
                               tokens)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


def test_tp_shards_hold_whole_kv_heads_and_gate_up_pairs():
    m = tiny("llama")  # 4 query heads, 2 KV heads
    cfg = m.cfg
    mesh = Mesh(np.array(jax.devices()[:2]), ("tp",))
    in_major = dict(m.params, layers=[in_major_layer(lay) for lay in m.params["layers"]])
    for params in (in_major, out_major(in_major, cfg)):  # [in, out] and [out, in] storage
        layer = params["layers"][0]
        shardings = param_shardings(params, cfg, mesh)["layers"][0]
        (kv, kv_t), (gate_up, gu_t) = weight_for(layer["attn"], "kv"), \
            weight_for(layer["mlp"], "gate_up")
        cols = 0 if kv_t else 1  # the output axis TP splits
        kv_name, gu_name = "kv" + "_t" * kv_t, "gate_up" + "_t" * gu_t
        kv_s = jax.device_put(kv, shardings["attn"][kv_name])
        gu_s = jax.device_put(gate_up, shardings["mlp"][gu_name])
        group = 2 * cfg.head_dim
        for j, shard in enumerate(sorted(kv_s.addressable_shards,
                                         key=lambda s: s.index[cols].start)):
            assert shard.data.shape[cols] == group  # one KV head's key and value on each rank
            np.testing.assert_array_equal(
                np.asarray(shard.data),
                np.take(np.asarray(kv), np.arange(j * group, (j + 1) * group), axis=cols))
        width = gate_up.shape[cols] // 2
        assert all(s.data.shape[cols] == width and s.index[cols].start % 2 == 0
                   for s in gu_s.addressable_shards)


def test_fuse_query_computes_q_k_and_v_in_every_layout():
    """``qkv`` = the query's columns then ``kv``'s, stored either way, int8 scales and biases
    fused alike; the model's logits unchanged; ``unfuse_layer`` gives back the weights."""
    for name in ("qwen2", "llama"):  # with and without attention biases
        cfg = tiny(name).cfg
        base = fuse_projections(init_params(cfg, seed=4), cfg)
        tokens = jnp.asarray(RNG.integers(0, cfg.vocab_size, 7))
        x = jnp.asarray(RNG.normal(size=(2, 3, cfg.hidden_size)), jnp.float32)
        for q in (None, "int8"):
            for params in (quantize_params(base, q), out_major(quantize_params(base, q), cfg)):
                fused = fuse_query(params, cfg)
                attn, before = fused["layers"][0]["attn"], params["layers"][0]["attn"]
                assert has_weight(attn, "qkv") and not has_weight(attn, "q")
                assert not has_weight(attn, "kv") and ("qkv_bias" in attn) == (name == "qwen2")
                got_q, got_k, got_v = split_qkv(project(attn, "qkv", x), cfg)
                want_k, want_v = split_kv(project(before, "kv", x), cfg)
                want_q = project(before, "q", x).reshape(got_q.shape)
                for got, want in ((got_q, want_q), (got_k, want_k), (got_v, want_v)):
                    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6,
                                               atol=1e-6)
                np.testing.assert_allclose(
                    np.asarray(reference_logits(fused, cfg, tokens)),
                    np.asarray(reference_logits(params, cfg, tokens)), rtol=1e-5, atol=1e-5)
                back = unfuse_layer(fused["layers"][0], cfg)
                want_back = unfuse_layer(params["layers"][0], cfg)
                assert jax.tree_util.tree_structure(back) == \
                    jax.tree_util.tree_structure(want_back)
                for a, b in zip(jax.tree_util.tree_leaves(back),
                                jax.tree_util.tree_leaves(want_back), strict=True):
                    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_fuse_query_leaves_mla_and_unfused_trees_alone():
    for name in ("llama", "deepseek_v3"):  # k and v apart; MLA's latent projections
        cfg = tiny(name).cfg
        params = init_params(cfg, seed=5)
        for tree in (params, fuse_projections(params, cfg)) if cfg.mla else (params,):
            assert fuse_query(tree, cfg) is tree or all(
                a["attn"].keys() == b["attn"].keys()
                for a, b in zip(fuse_query(tree, cfg)["layers"], tree["layers"], strict=True))


def test_the_engine_fuses_the_query_only_where_groups_hold_whole_layers():
    """``LLM``'s tree: Q fused with K/V for colocated groups (no deployment file, TP 1), as
    loaded under a deployment (its prefill TP may split the heads)."""
    import copy

    from xds_jax.engine_config import EngineConfig
    from xds_jax.engine_setup import engine_params

    cached = tiny("llama")
    loaded = copy.copy(cached)  # the engine fuses the loaded tree's layers in place
    loaded.params = dict(cached.params, layers=list(cached.params["layers"]))
    colocated = engine_params(loaded, EngineConfig(model="llama"), None)
    assert has_weight(colocated["layers"][0]["attn"], "qkv")
    assert loaded.params["layers"] is colocated["layers"]  # the unfused layers let go
    assert has_weight(cached.params["layers"][0]["attn"], "q")
    deployed = engine_params(cached, EngineConfig(model="llama",
                                                  deployment="configs/deployments/cpu8-pd.yaml"),
                             None)
    assert deployed is cached.params and has_weight(deployed["layers"][0]["attn"], "q")
