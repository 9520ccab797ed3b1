"""Output-major projection weights (``xds_jax.model.out_major``): the same model with its
layers' projections stored ``[out, in]`` computes what ``[in, out]`` computes, the layout
round-trips exactly, TP splits the output axis either way, and CPU loads choose it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sharding.logical import param_logical_axes
from tests.helpers import golden, tiny
from xds_jax.kernels import cpu_matmul
from xds_jax.model.fused import unfuse_layer
from xds_jax.model.layers import project
from xds_jax.model.out_major import (
    in_major_layer,
    out_major,
    prefers_out_major,
    weight_for,
)
from xds_jax.model.params import init_params
from xds_jax.model.quant import quantize_params
from xds_jax.model.reference import reference_logits


def _in_major(params: dict) -> dict:
    return dict(params, layers=[in_major_layer(lay) for lay in params["layers"]])


def test_cpu_loads_store_layer_projections_out_major():
    assert prefers_out_major("cpu") and not prefers_out_major("tpu")
    assert not prefers_out_major("gpu")
    m = tiny("qwen2")  # fused kv with biases
    attn, mlp = m.params["layers"][0]["attn"], m.params["layers"][0]["mlp"]
    d, kv = m.cfg.hidden_size, 2 * m.cfg.num_kv_heads * m.cfg.head_dim
    assert {"q_t", "kv_t", "o_t", "kv_bias"} <= set(attn) and "kv" not in attn
    assert attn["kv_t"].shape == (kv, d) and mlp["gate_up_t"].shape[1] == d
    assert m.params["embed"].shape == (m.cfg.vocab_size, d)  # already [V, D]: unchanged


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3_moe", "deepseek_v3"])
@pytest.mark.parametrize("dtype, quantization", [(jnp.float32, None), (jnp.bfloat16, None),
                                                 (jnp.float32, "int8")])
def test_out_major_logits_equal_in_major(name, dtype, quantization, monkeypatch, request):
    """GQA with and without biases, MoE, MLA (its attention keeps [in, out]); float32 up to
    the summation order of a dot, bfloat16 and int8 (exact int32 products) alike. Both
    layouts take XLA's dots here: on CPU the output-major one would otherwise take xds-jax's
    kernel, whose rounding against XLA's is tested in tests/xds_jax/test_cpu_kernels.py."""
    monkeypatch.setattr(cpu_matmul, "max_rows", lambda *a, **k: 0)
    # the layers' jitted kinds retrace with it (an earlier test of the process, test_bf16's,
    # compiled them for these shapes with the kernel in), and again after it
    jax.clear_caches()
    request.addfinalizer(jax.clear_caches)
    m = tiny(name)
    base = quantize_params(jax.tree.map(lambda w: w.astype(dtype), _in_major(m.params)),
                           quantization)
    flipped = out_major(base, m.cfg)
    moved = [n for n in flipped["layers"][0]["attn"] if n.endswith("_t")]
    assert bool(moved) == (m.cfg.mla is None)
    tokens = jnp.asarray(golden(name)["prompt_2"])
    want = np.asarray(reference_logits(base, m.cfg, tokens), np.float32)
    got = np.asarray(reference_logits(flipped, m.cfg, tokens), np.float32)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_layout_round_trips_and_unfuse_gives_in_major_weights():
    m = tiny("llama")
    base = _in_major(m.params)
    for lay, flipped in zip(base["layers"], out_major(base, m.cfg)["layers"], strict=True):
        back = in_major_layer(flipped)
        assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(lay)
        for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(lay), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(jax.tree.leaves(unfuse_layer(flipped, m.cfg)),
                        jax.tree.leaves(unfuse_layer(lay, m.cfg)), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert out_major(out_major(base, m.cfg), m.cfg)["layers"][0]["attn"].keys() == \
        out_major(base, m.cfg)["layers"][0]["attn"].keys()  # applying twice changes nothing


def test_project_contracts_either_layout_and_names_a_missing_weight():
    cfg = tiny("llama").cfg
    p = init_params(cfg, seed=4)["layers"][0]["attn"]
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, cfg.hidden_size)), jnp.float32)
    t = {"q_t": p["q"].T}
    np.testing.assert_allclose(np.asarray(project(t, "q", x)), np.asarray(project(p, "q", x)),
                               rtol=1e-5, atol=1e-6)
    assert weight_for(t, "q")[1] and not weight_for(p, "q")[1]
    with pytest.raises(KeyError, match="'o'"):
        project(t, "o", x)


def test_logical_axes_of_out_major_leaves_are_reversed():
    m = tiny("qwen3_moe")
    base = quantize_params(_in_major(m.params), "int8")
    axes_in = param_logical_axes(base)["layers"][0]
    axes_out = param_logical_axes(out_major(base, m.cfg))["layers"][0]
    assert axes_in["attn"]["q"] == ("embed", "heads")
    assert axes_out["attn"]["q_t"] == ("heads", "embed")
    assert axes_out["attn"]["o_t"] == ("embed", "heads")
    assert axes_out["attn"]["q_t_scale"] == axes_in["attn"]["q_scale"] == ("heads",)
    assert axes_out["attn"]["o_t_scale"] == axes_in["attn"]["o_scale"] == ("embed",)


def test_quantizing_an_out_major_tree_equals_flipping_a_quantized_one():
    m = tiny("qwen2")
    base = _in_major(m.params)
    a = quantize_params(out_major(base, m.cfg), "int8")
    b = out_major(quantize_params(base, "int8"), m.cfg)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    assert a["layers"][0]["attn"]["kv_t"].dtype == jnp.int8
    assert a["layers"][0]["attn"]["kv_t_scale"].shape == (a["layers"][0]["attn"]["kv_t"].shape[0],)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
