"""compressed-tensors checkpoints (llm-compressor's W4A16, W8A8, FP8-dynamic) load exactly.

``tests/golden/llama_*`` are the tiny Llama's projections compressed by the ``compressed-tensors``
library itself; ``golden.npz`` is transformers' Llama on the library's own decompression of
them (``tests/golden/golden_compressed.py``), so the packing, zero points and scales are
checked against the library, not against this reader.
"""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import GOLDEN, golden, tiny
from xds_jax import LLM, SamplingParams
from xds_jax.errors import UnsupportedModelError, WeightLoadError
from xds_jax.loading.compressed import (
    CompressedScheme,
    WeightArgs,
    dequantize_module,
    unpack_int32,
)
from xds_jax.model.config_hf import load_model_config
from xds_jax.model.reference import reference_logits

SCHEMES = ["llama_w4a16", "llama_w4a16_asym", "llama_w8a8", "llama_fp8_dynamic"]
TOL = 1e-4


@pytest.mark.parametrize("name", SCHEMES)
def test_logits_match_the_library_decompression(name):
    m, g = tiny(name), golden(name)
    for i in range(3):
        logits = np.asarray(reference_logits(m.params, m.cfg, jnp.asarray(g[f"prompt_{i}"])))
        np.testing.assert_allclose(logits, g[f"logits_{i}"], atol=TOL, rtol=TOL)


def test_w4a16_checkpoint_serves_greedy_tokens_through_the_engine():
    g = golden("llama_w4a16")
    llm = LLM(str(GOLDEN / "llama_w4a16"), dtype="float32")
    outs = llm.generate([{"prompt_token_ids": g[f"prompt_{i}"].tolist()} for i in range(3)],
                        SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    for i, out in enumerate(outs):
        assert out.outputs[0].token_ids == g[f"greedy_{i}"].tolist(), f"prompt {i}"


def test_dense_packing_of_three_bit_values_across_word_boundaries():
    """Hand-worked: values are laid end to end from bit 0 of word 0; the 11th 3-bit value
    starts at bit 30 and spills into word 1."""
    rng = np.random.default_rng(0)
    values = rng.integers(-4, 4, size=(2, 40))
    stream = [sum(int(v + 4) << (3 * i) for i, v in enumerate(row)) for row in values]
    words = np.array([[(s >> (32 * w)) & 0xFFFFFFFF for w in range(4)] for s in stream],
                     np.uint32).view(np.int32)  # ceil(40 * 3 / 32) = 4 words a row
    np.testing.assert_array_equal(unpack_int32(words, 3, 40), values)


def test_group_index_maps_columns_to_their_groups():
    """Activation-ordered GPTQ (``weight_g_idx``): column j takes group g_idx[j]'s scale."""
    q = np.ones((2, 4), np.int8)
    tensors = {"m.weight": q, "m.weight_scale": np.array([[1, 10], [2, 20]], np.float32),
               "m.weight_g_idx": np.array([1, 0, 1, 0], np.int32)}
    args = WeightArgs(("Linear",), "int-quantized", 8, "int", "group", True, group_size=2)
    got = dequantize_module(tensors.__getitem__, set(tensors), "m", args)
    np.testing.assert_array_equal(got, [[10, 1, 10, 1], [20, 2, 20, 2]])


def test_config_groups_are_chosen_as_compressed_tensors_ranks_targets():
    """A target naming the module beats a ``re:`` pattern, which beats the class (``Linear``),
    whatever the groups' order: mixed-precision checkpoints list ``Linear`` first and a
    regex for the layers kept wider (their 8-bit down_proj was read as 4-bit and failed on a
    missing ``weight_shape``, a bare KeyError)."""
    w4 = WeightArgs(("Linear",), "pack-quantized", 4, "int", "group", True, group_size=32)
    w8 = WeightArgs(("re:.*down_proj$",), "int-quantized", 8, "int", "channel", True)
    named = WeightArgs(("model.layers.0.mlp.down_proj",), "int-quantized", 8, "int", "tensor",
                       True)
    scheme = CompressedScheme((w4, w8, named))
    assert scheme.args_for("model.layers.1.mlp.down_proj") is w8
    assert scheme.args_for("model.layers.0.mlp.down_proj") is named
    assert scheme.args_for("model.layers.1.mlp.up_proj") is w4
    tensors = {"m.weight_packed": np.zeros((2, 4), np.int32)}
    with pytest.raises(WeightLoadError, match="stores no m.weight_shape"):
        dequantize_module(tensors.__getitem__, set(tensors), "m", w4)


def _with_quantization(tmp_path, edit):
    out = tmp_path / "ckpt"
    shutil.copytree(GOLDEN / "llama_w4a16", out)
    cfg = json.loads((out / "config.json").read_text())
    edit(cfg["quantization_config"])
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.mark.parametrize("edit, words", [
    (lambda q: q.update(format="sparse-24-bitmask"), "format 'sparse-24-bitmask'"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(num_bits=16), "num_bits 16"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(group_size=None),
     "group_size must be a positive integer"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(strategy="token"),
     "strategy 'token'"),
    (lambda q: q.update(config_groups={}), "config_groups must be a non-empty object"),
    (lambda q: q.update(sparsity_config={"format": "sparse-24-bitmask"}),
     "sparsity_config.format 'sparse-24-bitmask'"),
])
def test_unsupported_compressed_configs_are_named(tmp_path, edit, words):
    with pytest.raises(UnsupportedModelError, match=words):
        load_model_config(_with_quantization(tmp_path, edit))
