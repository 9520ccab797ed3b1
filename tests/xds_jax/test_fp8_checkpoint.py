"""FP8 block-quantised checkpoints (DeepSeek-V3's official format) load against transformers.

``tests/golden/deepseek_v3_fp8`` is the tiny DeepSeek-V3 re-quantised as DeepSeek ships its
weights (``float8_e4m3fn`` + ``weight_scale_inv`` per ``[32, 32]`` block); its
``golden.npz`` is transformers' output for that directory (``tests/golden/golden_fp8.py``).
"""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import GOLDEN, golden, tiny
from xds_jax import LLM, SamplingParams
from xds_jax.errors import WeightLoadError
from xds_jax.loading.loader import load_model
from xds_jax.model.reference import reference_logits

NAME = "deepseek_v3_fp8"
TOL = 1e-4


def test_fp8_logits_match_transformers_and_differ_from_the_float_model():
    m, g = tiny(NAME), golden(NAME)
    float_model = tiny("deepseek_v3")
    for i in range(3):
        tokens = jnp.asarray(g[f"prompt_{i}"])
        logits = np.asarray(reference_logits(m.params, m.cfg, tokens))
        np.testing.assert_allclose(logits, g[f"logits_{i}"], atol=TOL, rtol=TOL)
        # The scales matter: the unscaled FP8 values or the float32 originals would not do.
        unquantised = np.asarray(reference_logits(float_model.params, float_model.cfg, tokens))
        assert np.abs(unquantised - logits).max() > 100 * TOL


def test_fp8_checkpoint_serves_through_the_engine():
    g = golden(NAME)
    llm = LLM(str(GOLDEN / NAME), dtype="float32")
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": g[f"prompt_{i}"].tolist()} for i in range(3)],
                        params)
    for i, out in enumerate(outs):
        assert out.outputs[0].token_ids == g[f"greedy_{i}"].tolist(), f"prompt {i}"


def test_fp8_checkpoint_requantises_to_int8():
    m = load_model(GOLDEN / NAME, dtype="bfloat16", quantization="int8", use_cache=False)
    tokens = jnp.asarray(golden(NAME)["prompt_2"])
    logits = np.asarray(reference_logits(m.params, m.cfg, tokens), np.float32)
    want = golden(NAME)["logits_2"]
    assert (logits.argmax(-1) == want.argmax(-1)).mean() >= 0.9


def _copy(tmp_path, edit_config=None, edit_tensors=None):
    out = tmp_path / "ckpt"
    shutil.copytree(GOLDEN / NAME, out)
    if edit_config:
        cfg = json.loads((out / "config.json").read_text())
        edit_config(cfg)
        (out / "config.json").write_text(json.dumps(cfg))
    return out


def test_fp8_weights_without_a_declared_quantization_are_refused(tmp_path):
    path = _copy(tmp_path, lambda c: c.pop("quantization_config"))
    with pytest.raises(WeightLoadError, match="float8_e4m3fn.*declares no quantization_config"):
        load_model(path, dtype="float32", use_cache=False)


def test_scales_that_do_not_tile_the_declared_blocks_are_refused(tmp_path):
    path = _copy(tmp_path, lambda c: c["quantization_config"].update(weight_block_size=[16, 16]))
    with pytest.raises(WeightLoadError, match=r"_scale_inv'.*expected .* in blocks of \[16, 16\]"):
        load_model(path, dtype="float32", use_cache=False)


def test_ragged_edge_blocks_follow_the_declared_block_size():
    """Hand-worked, DeepSeek's reference semantics: block (i, j) of a [2, 3] grid covers rows
    2i..2i+1 and columns 3j..3j+2, the last block in each direction cut short (5 x 4 weight)."""
    from xds_jax.loading.checkpoint_quant import dequantize_fp8

    w = np.arange(1, 21, dtype=np.float32).reshape(5, 4)
    s = np.array([[1, 10], [100, 1000], [-1, -10]], np.float32)  # [ceil(5/2), ceil(4/3)]
    want = w * np.array([[1, 1, 1, 10]] * 2 + [[100, 100, 100, 1000]] * 2
                        + [[-1, -1, -1, -10]], np.float32)
    np.testing.assert_array_equal(dequantize_fp8(w, s, (2, 3), "w"), want)
    with pytest.raises(WeightLoadError, match=r"expected \(3, 2\)"):
        dequantize_fp8(w, s[:2], (2, 3), "w")
    np.testing.assert_array_equal(dequantize_fp8(w, np.float32(0.5), None, "w"), w / 2)
