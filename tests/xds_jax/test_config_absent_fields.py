"""A config.json that leaves fields out reads them as transformers does (each architecture's
class defaults, ``xds_jax/model/hf_class_defaults.json``), and a field of the wrong type is a
ConfigError naming it, at load rather than at the first request."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from tests.helpers import GOLDEN
from tests.xds_jax.test_config_defaults import DEFAULTS, UNRUNNABLE
from xds_jax import LLM, SamplingParams
from xds_jax.errors import ConfigError
from xds_jax.loading.loader import _cache_tag, load_config
from xds_jax.model.config_hf import config_from_hf_dict

# What a config must state (the sizes: else an error naming them), what the tokenizer's files
# give (token ids), and DeepSeek's MTP layers (none unless the config has them).
STATED = {"model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
          "bos_token_id", "eos_token_id", "pad_token_id", "num_nextn_predict_layers"}


@pytest.mark.parametrize("name", sorted(set(DEFAULTS) - set(UNRUNNABLE)))
def test_every_field_left_out_reads_as_its_transformers_default(name):
    # transformers' default config of the architecture states every field at its default, so
    # leaving any one out must read the same model
    full = DEFAULTS[name]
    want = config_from_hf_dict(full, name)
    for key in sorted(set(full) - STATED):
        got = config_from_hf_dict({k: v for k, v in full.items() if k != key}, name)
        assert got == want, f"{name} without {key!r}"


def test_defaults_that_change_the_model_where_the_field_is_absent():
    def read(model_type: str, **fields):
        base = {"model_type": model_type, "vocab_size": 64, "hidden_size": 32,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                "intermediate_size": 64, "moe_intermediate_size": 16, "num_experts_per_tok": 2}
        return config_from_hf_dict(base | fields)

    assert not read("qwen3_moe", num_experts=4).moe.norm_topk_prob  # Qwen3MoeConfig's False
    assert read("qwen3_moe", num_local_experts=4).moe.num_experts == 4  # the other spelling
    v3 = read("deepseek_v3", n_routed_experts=8, n_group=8, kv_lora_rank=16, q_lora_rank=None,
              qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, first_k_dense_replace=0)
    assert (v3.moe.routed_scaling_factor, v3.moe.num_shared_experts, v3.moe.topk_group) == (
        2.5, 1, 4)
    assert v3.mla.q_lora_rank is None  # stated null stays null
    mixtral = read("mixtral", num_local_experts=4)
    assert (mixtral.rope.theta, mixtral.rms_norm_eps) == (1e6, 1e-5)
    assert read("mixtral", num_local_experts=4, rope_theta=5e5).rope.theta == 5e5
    gemma2 = read("gemma2", head_dim=8)
    assert (gemma2.attn_softcap, gemma2.final_softcap) == (50.0, 30.0)
    assert read("gemma3_text", head_dim=8, final_logit_softcapping=30.0).final_softcap == 30.0
    qwen2_moe = read("qwen2_moe", num_experts=4)
    assert qwen2_moe.moe.shared_intermediate_size == 5632
    assert read("mistral").sliding_window == 4096 and read("mistral", sliding_window=None
                                                            ).sliding_window is None


def _llama(**fields) -> dict:
    return {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 4, "intermediate_size": 64, **fields}


@pytest.mark.parametrize("fields, named", [
    ({"rms_norm_eps": "abc"}, "rms_norm_eps must be a number"),
    ({"rms_norm_eps": [1e-5]}, "rms_norm_eps must be a number"),
    ({"eos_token_id": "</s>"}, "eos_token_id must be a token id"),
    ({"eos_token_id": [2, "x"]}, "eos_token_id must be a token id"),
    ({"rope_scaling": "linear"}, "rope_scaling must be an object"),
    ({"rope_parameters": "default"}, "rope_parameters must be an object"),
    ({"rope_parameters": {"rope_type": "linear", "factor": "two"}},
     "rope_parameters.factor must be a number"),
    ({"rope_theta": "1e4x"}, "rope_theta must be a number"),
    ({"partial_rotary_factor": "half"}, "partial_rotary_factor must be a number"),
    ({"max_position_embeddings": "2048"}, "max_position_embeddings must be an integer"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings must be true or false"),
    ({"model_type": ["llama"]}, "model_type must be a string"),
    ({"sliding_window": "4096"}, "wrong type or form"),  # no default to check it against
    ({"rope_parameters": {"rope_type": "longrope", "short_factor": [1.0, 1.1],
                          "original_max_position_embeddings": 64}},
     "short_factor has 2 factors; a rotary dimension of 8 needs 4"),
])
def test_a_field_of_the_wrong_type_or_form_is_named(fields, named):
    with pytest.raises(ConfigError, match="config: ") as error:
        config_from_hf_dict(_llama(**fields))
    assert named in str(error.value)


def test_rope_fields_transformers_derives():
    # YaRN without a factor: max_position_embeddings over the original context
    yarn = config_from_hf_dict(_llama(max_position_embeddings=256, rope_parameters={
        "rope_type": "yarn", "factor": None, "original_max_position_embeddings": 64}))
    assert yarn.rope.factor == 4.0
    # Llama 3 scaling with no context stated: LlamaConfig's 2048
    llama3 = config_from_hf_dict(_llama(rope_parameters={"rope_type": "llama3", "factor": 8.0}))
    assert llama3.rope.original_max_position_embeddings == 2048
    # 1 and 0 as booleans, 4096.0 as an integer, as transformers takes them
    loose = config_from_hf_dict(_llama(tie_word_embeddings=1, max_position_embeddings=4096.0))
    assert loose.tie_word_embeddings and loose.max_position_embeddings == 4096


def test_a_tied_config_with_a_stored_head_uses_the_head(tmp_path):
    # transformers 5 does not tie a head the checkpoint stores
    folder = tmp_path / "tied"
    shutil.copytree(GOLDEN / "llama", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"tie_word_embeddings": True}))
    prompt = {"prompt_token_ids": [5, 9, 200, 31, 7]}
    params = SamplingParams(temperature=0, max_tokens=4, logprobs=2)
    assert not load_config(folder).tie_word_embeddings  # what xds plan sizes too
    runs = []
    for path in (GOLDEN / "llama", folder):
        llm = LLM(str(path), dtype="float32", kv_cache_bytes=4 << 20, use_param_cache=False)
        assert not llm.cfg.tie_word_embeddings
        runs.append(llm.generate(prompt, params)[0].outputs[0])
    assert runs[0].token_ids == runs[1].token_ids
    first = [[lp[t].logprob for t in sorted(lp)] for lp in runs[0].logprobs]
    second = [[lp[t].logprob for t in sorted(lp)] for lp in runs[1].logprobs]
    np.testing.assert_allclose(first, second, rtol=1e-6)


def test_a_cached_parameter_tree_is_keyed_by_the_config_read_from_its_files():
    # how a config is read may change under the same files (this change gave absent fields
    # transformers' defaults): a tree cached for another reading must not be restored
    a = config_from_hf_dict(_llama())
    b = config_from_hf_dict(_llama(tie_word_embeddings=True))
    assert _cache_tag("hf", np.float32, None, a) == _cache_tag("hf", np.float32, None, a)
    assert _cache_tag("hf", np.float32, None, a) != _cache_tag("hf", np.float32, None, b)
