"""GPTQ (v1 and v2 zero points, act-order) and AutoAWQ GEMM checkpoints load exactly.

``tests/golden/llama_gptq_int4`` (4-bit, groups of 32, act-order ``g_idx``, v1 zeros),
``llama_gptq_int8`` (8-bit, one group, ``gptq_v2``) and ``llama_awq`` (4-bit GEMM, groups of
32) pack the tiny Llama's projections as those libraries write them; ``golden.npz`` is
transformers' Llama on the weights dequantised from the integers before packing
(``tests/golden/golden_gptq.py``).
"""

import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import golden, tiny
from xds_jax.loading.gptq_awq import GroupQuantScheme, dequantize_group_quant
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
