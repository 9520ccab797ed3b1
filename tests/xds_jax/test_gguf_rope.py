"""GGUF Llama files: Llama 3.x RoPE scaling from ``rope_freqs.weight``, and named refusals.

llama.cpp's converter does not write Llama 3's ``rope_scaling`` as metadata: it stores one
divisor per rotary frequency in ``rope_freqs.weight``. The tiny golden Llama uses llama3 RoPE
(factor 8, original context 64), so a GGUF of its weights with those divisors, computed here
as ``convert_hf_to_gguf.py`` computes them, must give transformers' logits.
"""

import json
import math

import gguf
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import GOLDEN, golden
from xds_jax.errors import UnsupportedModelError
from xds_jax.loading.weights import assemble
from xds_jax.loading.weights_gguf import GGUFSource, config_from_gguf, gguf_keymap
from xds_jax.model.fused import fuse_projections
from xds_jax.model.params import param_shapes
from xds_jax.model.reference import reference_logits


def llama_cpp_rope_factors(hf: dict) -> np.ndarray:
    """``rope_freqs`` as llama.cpp's LlamaModel conversion computes it for rope_type llama3."""
    rope = hf["rope_parameters"]
    dim = hf["head_dim"]
    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    low_wavelen = rope["original_max_position_embeddings"] / rope["low_freq_factor"]
    high_wavelen = rope["original_max_position_embeddings"] / rope["high_freq_factor"]
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(rope["factor"])
        else:
            smooth = ((rope["original_max_position_embeddings"] / wavelen - rope["low_freq_factor"])
                      / (rope["high_freq_factor"] - rope["low_freq_factor"]))
            factors.append(1 / ((1 - smooth) / rope["factor"] + smooth))
    return np.array(factors, np.float32)


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's Q/K row order (per head: halves -> interleaved pairs)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


def write_llama_gguf(path, rope_freqs=True, vocab_size=True, **extra_meta) -> None:
    from safetensors.numpy import load_file

    hf = json.loads((GOLDEN / "llama" / "config.json").read_text())
    t = load_file(GOLDEN / "llama" / "model.safetensors")
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_context_length(hf["max_position_embeddings"])
    writer.add_embedding_length(hf["hidden_size"])
    writer.add_block_count(hf["num_hidden_layers"])
    writer.add_feed_forward_length(hf["intermediate_size"])
    writer.add_head_count(hf["num_attention_heads"])
    writer.add_head_count_kv(hf["num_key_value_heads"])
    writer.add_key_length(hf["head_dim"])
    writer.add_layer_norm_rms_eps(hf["rms_norm_eps"])
    writer.add_rope_freq_base(hf["rope_parameters"]["rope_theta"])
    if vocab_size:
        writer.add_vocab_size(hf["vocab_size"])
    for key, value in extra_meta.items():
        writer.add_uint32(key, value) if isinstance(value, int) else writer.add_string(key, value)
    writer.add_tensor("token_embd.weight", t["model.embed_tokens.weight"])
    writer.add_tensor("output.weight", t["lm_head.weight"])
    writer.add_tensor("output_norm.weight", t["model.norm.weight"])
    if rope_freqs:
        writer.add_tensor("rope_freqs.weight", llama_cpp_rope_factors(hf))
    names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
             "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    for i in range(hf["num_hidden_layers"]):
        for g, h in names.items():
            w = t[f"model.layers.{i}.{h}.weight"]
            if g == "attn_q":
                w = _permute(w, hf["num_attention_heads"])
            elif g == "attn_k":
                w = _permute(w, hf["num_key_value_heads"])
            writer.add_tensor(f"blk.{i}.{g}.weight", np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _load(path):
    src = GGUFSource(path)
    cfg = config_from_gguf(src.meta, set(src.names()), str(path), src.rope_freqs())
    params = assemble(cfg, src, gguf_keymap(cfg, param_shapes(cfg)), jnp.float32, False)
    return cfg, fuse_projections(params, cfg)


def test_llama3_rope_from_rope_freqs_matches_transformers(tmp_path):
    g = golden("llama")
    write_llama_gguf(tmp_path / "with.gguf")
    write_llama_gguf(tmp_path / "without.gguf", rope_freqs=False)
    cfg, params = _load(tmp_path / "with.gguf")
    assert cfg.rope.freq_factors is not None
    plain_cfg, plain = _load(tmp_path / "without.gguf")
    tokens = jnp.asarray(g["prompt_2"])
    logits = np.asarray(reference_logits(params, cfg, tokens))
    np.testing.assert_allclose(logits, g["logits_2"], atol=1e-4, rtol=1e-4)
    # Without the divisors it is another model: the scaling reaches short prompts too.
    assert np.abs(np.asarray(reference_logits(plain, plain_cfg, tokens)) - logits).max() > 1e-3


def test_a_gguf_without_tokenizer_metadata_serves_token_ids(tmp_path):
    """No ``tokenizer.*`` keys and no ``vocab_size``: the vocabulary is the embedding's rows
    and the model runs on token ids, as an HF directory without tokenizer.json (it failed
    with 'vocab_size must be a positive integer, got 0', then for want of a tokenizer)."""
    from xds_jax import LLM, SamplingParams

    g = golden("llama")
    write_llama_gguf(tmp_path / "bare.gguf", vocab_size=False)
    llm = LLM(str(tmp_path / "bare.gguf"), dtype="float32", use_param_cache=False)
    assert llm.tokenizer is None
    assert llm.cfg.vocab_size == json.loads((GOLDEN / "llama" / "config.json").read_text())[
        "vocab_size"]
    prompt = [int(t) for t in g["prompt_2"]]
    out = llm.generate([{"prompt_token_ids": prompt}],
                       SamplingParams(temperature=0, max_tokens=1))[0].outputs[0]
    assert out.token_ids == [int(np.argmax(g["logits_2"][-1]))]


def test_gguf_moe_and_unknown_rope_scaling_are_named(tmp_path):
    write_llama_gguf(tmp_path / "moe.gguf", **{"llama.expert_count": 8})
    with pytest.raises(UnsupportedModelError, match="expert_count 8"):
        _load(tmp_path / "moe.gguf")
    write_llama_gguf(tmp_path / "rope.gguf", **{"llama.rope.scaling.type": "longrope"})
    src = GGUFSource(tmp_path / "rope.gguf")
    src.meta["llama.rope.scaling.factor"] = 4.0
    with pytest.raises(UnsupportedModelError, match="rope.scaling.type 'longrope'"):
        config_from_gguf(src.meta, set(src.names()), "rope.gguf")
