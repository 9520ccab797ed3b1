"""Config parsing: every spelling real checkpoints use, and a named error for each bad field."""

import copy
import dataclasses
import json
import math

import pytest

from tests.helpers import GOLDEN
from xds_jax.errors import ConfigError, ModelNotFoundError, UnsupportedModelError
from xds_jax.model.config_hf import config_from_hf_dict, load_model_config

LLAMA_V4 = {
    "model_type": "llama", "vocab_size": 100, "hidden_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96,
    "rope_theta": 500000.0, "torch_dtype": "bfloat16", "max_position_embeddings": 4096,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
}


def test_transformers_v4_and_v5_spellings_agree():
    v5 = copy.deepcopy(LLAMA_V4)
    del v5["rope_theta"], v5["torch_dtype"], v5["rope_scaling"]
    v5["dtype"] = "bfloat16"
    v5["rope_parameters"] = dict(LLAMA_V4["rope_scaling"], rope_theta=500000.0)
    assert config_from_hf_dict(LLAMA_V4) == config_from_hf_dict(v5)
    cfg = config_from_hf_dict(v5)
    assert cfg.rope.type == "llama3" and cfg.rope.theta == 500000.0 and cfg.dtype == "bfloat16"
    assert cfg.head_dim == 16


def test_deepseek_hub_spelling_and_v5_head_dim():
    hub = json.loads((GOLDEN.parent.parent / "configs/models/deepseek-v3-tiny.json").read_text())
    cfg = config_from_hf_dict(hub)
    assert cfg.rope.type == "yarn" and cfg.rope.interleaved  # rope_scaling.type, v4 style
    assert cfg.head_dim == 48  # nope + rope; transformers 5's head_dim (rope only) is ignored
    assert cfg.moe.num_experts == 256 and cfg.moe.router == "sigmoid"
    assert cfg.moe.moe_layers == (1, 2, 3)  # first_k_dense_replace = 1
    assert cfg.moe.shared_intermediate_size == 32
    v5 = load_model_config(GOLDEN / "deepseek_v3")
    assert v5.head_dim == v5.mla.qk_head_dim


def test_moe_expert_count_spellings():
    base = {"model_type": "qwen3_moe", "vocab_size": 100, "hidden_size": 32,
            "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
            "num_experts_per_tok": 2, "moe_intermediate_size": 16}
    a = config_from_hf_dict(dict(base, num_experts=8))
    b = config_from_hf_dict(dict(base, num_local_experts=8))
    assert a.moe.num_experts == b.moe.num_experts == 8


@pytest.mark.parametrize("change, error, words", [
    ({"model_type": "gpt2"}, UnsupportedModelError, "model_type 'gpt2'"),
    ({"num_attention_heads": 5}, ConfigError, "multiple of num_key_value_heads"),
    ({"hidden_size": None}, ConfigError, "'hidden_size' is missing"),
    ({"vocab_size": -3}, ConfigError, "vocab_size must be a positive integer"),
    ({"vocab_size": "lots"}, ConfigError, "vocab_size must be an integer"),
    ({"hidden_act": "quick_gelu"}, UnsupportedModelError, "hidden_act 'quick_gelu'"),
    ({"rope_scaling": {"rope_type": "longrope2"}}, UnsupportedModelError, "rope type"),
    ({"torch_dtype": "int4"}, ConfigError, "torch_dtype 'int4' is not a dtype"),
    ({"dtype": "float64"}, ConfigError, "dtype 'float64' is not a dtype"),
])
def test_bad_fields_are_named(change, error, words):
    d = dict(LLAMA_V4, **change)
    d = {k: v for k, v in d.items() if v is not None}
    with pytest.raises(error, match=words):
        config_from_hf_dict(d)


def test_moe_consistency_errors():
    d = json.loads((GOLDEN / "qwen3_moe" / "config.json").read_text())
    with pytest.raises(ConfigError, match="exceeds the number of experts"):
        config_from_hf_dict(dict(d, num_experts_per_tok=99))


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such config file"):
        load_model_config(tmp_path / "nope.json")
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_model_config(tmp_path)


