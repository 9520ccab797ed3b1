"""Each supported architecture's ``config.json`` as transformers writes it with every default
(``tests/golden/default_configs.json``, from ``tests/golden/default_configs.py``): a Hub config
names only some fields and leaves the rest to these, so the loader must read the defaults as
transformers does: sizes, eps, tying, RoPE base, routing and each family's layer kinds."""

from __future__ import annotations

import json

import pytest

from tests.helpers import GOLDEN
from xds_jax.errors import ConfigError, UnsupportedModelError
from xds_jax.model.config_hf import config_from_hf_dict

DEFAULTS = json.loads((GOLDEN / "default_configs.json").read_text())["configs"]
# transformers' DeepseekV2Config leaves num_experts_per_tok None (its model cannot run so):
# every real V2 config names it, and without it the loader names the field.
# Glm4MoeConfig's default heads are 4096 / 96 = 42 wide, so RoPE on half of them is 21 dims (an
# odd width that transformers rounds up to 22 with frequencies over 21): no GLM checkpoint has
# it (GLM-4.5: head_dim 128), and the loader names it.
# Dots1Config leaves its expert counts None likewise.
UNRUNNABLE = {"DeepseekV2Config": "num_experts_per_tok", "Dots1Config": "n_routed_experts",
              "Glm4MoeConfig": "rotary dimension must be even, got 21"}


def _rope_theta(d: dict) -> float:
    params = d["rope_parameters"]
    return (params.get("full_attention") or params)["rope_theta"]


