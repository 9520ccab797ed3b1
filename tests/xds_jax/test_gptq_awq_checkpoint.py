"""GPTQ (v1 and v2 zero points, act-order) and AutoAWQ GEMM checkpoints load exactly.

``tests/golden/llama_gptq_int4`` (4-bit, groups of 32, act-order ``g_idx``, v1 zeros),
``llama_gptq_int8`` (8-bit, one group, ``gptq_v2``) and ``llama_awq`` (4-bit GEMM, groups of
32) pack the tiny Llama's projections as those libraries write them; ``golden.npz`` is
transformers' Llama on the weights dequantised from the integers before packing
(``tests/golden/golden_gptq.py``).
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import golden, tiny
from xds_jax.errors import UnsupportedModelError, WeightLoadError
from xds_jax.loading.gptq_awq import GroupQuantScheme, dequantize_group_quant, parse_gptq_awq
from xds_jax.model.reference import reference_logits


@pytest.mark.parametrize("name", ["llama_gptq_int4", "llama_gptq_int8", "llama_awq"])
def test_logits_match_the_weights_before_packing(name):
    m, g = tiny(name), golden(name)
    for i in range(3):
        logits = np.asarray(reference_logits(m.params, m.cfg, jnp.asarray(g[f"prompt_{i}"])))
        np.testing.assert_allclose(logits, g[f"logits_{i}"], atol=1e-4, rtol=1e-4)


def test_awq_interleaved_outputs_and_gptq_v1_zero_offset_by_hand():
    """One input row, 8 outputs with codes 0..7 (AWQ word nibbles in order 0,2,4,6,1,3,5,7),
    zero 1, scale 2: weight[o] = (o - 1) * 2. The same codes as GPTQ v1 (nibble j = output j
    of qzeros; stored zero 0 means 1)."""
    codes = np.arange(8)
    awq_word = sum(int(codes[o]) << (4 * i) for i, o in enumerate((0, 2, 4, 6, 1, 3, 5, 7)))
    zero_word = sum(1 << (4 * i) for i in range(8))
    tensors = {"m.qweight": np.array([[awq_word]], np.uint32).view(np.int32),
               "m.qzeros": np.array([[zero_word]], np.uint32).view(np.int32),
               "m.scales": np.full((1, 8), 2, np.float16)}
    awq = GroupQuantScheme("awq", 4, -1, 0)
    got = dequantize_group_quant(tensors.__getitem__, set(tensors), "m", awq)
    np.testing.assert_array_equal(got[:, 0], (codes - 1) * 2)  # [out, in]
    # GPTQ packs 8 inputs per word; here 8 inputs of one output, codes 0..7, v1 zero 0 -> 1.
    tensors = {"m.qweight": np.array([[sum(c << (4 * c) for c in range(8))]],
                                     np.uint32).view(np.int32),
               "m.qzeros": np.zeros((1, 1), np.int32), "m.scales": np.full((1, 1), 2, np.float16)}
    got = dequantize_group_quant(tensors.__getitem__, set(tensors), "m",
                                 GroupQuantScheme("gptq", 4, -1, 1))
    np.testing.assert_array_equal(got[0], (codes - 1) * 2)


def _gptq_module(codes_in_out: np.ndarray, scales: np.ndarray, bits: int) -> dict:
    """A GPTQ v2 module: ``codes [in, out]`` packed along the inputs, zeros 0."""
    per = 32 // bits
    n_in, out = codes_in_out.shape
    words = np.zeros((n_in // per, out), np.uint32)
    for j in range(per):
        words |= codes_in_out[j::per].astype(np.uint32) << np.uint32(j * bits)
    return {"m.qweight": words.view(np.int32),
            "m.qzeros": np.zeros((scales.shape[0], out * bits // 32), np.int32),
            "m.scales": scales.astype(np.float16)}


def test_gptq_model_dynamic_overrides_bits_and_group_size_per_module():
    """GPTQModel's ``dynamic``: the first matching pattern sets the module's bits and group
    size. The module below is packed 8-bit in groups of 4: read with the global 4 bits and
    groups of 8 it was refused with a wrong reason, or (groups only) read wrong silently."""
    codes = np.arange(16 * 8).reshape(16, 8) % 200
    scales = np.repeat(np.array([[1.0], [2.0], [3.0], [4.0]]), 8, axis=1)
    packed = _gptq_module(codes, scales, 8)
    tensors = {f"x.{k}": v for k, v in packed.items()} | {f"x.up.{k[2:]}": v
                                                         for k, v in packed.items()}
    scheme = parse_gptq_awq({"quant_method": "gptq", "bits": 4, "group_size": 8,
                             "checkpoint_format": "gptq_v2", "dynamic": {
                                 "-:.*up": {}, "+:.*\\.m$": {"bits": 8, "group_size": 4}}},
                            "cfg")
    got = dequantize_group_quant(tensors.__getitem__, set(tensors), "x.m", scheme)
    np.testing.assert_array_equal(got, (codes * np.repeat([1, 2, 3, 4], 4)[:, None]).T)
    plain = dataclasses.replace(scheme, dynamic=(), bits=8)  # groups of 8: 2, but 4 stored
    with pytest.raises(WeightLoadError, match="scales hold 4 groups, but group_size 8 over 16"):
        dequantize_group_quant(tensors.__getitem__, set(tensors), "x.m", plain)
    with pytest.raises(WeightLoadError, match="leaves it unquantised"):
        dequantize_group_quant(tensors.__getitem__, set(tensors), "x.up", scheme)
    with pytest.raises(UnsupportedModelError, match=r"dynamic\['\+:m'\].bits 3"):
        parse_gptq_awq({"quant_method": "gptq", "bits": 4, "dynamic": {"+:m": {"bits": 3}}},
                       "cfg")