# DeepSeek-V2 (236B) and V2-Lite as they ship on the Hub (transformers 4 spelling), trimmed.
DEEPSEEK_V2 = {
    "model_type": "deepseek_v2", "vocab_size": 102400, "hidden_size": 5120,
    "num_hidden_layers": 60, "num_attention_heads": 128, "num_key_value_heads": 128,
    "intermediate_size": 12288, "moe_intermediate_size": 1536, "n_routed_experts": 160,
    "n_shared_experts": 2, "num_experts_per_tok": 6, "first_k_dense_replace": 1,
    "moe_layer_freq": 1, "n_group": 8, "topk_group": 3, "topk_method": "group_limited_greedy",
    "norm_topk_prob": False, "routed_scaling_factor": 16.0, "scoring_func": "softmax",
    "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "rope_theta": 10000, "torch_dtype": "bfloat16",
    "max_position_embeddings": 163840,
    "rope_scaling": {"type": "yarn", "factor": 40, "beta_fast": 32, "beta_slow": 1,
                     "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096},
}
DEEPSEEK_V2_LITE = dict(
    DEEPSEEK_V2, hidden_size=2048, num_hidden_layers=27, num_attention_heads=16,
    num_key_value_heads=16, intermediate_size=10944, moe_intermediate_size=1408,
    n_routed_experts=64, q_lora_rank=None, n_group=1, topk_group=1, topk_method="greedy",
    routed_scaling_factor=1.0,
)


def test_deepseek_v2_and_v2_lite_spellings():
    v2 = config_from_hf_dict(DEEPSEEK_V2)
    assert v2.mla is not None and v2.mla.q_lora_rank == 1536 and v2.rope.interleaved
    assert v2.moe.router == "softmax" and not v2.moe.score_correction_bias
    assert (v2.moe.n_group, v2.moe.topk_group, v2.moe.group_score) == (8, 3, "max")
    assert v2.moe.routed_scaling_factor == 16.0 and not v2.moe.norm_topk_prob
    assert v2.moe.shared_intermediate_size == 2 * 1536 and v2.moe.moe_layers[0] == 1
    lite = config_from_hf_dict(DEEPSEEK_V2_LITE)
    assert lite.mla.q_lora_rank is None and lite.moe.n_group == 1
    # "greedy" ignores any grouping fields: top-k over all experts.
    assert config_from_hf_dict(dict(DEEPSEEK_V2_LITE, n_group=8, topk_group=3)).moe.n_group == 1
    with pytest.raises(UnsupportedModelError, match="topk_method 'noaux_tc'.*deepseek_v2"):
        config_from_hf_dict(dict(DEEPSEEK_V2, topk_method="noaux_tc"))


@pytest.mark.parametrize("qc, words", [
    ({"quant_method": "bitsandbytes", "load_in_4bit": True},
     "quant_method 'bitsandbytes' is not supported"),
    ({"quant_method": "gptq", "bits": 3, "group_size": 128}, "bits 3 is not supported for gptq"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 0}, "group_size must be -1 or a positive"),
    ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"},
     "checkpoint_format 'marlin'"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"},
     "version 'gemv' is not supported for awq"),
    ({"quant_method": "fp8", "fmt": "e5m2"}, "fmt 'e5m2'"),
    ({"quant_method": "fp8", "weight_block_size": [128]}, "weight_block_size must be two"),
    ({"quant_method": "fp8", "weight_block_size": [0, 128]}, "weight_block_size must be two"),
    ("fp8", "quantization_config must be an object"),
])
def test_checkpoint_quantization_is_refused_by_name(qc, words):
    with pytest.raises(UnsupportedModelError, match=words):
        config_from_hf_dict(dict(LLAMA_V4, quantization_config=qc))


def test_fp8_quantization_config_is_accepted():
    fp8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
           "weight_block_size": [128, 128]}
    assert config_from_hf_dict(dict(DEEPSEEK_V2, quantization_config=fp8)).mla is not None


PHI35_MINI = {
    "model_type": "phi3", "vocab_size": 32064, "hidden_size": 3072, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 32, "intermediate_size": 8192,
    "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
    "rope_theta": 10000.0, "sliding_window": 262144, "torch_dtype": "bfloat16",
    "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 48,
                     "long_factor": [2.0] * 48},
}