@pytest.mark.parametrize("name", sorted(set(DEFAULTS) - set(UNRUNNABLE)))
def test_transformers_defaults_read_as_transformers_reads_them(name):
    d = DEFAULTS[name]
    cfg = config_from_hf_dict(d, name)
    assert cfg.model_type == d["model_type"]
    assert (cfg.num_layers, cfg.hidden_size, cfg.vocab_size) == (
        d["num_hidden_layers"], d["hidden_size"], d["vocab_size"])
    assert cfg.num_heads == d["num_attention_heads"]
    assert cfg.num_kv_heads == (d.get("num_key_value_heads") or d["num_attention_heads"])
    if cfg.mla is None:
        assert cfg.head_dim == (d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"])
    assert cfg.rms_norm_eps == d["rms_norm_eps"]
    assert cfg.tie_word_embeddings == d["tie_word_embeddings"]
    # transformers 4 left tie_word_embeddings out of a saved config when it equalled both its
    # base default (true) and the class's: read without it, the class default holds
    untied = {k: v for k, v in d.items() if k != "tie_word_embeddings"}
    assert config_from_hf_dict(untied, name).tie_word_embeddings == d["tie_word_embeddings"]
    assert cfg.rope.theta == _rope_theta(d)
    if cfg.moe is not None:
        assert cfg.moe.num_experts_per_tok == d.get("num_experts_per_tok", d.get("moe_k"))


def test_each_family_s_distinctive_defaults():
    def read(name):
        return config_from_hf_dict(DEFAULTS[name], name)

    assert read("SmolLM3Config").nope_layers == tuple(range(3, 36, 4))  # every 4th layer
    assert read("SmolLM3Config").sliding_window is None  # use_sliding_window false
    olmo3 = read("Olmo3Config")
    assert olmo3.norm_placement == "post" and olmo3.qk_norm_scope == "whole"
    assert olmo3.local_layers == tuple(i for i in range(32) if (i + 1) % 4)
    assert olmo3.sliding_window == 4096
    gemma3 = read("Gemma3TextConfig")
    assert gemma3.norm_placement == "sandwich" and gemma3.local_rope_theta == 10000.0
    assert gemma3.local_layers == tuple(i for i in range(26) if (i + 1) % 6)
    assert read("Gemma2Config").local_layers == tuple(range(0, 26, 2))
    assert read("Qwen2Config").sliding_window is None  # use_sliding_window false
    assert read("MistralConfig").sliding_window == 4096
    olmoe = read("OlmoeConfig").moe
    assert (olmoe.num_experts, olmoe.num_experts_per_tok, olmoe.norm_topk_prob) == (64, 8, False)
    mixtral = read("MixtralConfig").moe
    assert (mixtral.num_experts, mixtral.num_experts_per_tok) == (8, 2)
    v3 = read("DeepseekV3Config")
    assert v3.moe.router == "sigmoid" and v3.moe.moe_layers[0] == 3  # first_k_dense_replace
    for name in ("GraniteMoeConfig", "GraniteMoeSharedConfig"):
        assert read(name).moe.norm_topk_prob  # top-k logits, then softmax
    ernie = read("Ernie4_5Config")  # interleaved RoPE, tied, no biases unless use_bias
    assert ernie.rope.interleaved and ernie.tie_word_embeddings and not ernie.attention_bias
    assert config_from_hf_dict(dict(DEFAULTS["Ernie4_5Config"], use_bias=True), "e").mlp_bias
    dots = config_from_hf_dict(dict(DEFAULTS["Dots1Config"], n_routed_experts=128,
                                    num_experts_per_tok=6), "Dots1Config")
    assert dots.qk_norm and not dots.moe.norm_topk_prob and dots.moe.moe_layers[0] == 0
    assert dots.sliding_window is None  # the window starts at layer 62 of 62
    seed = read("SeedOssConfig")  # q/k/v biases without o's by default
    assert seed.attention_bias and not seed.attention_out_bias and seed.head_dim == 128
    ernie_moe = read("Ernie4_5_MoeConfig").moe  # 2 shared experts, MoE from layer 1
    assert ernie_moe.router == "softmax" and ernie_moe.score_correction_bias
    assert ernie_moe.moe_layers == tuple(range(1, 28)) and ernie_moe.num_shared_experts == 2
    lite = read("Glm4MoeLiteConfig")  # MLA, interleaved RoPE, MoE after one dense layer
    assert lite.mla is not None and lite.rope.interleaved and lite.rms_norm_eps == 1e-5
    assert lite.moe.moe_layers == tuple(range(1, 47)) and lite.moe.routed_scaling_factor == 1.8
    with pytest.raises(ConfigError, match="mlp_layer_types"):
        config_from_hf_dict(dict(DEFAULTS["Glm4MoeLiteConfig"], mlp_layer_types=["moe"] * 47),
                            "bad")
    glm4 = read("Glm4Config")  # q/k/v biases, sandwich norms, interleaved half-width RoPE
    assert glm4.attention_bias and not glm4.attention_out_bias and glm4.rope.interleaved
    assert glm4.norm_placement == "sandwich" and glm4.rope_dim == 64
    assert glm4.rms_norm_eps == 1.5625e-7
    glm = config_from_hf_dict(dict(DEFAULTS["Glm4MoeConfig"], head_dim=128), "Glm4MoeConfig")
    # RoPE on half the head (in rope_parameters), one shared expert after one dense layer
    assert glm.rope.partial_rotary_factor == 0.5 and glm.rope_dim == glm.head_dim // 2
    assert glm.moe.moe_layers[0] == 1 and glm.moe.num_shared_experts == 1
    assert glm.moe.score_correction_bias and not glm.qk_norm and glm.num_mtp_layers == 1


@pytest.mark.parametrize("name", sorted(UNRUNNABLE))
def test_an_unrunnable_default_is_named(name):
    with pytest.raises(ConfigError, match=UNRUNNABLE[name]):
        config_from_hf_dict(DEFAULTS[name], name)


def test_image_text_mistral3_reads_its_text_config():
    """Mistral Small 3.1 as released: ``mistral3`` over a Mistral ``text_config``, the top
    level's dtype; its head untied unless the top level ties it; bad nesting is named."""
    text = {k: v for k, v in DEFAULTS["MistralConfig"].items() if k != "tie_word_embeddings"}
    cfg = config_from_hf_dict({"model_type": "mistral3", "torch_dtype": "bfloat16",
                               "text_config": dict(text, tie_word_embeddings=False)}, "m3")
    assert cfg.model_type == "mistral" and cfg.dtype == "bfloat16"
    assert not cfg.tie_word_embeddings and cfg.hidden_size == text["hidden_size"]
    tied = {"model_type": "mistral3", "tie_word_embeddings": True, "text_config": text}
    assert config_from_hf_dict(tied, "m3").tie_word_embeddings
    with pytest.raises(ConfigError, match="needs a text_config"):
        config_from_hf_dict({"model_type": "mistral3"}, "m3")
    with pytest.raises(UnsupportedModelError, match="'qwen2' is not supported"):
        config_from_hf_dict({"model_type": "mistral3",
                             "text_config": dict(text, model_type="qwen2")}, "m3")


# GLM-4.5's config.json as released (zai-org/GLM-4.5, transformers 4.54: rope_theta and
# partial_rotary_factor at the top level, per-expert weights, one MTP layer).
GLM_4_5 = {
    "architectures": ["Glm4MoeForCausalLM"], "model_type": "glm4_moe", "attention_bias": True,
    "eos_token_id": [151329, 151336, 151338], "pad_token_id": 151329, "head_dim": 128,
    "hidden_act": "silu", "hidden_size": 5120, "partial_rotary_factor": 0.5,
    "intermediate_size": 12288, "max_position_embeddings": 131072, "moe_intermediate_size": 1536,
    "norm_topk_prob": True, "num_attention_heads": 96, "n_group": 1, "topk_group": 1,
    "n_routed_experts": 160, "n_shared_experts": 1, "routed_scaling_factor": 2.5,
    "num_experts_per_tok": 8, "first_k_dense_replace": 3, "num_hidden_layers": 92,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 1000000,
    "num_nextn_predict_layers": 1, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "use_cache": True, "use_qk_norm": True, "vocab_size": 151552}


def test_glm_4_5_is_deepseek_s_moe_behind_grouped_query_attention():
    cfg = config_from_hf_dict(GLM_4_5, "GLM-4.5")
    assert cfg.mla is None and (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (96, 8, 128)
    assert cfg.attention_bias and not cfg.attention_out_bias  # q/k/v biases, none on o_proj
    assert cfg.qk_norm and cfg.qk_norm_scope == "head"
    assert cfg.rope.theta == 1e6 and cfg.rope_dim == 64 and not cfg.rope.interleaved
    moe = cfg.moe
    assert (moe.num_experts, moe.num_experts_per_tok, moe.moe_intermediate_size) == (160, 8, 1536)
    assert moe.router == "sigmoid" and moe.score_correction_bias and moe.norm_topk_prob
    assert (moe.n_group, moe.topk_group, moe.group_score) == (1, 1, "top2_sum")
    assert moe.routed_scaling_factor == 2.5 and moe.moe_layers == tuple(range(3, 92))
    assert (moe.num_shared_experts, moe.shared_intermediate_size) == (1, 1536)
    assert cfg.num_mtp_layers == 1 and cfg.eos_token_ids == (151329, 151336, 151338)
    # without the fields: Glm4MoeConfig's own defaults, not DeepSeek's
    bare = {k: v for k, v in GLM_4_5.items()
            if k not in ("partial_rotary_factor", "first_k_dense_replace", "n_shared_experts",
                         "use_qk_norm", "attention_bias")}
    cfg = config_from_hf_dict(bare, "GLM-4.5 bare")
    assert cfg.rope_dim == 64 and cfg.moe.moe_layers[0] == 1 and cfg.moe.num_shared_experts == 1
    assert not cfg.qk_norm and not cfg.attention_bias


# GLM-4-9B-0414's config.json as released (transformers 4.51).
GLM_4_0414 = {
    "architectures": ["Glm4ForCausalLM"], "model_type": "glm4", "attention_bias": True,
    "eos_token_id": [151329, 151336, 151338], "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 4096, "intermediate_size": 13696, "max_position_embeddings": 32768,
    "num_attention_heads": 32, "num_hidden_layers": 40, "num_key_value_heads": 2,
    "pad_token_id": 151329, "partial_rotary_factor": 0.5, "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "vocab_size": 151552}


def test_glm_4_0414_rotates_interleaved_pairs_of_half_the_head():
    cfg = config_from_hf_dict(GLM_4_0414, "GLM-4-9B-0414")
    assert cfg.moe is None and (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (32, 2, 128)
    assert cfg.rope_dim == 64 and cfg.rope.interleaved and cfg.rms_norm_eps == 1e-5
    assert cfg.norm_placement == "sandwich" and cfg.attention_bias and not cfg.attention_out_bias
    bare = {k: v for k, v in GLM_4_0414.items() if k not in ("attention_bias", "rms_norm_eps")}
    assert config_from_hf_dict(bare, "bare").attention_bias  # Glm4Config's default: true


# EXAONE 4.0 32B's config.json fields that shape its layers (layer_types left out: the
# "LLLG" pattern then builds them).
EXAONE_4_32B = {
    "model_type": "exaone4", "hidden_size": 5120, "intermediate_size": 27392, "head_dim": 128,
    "num_attention_heads": 40, "num_hidden_layers": 64, "num_key_value_heads": 8,
    "vocab_size": 102400, "rms_norm_eps": 1e-05, "rope_theta": 1000000,
    "rope_scaling": {"factor": 16.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "sliding_window": 4096, "sliding_window_pattern": "LLLG", "max_position_embeddings": 131072}


def test_exaone_4_slides_three_layers_of_four_and_leaves_the_fourth_without_rope():
    cfg = config_from_hf_dict(EXAONE_4_32B, "EXAONE-4.0-32B")
    global_layers = tuple(range(3, 64, 4))
    assert cfg.nope_layers == global_layers and cfg.sliding_window == 4096
    assert cfg.local_layers == tuple(i for i in range(64) if i not in global_layers)
    assert cfg.norm_placement == "post" and cfg.qk_norm and cfg.qk_norm_scope == "head"
    assert cfg.rope.type == "llama3" and cfg.uses_rope(0) and not cfg.uses_rope(3)
    assert config_from_hf_dict(dict(EXAONE_4_32B, sliding_window_pattern=2), "e").nope_layers \
        == tuple(range(1, 64, 2))
    plain = config_from_hf_dict(dict(EXAONE_4_32B, sliding_window=None), "no window")
    assert plain.sliding_window is None and plain.nope_layers == () and plain.uses_rope(3)
    with pytest.raises(ConfigError, match="sliding_window_pattern"):
        config_from_hf_dict(dict(EXAONE_4_32B, sliding_window_pattern="LLX"), "bad")


def test_qwen_image_text_configs_read_their_language_model():
    """Qwen2.5-VL as the Hub has it (transformers 4: text fields at the top level, RoPE typed
    "mrope") and Qwen3-VL (a text_config with interleaved mrope sections): the language
    model's config, with the plain RoPE a text-only prompt takes."""
    qwen25 = {"model_type": "qwen2_5_vl", "hidden_size": 3584, "intermediate_size": 18944,
              "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
              "vocab_size": 152064, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
              "sliding_window": 32768, "use_sliding_window": False, "max_window_layers": 28,
              "max_position_embeddings": 128000, "tie_word_embeddings": False,
              "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
              "vision_config": {"depth": 32, "hidden_size": 1280}, "torch_dtype": "bfloat16"}
    cfg = config_from_hf_dict(qwen25, "Qwen2.5-VL-7B")
    assert cfg.model_type == "qwen2" and cfg.attention_bias and cfg.rope.type == "default"
    assert cfg.rope.theta == 1e6 and cfg.sliding_window is None and cfg.head_dim == 128
    assert config_from_hf_dict(dict(qwen25, tie_word_embeddings=True), "3B").tie_word_embeddings
    qwen3 = {"model_type": "qwen3_vl", "tie_word_embeddings": False, "torch_dtype": "bfloat16",
             "text_config": {
                 "model_type": "qwen3_vl_text", "hidden_size": 4096, "head_dim": 128,
                 "intermediate_size": 12288, "num_attention_heads": 32, "num_hidden_layers": 36,
                 "num_key_value_heads": 8, "vocab_size": 151936, "rms_norm_eps": 1e-6,
                 "rope_theta": 5000000, "max_position_embeddings": 262144,
                 "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20],
                                  "rope_type": "default"}}}
    cfg = config_from_hf_dict(qwen3, "Qwen3-VL-8B")
    assert cfg.model_type == "qwen3" and cfg.qk_norm and cfg.rope.theta == 5e6
    assert cfg.dtype == "bfloat16" and not cfg.attention_bias


# MiniMax-M2's config.json as released (FP8 block-quantised weights; its MTP modules are not
# part of transformers' model and are left out).
MINIMAX_M2 = {
    "architectures": ["MiniMaxM2ForCausalLM"], "model_type": "minimax_m2", "head_dim": 128,
    "hidden_size": 3072, "intermediate_size": 1536, "max_position_embeddings": 196608,
    "num_attention_heads": 48, "num_experts_per_tok": 8, "num_hidden_layers": 62,
    "num_key_value_heads": 8, "num_local_experts": 256, "qk_norm_type": "per_layer",
    "rms_norm_eps": 1e-06, "rope_theta": 5000000, "rotary_dim": 64, "scoring_func": "sigmoid",
    "use_qk_norm": True, "use_routing_bias": True, "vocab_size": 200064,
    "shared_intermediate_size": 0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "float8_e4m3fn",
                            "quant_method": "fp8", "weight_block_size": [128, 128]}}


def test_minimax_m2_chooses_experts_by_biased_sigmoid_behind_whole_projection_norms():
    cfg = config_from_hf_dict(MINIMAX_M2, "MiniMax-M2")
    assert cfg.head_dim == 128 and cfg.rope_dim == 64 and cfg.rope.theta == 5e6
    assert cfg.qk_norm and cfg.qk_norm_scope == "whole"
    moe = cfg.moe
    assert (moe.num_experts, moe.num_experts_per_tok, moe.moe_intermediate_size) == (256, 8, 1536)
    assert moe.router == "sigmoid" and moe.score_correction_bias and moe.norm_topk_prob
    assert moe.moe_layers == tuple(range(62)) and moe.num_shared_experts == 0


def test_internlm3_spells_its_biases_as_its_attribute_map_reads_them():
    hub = {k: v for k, v in DEFAULTS["InternLM3Config"].items()
           if k not in ("attention_bias", "mlp_bias")}
    cfg = config_from_hf_dict(dict(hub, qkv_bias=True, bias=True), "internlm3-8b")
    assert cfg.attention_bias and cfg.attention_out_bias and cfg.mlp_bias and cfg.head_dim == 128
    assert not config_from_hf_dict(hub, "no biases").attention_bias
