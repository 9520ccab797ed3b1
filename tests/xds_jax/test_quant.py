"""Weight-only INT8: quantisation, the int8 matmuls against float32 math on the dequantised
weights, the compiled program reading the int8 weight, and every tiny architecture."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sharding.logical import expert_slot_axes, param_logical_axes
from tests.helpers import TINY_MODELS, golden, tiny
from xds_jax.engine_config import EngineConfig
from xds_jax.errors import ConfigError
from xds_jax.loading.loader import load_model
from xds_jax.model.layers import matmul_f32
from xds_jax.model.moe import expert_ffn, moe_dense_reference, moe_local
from xds_jax.model.out_major import weight_for
from xds_jax.model.quant import (
    QuantizationError,
    contract_axis,
    dequantize,
    int8_matmul,
    quantize_params,
    quantize_weight,
)
from xds_jax.model.reference import reference_logits

RNG = np.random.default_rng(0)


def dequantized(tree):
    """A quantised tree with every int8 weight replaced by float32 ``q * scale``."""
    if isinstance(tree, list):
        return [dequantized(t) for t in tree]
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict | list):
            out[k] = dequantized(v)
        elif k + "_scale" in tree:
            out[k] = dequantize(v, tree[k + "_scale"], contract_axis(k))
        elif not k.endswith("_scale"):
            out[k] = v
    return out


def test_quantize_weight_rounds_each_channel_to_half_a_step():
    w = RNG.normal(size=(3, 40, 24)).astype(np.float32)
    w[1, :, 5] = 0  # an all-zero channel stays exactly zero
    q, scale = quantize_weight(w, axis=-2)
    assert q.dtype == np.int8 and scale.shape == (3, 24) and scale.dtype == np.float32
    assert np.abs(q).max() == 127 and scale[1, 5] == 1.0 and not q[1, :, 5].any()
    err = np.abs(q * scale[:, None, :] - w)
    assert (err <= scale[:, None, :] / 2 + 1e-7).all()
    q_rows, scale_rows = quantize_weight(w[0], axis=-1)  # the embedding: one scale per row
    assert scale_rows.shape == (40,)
    np.testing.assert_allclose(q_rows * scale_rows[:, None], w[0], atol=scale_rows.max() / 2)


@pytest.mark.parametrize("rows, transposed", [(1, False), (5, False), (3, True)])
def test_int8_matmul_matches_float32_on_the_dequantized_weight(rows, transposed):
    x = RNG.normal(size=(rows, 64)).astype(np.float32)
    x[0, 3] = 40.0  # an outlier: the 16-bit row scale keeps the small entries
    w = RNG.normal(size=(64, 48)).astype(np.float32)
    q, scale = quantize_weight(w.T if transposed else w, axis=-1 if transposed else -2)
    want = x @ (q.T * scale if transposed else q * scale)
    got = matmul_f32(jnp.asarray(x), jnp.asarray(q), transposed, scale=jnp.asarray(scale))
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-4 * np.abs(want).max())
    with pytest.raises(ValueError, match="scale"):
        matmul_f32(jnp.asarray(x), jnp.asarray(q))


def test_int8_matmul_of_a_zero_row_is_zero():
    q, scale = quantize_weight(RNG.normal(size=(16, 8)))
    y = int8_matmul(jnp.zeros((2, 16)), jnp.asarray(q), jnp.asarray(scale))
    assert not np.asarray(y).any()


def test_compiled_matmul_reads_the_int8_weight_without_a_float_copy():
    """The dot takes the stored s8 weight; nothing of the weight's shape is float."""
    k, n = 256, 384
    q, scale = (jnp.asarray(a) for a in quantize_weight(RNG.normal(size=(k, n))))
    for rows in (1, 8):
        hlo = jax.jit(matmul_f32, static_argnums=2).lower(
            jnp.ones((rows, k), jnp.bfloat16), q, False, scale).compile().as_text()
        assert f"s8[{k},{n}]" in hlo
        for float_type in ("f32", "bf16", "f16"):
            assert f"{float_type}[{k},{n}]" not in hlo, (rows, float_type)


def test_int8_experts_match_float32_experts_on_dequantized_weights():
    e, d, f, t, k = 4, 32, 24, 10, 2
    fp = {"gate": RNG.normal(size=(e, d, f)), "up": RNG.normal(size=(e, d, f)),
          "down": RNG.normal(size=(e, f, d))}
    experts = quantize_params({"layers": [{"moe": {"experts": fp}}]}, "int8")
    experts = experts["layers"][0]["moe"]["experts"]
    assert experts["gate_scale"].shape == (e, f) and experts["down_scale"].shape == (e, d)
    deq = dequantized(experts)
    x = jnp.asarray(RNG.normal(size=(t, d)), jnp.float32)
    ids = jnp.asarray(RNG.integers(0, e, (t, k)), jnp.int32)
    w = jnp.asarray(RNG.random((t, k)), jnp.float32)
    want = np.asarray(moe_dense_reference(deq, x, ids, w))
    tol = 2e-4 * np.abs(want).max()
    np.testing.assert_allclose(np.asarray(moe_dense_reference(experts, x, ids, w)), want,
                               atol=tol)
    np.testing.assert_allclose(np.asarray(moe_local(experts, x, ids, w)), want, atol=tol)
    x_ECD = jnp.broadcast_to(x, (e, t, d))
    np.testing.assert_allclose(np.asarray(expert_ffn(experts, x_ECD)),
                               np.asarray(expert_ffn(deq, x_ECD)), atol=tol)