def test_phi3_longrope_serves_its_original_context():
    cfg = config_from_hf_dict(PHI35_MINI)
    assert cfg.rope.type == "longrope" and cfg.rope.freq_factors == (1.0,) * 48
    assert cfg.max_position_embeddings == 4096  # the short factors' context
    assert cfg.rope.attention_factor == pytest.approx((1 + math.log(32) / math.log(4096)) ** 0.5)
    su = dict(PHI35_MINI, rope_scaling=dict(PHI35_MINI["rope_scaling"], type="su"))
    assert config_from_hf_dict(su) == cfg  # Phi-3-mini-128k's first spelling
    plain = config_from_hf_dict(dict(PHI35_MINI, rope_scaling=None, max_position_embeddings=4096,
                                     sliding_window=2047))  # Phi-3-mini-4k
    assert plain.rope.type == "default" and plain.sliding_window == 2047
    with pytest.raises(ConfigError, match="longrope needs short_factor"):
        config_from_hf_dict(dict(PHI35_MINI, rope_scaling={"type": "longrope"}))


def test_granite_multipliers():
    d = json.loads((GOLDEN / "granite" / "config.json").read_text())
    tied = config_from_hf_dict(d)
    assert tied.attention_multiplier == 0.125 and tied.residual_multiplier == 0.22
    # The tied head reads the table the embedding multiplier scales: the logits undo it.
    assert tied.logits_scale == pytest.approx(1 / (4.0 * 12.0))
    untied = config_from_hf_dict(dict(d, tie_word_embeddings=False))
    assert untied.logits_scale == pytest.approx(1 / 4.0)
    with pytest.raises(ConfigError, match="residual_multiplier must be a number, got 'big'"):
        config_from_hf_dict(dict(d, residual_multiplier="big"))
    with pytest.raises(ConfigError, match="residual_multiplier must be a positive number"):
        config_from_hf_dict(dict(d, residual_multiplier=-1.0))


GEMMA3_1B_V4 = {  # google/gemma-3-1b-it as transformers 4 wrote it, trimmed
    "model_type": "gemma3_text", "vocab_size": 262144, "hidden_size": 1152,
    "num_hidden_layers": 26, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
    "intermediate_size": 6912, "max_position_embeddings": 32768, "query_pre_attn_scalar": 256,
    "rope_theta": 1000000, "rope_local_base_freq": 10000, "rope_scaling": None,
    "sliding_window": 512, "sliding_window_pattern": 6, "hidden_activation": "gelu_pytorch_tanh",
    "final_logit_softcapping": None, "attn_logit_softcapping": None, "torch_dtype": "bfloat16",
}


def test_gemma_spellings():
    g3 = config_from_hf_dict(GEMMA3_1B_V4)
    assert g3.local_layers == tuple(i for i in range(26) if (i + 1) % 6)  # 5 local : 1 global
    assert g3.local_rope_theta == 10000.0 and g3.rope.theta == 1e6 and g3.qk_norm
    assert g3.attention_multiplier == 256 ** -0.5 and g3.norm_placement == "sandwich"
    assert g3.tie_word_embeddings
    assert g3.logits_scale == pytest.approx(1152 ** -0.5)
    assert g3.embedding_multiplier == pytest.approx(1152 ** 0.5)
    assert not g3.is_local_layer(5) and g3.is_local_layer(6)
    v5 = dict(GEMMA3_1B_V4, layer_types=["sliding_attention" if (i + 1) % 6 else "full_attention"
                                         for i in range(26)])
    assert config_from_hf_dict(v5) == g3
    g2 = config_from_hf_dict(dict(GEMMA3_1B_V4, model_type="gemma2", sliding_window=4096,
                                  attn_logit_softcapping=50.0, final_logit_softcapping=30.0))
    assert g2.local_layers == tuple(range(0, 26, 2)) and g2.local_rope_theta is None
    assert (g2.attn_softcap, g2.final_softcap) == (50.0, 30.0) and not g2.qk_norm
    g1 = config_from_hf_dict(dict(GEMMA3_1B_V4, model_type="gemma", hidden_act="gelu"))
    assert g1.norm_placement == "pre" and g1.sliding_window is None and g1.mlp_act == "gelu_tanh"
    with pytest.raises(UnsupportedModelError, match="hidden_activation 'relu'"):
        config_from_hf_dict(dict(GEMMA3_1B_V4, hidden_activation="relu"))


