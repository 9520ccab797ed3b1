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
UNRUNNABLE = {"DeepseekV2Config": "num_experts_per_tok"}


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
        assert cfg.moe.num_experts_per_tok == d["num_experts_per_tok"]


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


def test_a_default_without_top_k_is_named():
    with pytest.raises(ConfigError, match="num_experts_per_tok"):
        config_from_hf_dict(DEFAULTS["DeepseekV2Config"], "DeepseekV2Config")


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