def test_quantized_tree_layout_and_logical_axes():
    m = tiny("deepseek_v3")
    q = quantize_params(m.params, "int8")
    attn, moe = q["layers"][-1]["attn"], q["layers"][-1]["moe"]
    assert q["embed"].dtype == jnp.int8 and q["embed_scale"].shape == (m.cfg.vocab_size,)
    assert q["final_norm"].dtype == jnp.float32 and moe["router"].dtype == jnp.float32
    assert attn["q_b"].dtype == jnp.int8 and attn["kv_a_norm"].dtype == jnp.float32
    axes = param_logical_axes(q)
    assert axes["embed_scale"] == ("vocab",)
    assert axes["layers"][-1]["attn"]["q_b_scale"] == ("heads",)
    assert axes["layers"][-1]["attn"]["o_scale"] == ("embed",)
    assert axes["layers"][-1]["moe"]["experts"]["gate_scale"] == ("experts", "mlp")
    shared = "down_t" if "down_t" in moe["shared"] else "down"  # CPU loads: out-major
    assert axes["layers"][-1]["moe"]["shared"][shared + "_scale"] == ("embed",)
    assert expert_slot_axes("up_scale") == ("expert_slots", "mlp")
    assert expert_slot_axes("down_scale") == ("expert_slots", "embed")
    assert quantize_params(m.params, None) is m.params  # no quantization: the tree as is


@pytest.mark.parametrize("name", TINY_MODELS)
def test_int8_model_is_float32_math_on_its_dequantized_weights(name):
    """Every architecture (GQA, MLA, dense, MoE with shared experts): the int8 forward equals
    float32 on ``q * scale`` up to the 16-bit activation rounding."""
    m, g = tiny(name), golden(name)
    q = quantize_params(m.params, "int8")
    tokens = jnp.asarray(g["prompt_2"])
    want = np.asarray(reference_logits(dequantized(q), m.cfg, tokens))
    got = np.asarray(reference_logits(q, m.cfg, tokens))
    np.testing.assert_allclose(got, want, atol=1e-3 * np.abs(want).max())


def test_config_and_loader_reject_unknown_quantization():
    with pytest.raises(ConfigError, match="quantization"):
        EngineConfig(quantization="int4")
    with pytest.raises(QuantizationError, match="int4"):
        load_model("configs/models/deepseek-v3-tiny.json", quantization="int4")


def test_converted_weights_cache_keeps_int8(tmp_path, monkeypatch):
    """The second load restores the int8 tree from the cache, apart from the float one."""
    monkeypatch.setenv("XDS_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("XDS_NO_CACHE", raising=False)
    from tests.helpers import GOLDEN

    first = load_model(GOLDEN / "llama", dtype="float32", quantization="int8")
    entries = list((tmp_path / "params").iterdir())
    again = load_model(GOLDEN / "llama", dtype="float32", quantization="int8")
    fp = load_model(GOLDEN / "llama", dtype="float32")
    assert len(list((tmp_path / "params").iterdir())) == len(entries) + 1  # fp: its own entry
    assert weight_for(again.params["layers"][0]["attn"], "kv")[0].dtype == jnp.int8
    for a, b in zip(jax.tree.leaves(first.params), jax.tree.leaves(again.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert weight_for(fp.params["layers"][0]["attn"], "kv")[0].dtype == jnp.float32


def test_gguf_q8_0_tensor_requantised_per_channel(tmp_path):
    """A Q8_0 tensor read from a GGUF file and requantised per output channel: within half a
    channel step of the Q8_0 values, and the source reports its storage type."""
    import gguf

    from xds_jax.loading.weights_gguf import GGUFSource

    w = RNG.normal(size=(8, 64)).astype(np.float32)  # GGUF layout [out, in]
    q8_0 = gguf.GGMLQuantizationType.Q8_0
    writer = gguf.GGUFWriter(tmp_path / "m.gguf", "llama")
    writer.add_tensor("blk.0.attn_q.weight", gguf.quants.quantize(w, q8_0), raw_dtype=q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    src = GGUFSource(tmp_path / "m.gguf")
    assert src.quant_type("blk.0.attn_q.weight") == "Q8_0"
    assert src.linear_quant_types() == {"Q8_0"}
    blocks = src.get("blk.0.attn_q.weight")
    np.testing.assert_allclose(blocks, w, atol=np.abs(w).max() / 127)
    q, scale = quantize_weight(blocks.T)
    assert (np.abs(q * scale - blocks.T) <= scale / 2 + 1e-7).all()