def test_qwen_sliding_window_covers_the_layers_from_max_window_layers():
    """As transformers builds Qwen's layer_types: layers i >= max_window_layers slide."""
    d = dict(json.loads((GOLDEN / "qwen2" / "config.json").read_text()), sliding_window=8)
    d.pop("layer_types", None)
    assert config_from_hf_dict(d).sliding_window is None  # use_sliding_window false
    some = config_from_hf_dict(dict(d, use_sliding_window=True, max_window_layers=1))
    assert some.sliding_window == 8 and some.local_layers == (1, 2)
    assert not some.is_local_layer(0) and some.is_local_layer(2)
    none = config_from_hf_dict(dict(d, use_sliding_window=True, max_window_layers=3))
    assert none.sliding_window is None  # no layer reaches max_window_layers
    listed = config_from_hf_dict(dict(d, use_sliding_window=True, layer_types=[
        "sliding_attention", "full_attention", "full_attention"]))
    assert listed.local_layers == (0,)
    mistral = config_from_hf_dict(dict(LLAMA_V4, model_type="mistral", sliding_window=4096))
    assert mistral.sliding_window == 4096 and mistral.local_layers is None
    assert mistral.is_local_layer(0) and mistral.is_local_layer(None)


def test_image_text_gemma3_config_leans_on_the_text_defaults():
    """gemma-3-4b-it's config.json: a text_config naming only what differs from
    Gemma3TextConfig's defaults; the top level holds the token ids."""
    hub = {"model_type": "gemma3", "eos_token_id": [1, 106], "torch_dtype": "bfloat16",
           "text_config": {"hidden_size": 2560, "intermediate_size": 10240,
                           "model_type": "gemma3_text", "num_hidden_layers": 34,
                           "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                           "sliding_window": 1024},
           "vision_config": {"model_type": "siglip_vision_model"}}
    cfg = config_from_hf_dict(hub)
    assert (cfg.model_type, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
        "gemma3_text", 8, 4, 256)
    assert cfg.rope.type == "linear" and cfg.rope.factor == 8.0 and cfg.rope.theta == 1e6
    assert cfg.local_rope_theta == 1e4 and cfg.sliding_window == 1024
    assert cfg.eos_token_ids == (1, 106) and cfg.vocab_size == 262208
    assert cfg.local_layers == tuple(i for i in range(34) if (i + 1) % 6)
    with pytest.raises(ConfigError, match="gemma3 needs a text_config"):
        config_from_hf_dict({"model_type": "gemma3"})


SMOLLM3_3B = {  # HuggingFaceTB/SmolLM3-3B's config.json (transformers 4 spelling), trimmed
    "model_type": "smollm3", "vocab_size": 128256, "hidden_size": 2048,
    "intermediate_size": 11008, "num_hidden_layers": 36, "num_attention_heads": 16,
    "num_key_value_heads": 4, "max_position_embeddings": 65536, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 5000000.0, "sliding_window": None,
    "use_sliding_window": False, "no_rope_layer_interval": 4,
    "no_rope_layers": [int((i + 1) % 4 != 0) for i in range(36)],
    "layer_types": ["full_attention"] * 36, "eos_token_id": 128012, "torch_dtype": "bfloat16",
}


def test_smollm3_layers_without_rope():
    cfg = config_from_hf_dict(SMOLLM3_3B)
    assert cfg.nope_layers == tuple(range(3, 36, 4)) and cfg.tie_word_embeddings
    assert cfg.rope.theta == 5e6 and cfg.sliding_window is None
    assert not cfg.uses_rope(3) and cfg.uses_rope(4) and cfg.uses_rope(None)
    # One attention program per kind: rotated layers share layer 0's, NoPE layers layer 3's.
    assert [cfg.attention_kind_layer(i) for i in (0, 2, 3, 7, 36)] == [0, 0, 3, 3, 0]
    derived = dict(SMOLLM3_3B, no_rope_layers=None, layer_types=None)
    assert config_from_hf_dict(derived) == cfg  # from no_rope_layer_interval
    bare = {k: v for k, v in SMOLLM3_3B.items() if k not in ("rope_theta", "no_rope_layers")}
    assert config_from_hf_dict(bare).rope.theta == 2e6  # SmolLM3Config's default base
    # use_sliding_window: the window covers the NoPE layers, as SmolLM3Config's layer_types.
    sliding = config_from_hf_dict(dict(derived, use_sliding_window=True, sliding_window=64))
    assert sliding.local_layers == cfg.nope_layers and sliding.sliding_window == 64
    assert [sliding.attention_kind(i) for i in (0, 3)] == [(False, True), (True, False)]
    with pytest.raises(ConfigError, match="no_rope_layers must list 0 or 1"):
        config_from_hf_dict(dict(SMOLLM3_3B, no_rope_layers=[1, 0]))
    with pytest.raises(ConfigError, match="no_rope_layer_interval must be a positive"):
        config_from_hf_dict(dict(derived, no_rope_layer_interval=0))
    with pytest.raises(ConfigError, match="layer_types must list"):
        config_from_hf_dict(dict(SMOLLM3_3B, use_sliding_window=True, sliding_window=64,
                                 layer_types=["local"] * 36))


OLMO2_7B = {  # allenai/OLMo-2-1124-7B's config.json, trimmed
    "model_type": "olmo2", "vocab_size": 100352, "hidden_size": 4096,
    "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 32, "max_position_embeddings": 4096, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 500000, "attention_bias": False,
    "tie_word_embeddings": False, "eos_token_id": 100257, "torch_dtype": "float32",
}


def test_olmo2_post_norms_and_whole_qk_norms():
    from xds_jax.model.params import param_shapes

    cfg = config_from_hf_dict(OLMO2_7B)
    assert (cfg.norm_placement, cfg.qk_norm, cfg.qk_norm_scope) == ("post", True, "whole")
    assert cfg.rms_norm_eps == 1e-6 and cfg.rope.theta == 5e5 and not cfg.tie_word_embeddings
    gqa = config_from_hf_dict(dict(OLMO2_7B, num_key_value_heads=8, rms_norm_eps=None))
    assert gqa.rms_norm_eps == 1e-5  # Olmo2Config's default
    attn = param_shapes(gqa)["layers"][0]["attn"]
    assert attn["q_norm"] == (4096,) and attn["k_norm"] == (1024,)  # whole q and k
    with pytest.raises(ConfigError, match="norm_placement must be one of"):
        dataclasses.replace(cfg, norm_placement="middle")
    with pytest.raises(ConfigError, match="qk_norm_scope must be one of"):
        dataclasses.replace(cfg, qk_norm_scope="half")


def test_olmo3_sliding_layers_and_their_rope():
    v4 = dict(OLMO2_7B, model_type="olmo3", sliding_window=4096,
              rope_scaling={"rope_type": "yarn", "factor": 8.0,
                            "original_max_position_embeddings": 8192})
    cfg = config_from_hf_dict(v4)
    assert cfg.local_layers == tuple(i for i in range(32) if (i + 1) % 4)  # 3 local : 1 full
    assert cfg.rope.type == "yarn" and cfg.rope.theta == 5e5 and cfg.local_rope_theta == 5e5
    v5 = dict(v4, rope_scaling=None, rope_theta=None, layer_types=[
        "sliding_attention" if (i + 1) % 4 else "full_attention" for i in range(32)],
        rope_parameters={
            "full_attention": {"rope_type": "yarn", "factor": 8.0, "rope_theta": 500000,
                               "original_max_position_embeddings": 8192},
            "sliding_attention": {"rope_type": "default", "rope_theta": 500000}})
    assert config_from_hf_dict(v5) == cfg
    bad = dict(v5, rope_parameters=dict(v5["rope_parameters"], sliding_attention={
        "rope_type": "linear", "factor": 2.0}))
    with pytest.raises(UnsupportedModelError, match="sliding_attention.rope_type 'linear'"):
        config_from_hf_dict(bad)


OLMOE_1B_7B = {  # the sizes and fields of allenai/OLMoE-1B-7B-0924's config.json, trimmed
    "model_type": "olmoe", "vocab_size": 50304, "hidden_size": 2048, "intermediate_size": 1024,
    "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 16,
    "max_position_embeddings": 4096, "rope_theta": 10000.0, "rope_scaling": None,
    "rms_norm_eps": 1e-05, "num_experts": 64, "num_experts_per_tok": 8, "norm_topk_prob": False,
    "clip_qkv": None, "tie_word_embeddings": False, "eos_token_id": 50279, "pad_token_id": 1,
}


def test_olmoe_pre_norms_whole_qk_norms_and_moe_on_every_layer():
    cfg = config_from_hf_dict(OLMOE_1B_7B)
    assert (cfg.norm_placement, cfg.qk_norm, cfg.qk_norm_scope) == ("pre", True, "whole")
    moe = cfg.moe
    assert (moe.num_experts, moe.num_experts_per_tok, moe.moe_intermediate_size) == (64, 8, 1024)
    assert moe.router == "softmax" and not moe.norm_topk_prob and not moe.num_shared_experts
    assert moe.moe_layers == tuple(range(16))
    defaults = {k: v for k, v in OLMOE_1B_7B.items()
                if k not in ("rms_norm_eps", "num_experts", "num_experts_per_tok",
                             "norm_topk_prob")}
    assert config_from_hf_dict(defaults) == cfg  # OlmoeConfig's defaults
    assert config_from_hf_dict(dict(OLMOE_1B_7B, norm_topk_prob=True)).moe.norm_topk_prob
    assert load_model_config(GOLDEN / "olmoe").qk_norm_scope == "whole"
    with pytest.raises(UnsupportedModelError, match="clip_qkv 8.0 is not supported"):
        config_from_hf_dict(dict(OLMOE_1B_7B, clip_qkv=8.0))
    with pytest.raises(ConfigError, match="norm_topk_prob must be true or false"):
        config_from_hf_dict(dict(OLMOE_1B_7B, norm_topk_prob="yes"))
    with pytest.raises(ConfigError, match="num_experts_per_tok .9. exceeds"):
        config_from_hf_dict(dict(OLMOE_1B_7B, num_experts=8, num_experts_per_tok=9))


GRANITE_MOE_3B = {  # the sizes and multipliers of ibm-granite/granite-3.1-3b-a800m, trimmed
    "model_type": "granitemoe", "vocab_size": 49155, "hidden_size": 1536,
    "intermediate_size": 512, "num_hidden_layers": 32, "num_attention_heads": 24,
    "num_key_value_heads": 8, "max_position_embeddings": 131072, "rope_theta": 10000000.0,
    "rms_norm_eps": 1e-06, "num_local_experts": 40, "num_experts_per_tok": 8,
    "embedding_multiplier": 12.0, "residual_multiplier": 0.22, "attention_multiplier": 0.015625,
    "logits_scaling": 6.0, "tie_word_embeddings": True, "hidden_act": "silu",
}


def test_granite_moe_multipliers_renormalised_routing_and_shared_mlp():
    cfg = config_from_hf_dict(GRANITE_MOE_3B)
    assert cfg.attention_multiplier == 0.015625 and cfg.residual_multiplier == 0.22
    assert cfg.logits_scale == pytest.approx(1 / (6.0 * 12.0))  # tied: undoes the embedding's
    moe = cfg.moe
    assert (moe.num_experts, moe.num_experts_per_tok, moe.moe_intermediate_size) == (40, 8, 512)
    # softmax over the top-k logits is the softmax over all experts, top-k, renormalised
    assert moe.router == "softmax" and moe.norm_topk_prob and not moe.num_shared_experts
    assert moe.moe_layers == tuple(range(32)) and not cfg.qk_norm
    shared = config_from_hf_dict(dict(GRANITE_MOE_3B, model_type="granitemoeshared",
                                      shared_intermediate_size=1024)).moe
    assert (shared.num_shared_experts, shared.shared_intermediate_size) == (1, 1024)
    assert not shared.shared_expert_gate  # added as it is, unlike Qwen2-MoE's gated one
    plain = config_from_hf_dict(dict(GRANITE_MOE_3B, model_type="granitemoeshared"))
    assert plain.moe == moe  # shared_intermediate_size 0 (the default): no shared MLP
    with pytest.raises(ConfigError, match="num_local_experts must be an integer"):
        config_from_hf_dict(dict(GRANITE_MOE_3B, num_local_experts="many"))
    with pytest.raises(ConfigError, match="logits_scaling must be a positive number"):
        config_from_hf_dict(dict(GRANITE_MOE_3B, logits_scaling=0))
    with pytest.raises(ConfigError, match="shared_intermediate_size must be an integer"):
        config_from_hf_dict(dict(GRANITE_MOE_3B, model_type="granitemoeshared",
                                 shared_intermediate_size=1.5))
