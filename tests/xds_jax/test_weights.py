"""Checkpoint layouts: DeepSeek MTP blocks, fused expert tensors, GGUF Q/K permutation."""

import json
import shutil

import numpy as np
from safetensors.numpy import load_file, save_file

from tests.helpers import GOLDEN
from xds_jax.loading.loader import load_model
from xds_jax.loading.weights_gguf import _unpermute
from xds_jax.model.out_major import weight_for
from xds_jax.model.reference import reference_logits


def test_deepseek_mtp_block_is_loaded(tmp_path):
    shutil.copy(GOLDEN / "deepseek_v3" / "config.json", tmp_path / "config.json")
    tensors = load_file(str(GOLDEN / "deepseek_v3" / "model.safetensors"))
    cfg = json.loads((tmp_path / "config.json").read_text())
    last, mtp = cfg["num_hidden_layers"] - 1, cfg["num_hidden_layers"]
    rng = np.random.default_rng(0)
    d = cfg["hidden_size"]
    for key in [k for k in tensors if k.startswith(f"model.layers.{last}.")]:
        tensors[key.replace(f"layers.{last}.", f"layers.{mtp}.")] = tensors[key] + 1
    tensors[f"model.layers.{mtp}.enorm.weight"] = rng.normal(size=d).astype(np.float32)
    tensors[f"model.layers.{mtp}.hnorm.weight"] = rng.normal(size=d).astype(np.float32)
    tensors[f"model.layers.{mtp}.eh_proj.weight"] = rng.normal(size=(d, 2 * d)).astype(np.float32)
    tensors[f"model.layers.{mtp}.shared_head.norm.weight"] = np.ones(d, np.float32)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    m = load_model(tmp_path, dtype="float32", use_cache=False)
    block = m.params["mtp"][0]
    eh_proj, out_major = weight_for(block, "eh_proj")  # [out, in] on CPU, as HF stores it
    hf = tensors[f"model.layers.{mtp}.eh_proj.weight"]
    np.testing.assert_array_equal(np.asarray(eh_proj), hf if out_major else hf.T)
    np.testing.assert_array_equal(
        np.asarray(block["layer"]["attn"]["kv_b"]),
        tensors[f"model.layers.{mtp}.self_attn.kv_b_proj.weight"].T)
    experts = block["layer"]["moe"]["experts"]["gate"]
    assert experts.shape[0] == cfg["n_routed_experts"]
    # The main model is untouched by the extra block.
    g = np.load(GOLDEN / "deepseek_v3" / "golden.npz")
    np.testing.assert_allclose(np.asarray(reference_logits(m.params, m.cfg, g["prompt_1"])),
                               g["logits_1"], atol=1e-4, rtol=1e-4)


def test_fused_expert_tensors_load_like_split_ones(tmp_path):
    """transformers 5 keeps experts fused in memory: gate_up [E, 2F, D], down [E, D, F]."""
    shutil.copy(GOLDEN / "qwen3_moe" / "config.json", tmp_path / "config.json")
    tensors = load_file(str(GOLDEN / "qwen3_moe" / "model.safetensors"))
    cfg = json.loads((tmp_path / "config.json").read_text())
    e = cfg.get("num_experts") or cfg["num_local_experts"]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}.mlp.experts"
        if f"{p}.0.gate_proj.weight" not in tensors:
            continue
        gate, up, down = (np.stack([tensors.pop(f"{p}.{i}.{name}.weight") for i in range(e)])
                          for name in ("gate_proj", "up_proj", "down_proj"))
        tensors[f"{p}.gate_up_proj"] = np.concatenate([gate, up], axis=1)
        tensors[f"{p}.down_proj"] = down
    save_file(tensors, str(tmp_path / "model.safetensors"))
    fused = load_model(tmp_path, dtype="float32", use_cache=False)
    g = np.load(GOLDEN / "qwen3_moe" / "golden.npz")
    np.testing.assert_allclose(np.asarray(reference_logits(fused.params, fused.cfg, g["prompt_2"])),
                               g["logits_2"], atol=1e-4, rtol=1e-4)


def test_gguf_qk_unpermute_inverts_llama_cpp_permutation():
    heads, head_dim, d = 3, 8, 5
    w = np.random.default_rng(0).normal(size=(heads * head_dim, d)).astype(np.float32)
    # llama.cpp's convert script: per head, rotate-half halves -> interleaved pairs.
    permuted = (w.reshape(heads, 2, head_dim // 2, d).swapaxes(1, 2).reshape(w.shape))
    np.testing.assert_array_equal(_unpermute(heads)(permuted), w.T)
