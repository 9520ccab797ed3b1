"""Config spellings transformers reads that were missed or misread (a black-box comparison
against transformers 5.24 on tiny checkpoints), each checked against what transformers does."""

from __future__ import annotations

import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import GOLDEN
from tests.xds_jax.test_config import GEMMA3_1B_V4, LLAMA_V4
from xds_jax.errors import ConfigError, UnsupportedModelError
from xds_jax.loading.loader import load_config
from xds_jax.model.config_hf import config_from_hf_dict
from xds_jax.model.layers import swiglu

SMALL = {"vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64,
         "num_experts_per_tok": 2}


def test_expert_counts_in_either_spelling():
    """transformers' attribute maps let Mixtral, OLMoE and DeepSeek write the expert count
    as num_experts, num_local_experts or n_routed_experts (Mixtral and DeepSeek-V2 with
    num_experts were refused; OLMoE with num_local_experts silently took 64)."""
    for model_type, spelling in (("mixtral", "num_experts"), ("olmoe", "num_local_experts")):
        cfg = config_from_hf_dict(dict(SMALL, model_type=model_type, **{spelling: 6}))
        assert cfg.moe.num_experts == 6, model_type
    hub = json.loads((GOLDEN.parent.parent / "configs/models/deepseek-v3-tiny.json").read_text())
    count = hub.pop("n_routed_experts")
    assert config_from_hf_dict(dict(hub, num_experts=count)).moe.num_experts == count


@pytest.mark.parametrize("types", [["local", "global"] * 13, ["sliding_attention"] * 20])
def test_gemma_layer_types_are_checked(types):
    """Unknown kinds and a list shorter than the layers are refused, as transformers does
    (they loaded: no sliding layers, or the missing ones full)."""
    with pytest.raises(ConfigError, match="layer_types must list"):
        config_from_hf_dict(dict(GEMMA3_1B_V4, layer_types=types))


def test_gemma3_caps_only_its_final_logits():
    """transformers' Gemma 3 reads no attn_logit_softcapping (its checkpoints set it null);
    Gemma 2 caps both."""
    capped = dict(GEMMA3_1B_V4, attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
    g3 = config_from_hf_dict(capped)
    assert (g3.attn_softcap, g3.final_softcap) == (None, 30.0)
    g2 = config_from_hf_dict(dict(capped, model_type="gemma2"))
    assert (g2.attn_softcap, g2.final_softcap) == (50.0, 30.0)


def test_gelu_is_exact_for_gemma_2_and_3_and_the_tanh_form_for_gemma():
    for model_type, act in (("gemma", "gelu_tanh"), ("gemma2", "gelu"), ("gemma3_text", "gelu")):
        cfg = config_from_hf_dict(dict(GEMMA3_1B_V4, model_type=model_type,
                                       hidden_activation="gelu"))
        assert cfg.mlp_act == act, model_type
    assert config_from_hf_dict(GEMMA3_1B_V4).mlp_act == "gelu_tanh"  # gelu_pytorch_tanh
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 8)).astype(np.float32) * 3
    gate, up, down = (rng.standard_normal(s).astype(np.float32) for s in
                      ((8, 5), (8, 5), (5, 8)))
    p = {"gate": jnp.asarray(gate), "up": jnp.asarray(up), "down": jnp.asarray(down)}
    with jax.default_matmul_precision("highest"):
        got = np.asarray(swiglu(p, jnp.asarray(x), "gelu"))
    g = x.astype(np.float64) @ gate
    exact = 0.5 * g * (1 + np.vectorize(math.erf)(g / math.sqrt(2)))
    np.testing.assert_allclose(got, (exact * (x @ up)) @ down, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rope_type", ["llama3", "linear", "dynamic"])
def test_scaled_rope_without_a_factor_is_named(rope_type):
    """transformers raises on these; it loaded as factor 1."""
    scaling = {k: v for k, v in LLAMA_V4["rope_scaling"].items() if k != "factor"}
    with pytest.raises(ConfigError, match=f"{rope_type} RoPE needs a factor in rope_scaling"):
        config_from_hf_dict(dict(LLAMA_V4, rope_scaling=dict(scaling, rope_type=rope_type)))


def test_a_config_without_a_dtype_takes_the_weights(tmp_path):
    """No dtype / torch_dtype key: ``dtype="auto"`` reads the weights' own, as transformers
    does (it took bfloat16 for float32 weights)."""
    from safetensors.flax import load_file, save_file

    model = tmp_path / "llama"
    shutil.copytree(GOLDEN / "llama", model)
    config = json.loads((model / "config.json").read_text())
    for key in ("dtype", "torch_dtype"):
        config.pop(key, None)
    (model / "config.json").write_text(json.dumps(config))
    assert load_config(model).dtype == "float32"
    weights = load_file(str(model / "model.safetensors"))
    save_file({k: v.astype(jnp.bfloat16) for k, v in weights.items()},
              str(model / "model.safetensors"))
    assert load_config(model).dtype == "bfloat16"
    (model / "config.json").write_text(json.dumps(dict(config, torch_dtype="float16")))
    assert load_config(model).dtype == "float16"  # a config's own dtype wins


@pytest.mark.parametrize("act, mlp_act", [("silu", "silu"), ("swish", "silu"), ("gelu", "gelu"),
                                          ("gelu_pytorch_tanh", "gelu_tanh"),
                                          ("gelu_new", "gelu_tanh"), ("gelu_fast", "gelu_tanh")])
def test_dense_mlps_take_the_activations_transformers_runs(act, mlp_act):
    """A Llama-family MLP runs ``ACT2FN[hidden_act]`` in transformers: exact GELU for "gelu",
    the tanh form for the others (checked against transformers 5.24 on tiny random Llama and
    Qwen2 models: log-probs within 1e-5). They were refused ("only silu"). MoE experts run
    SiLU only: another activation is refused there."""
    assert config_from_hf_dict(dict(LLAMA_V4, hidden_act=act)).mlp_act == mlp_act
    moe = json.loads((GOLDEN / "qwen3_moe" / "config.json").read_text())
    if mlp_act != "silu":
        with pytest.raises(UnsupportedModelError, match="not supported for MoE experts"):
            config_from_hf_dict(dict(moe, hidden_act=act))


def test_qwen_moe_windows_are_placed_as_transformers_places_them():
    """transformers 5: Qwen2-MoE without ``layer_types`` slides its even layers below
    ``max_window_layers`` (``Qwen2MoeConfig``); Qwen3-MoE slides every layer, whatever
    ``max_window_layers`` says (its class has no ``layer_types``). Here they slid the layers
    from ``max_window_layers`` on, as dense Qwen does: another model past the window."""
    d = dict(json.loads((GOLDEN / "qwen2_moe" / "config.json").read_text()), sliding_window=8,
             num_hidden_layers=5, use_sliding_window=True, max_window_layers=3)
    d.pop("layer_types", None)
    q2 = config_from_hf_dict(d)
    assert q2.sliding_window == 8 and q2.local_layers == (0, 2)
    q3 = config_from_hf_dict(dict(d, model_type="qwen3_moe", layer_types=["full_attention"] * 5))
    assert q3.sliding_window == 8 and all(q3.is_local_layer(i) for i in range(5))
    assert config_from_hf_dict(dict(d, use_sliding_window=False)).sliding_window is None


@pytest.mark.parametrize("scaling, context", [
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}, 256),
    ({"type": "yarn", "factor": 4.0}, 512),  # the original context is max_position_embeddings
    ({"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32}, 64),
    ({"rope_type": "linear", "factor": 2.0}, 256),
    ({"rope_type": "dynamic", "factor": 2.0}, 128),  # transformers' frequencies within 128
    ({"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 16}, 128),
    ({"rope_type": "default"}, 128),
])
def test_a_scaled_ropes_context_is_its_scaled_length(scaling, context):
    """A Qwen2.5 config with YaRN added (its long-context recipe) was capped at
    max_position_embeddings: vLLM serves original x factor (linear: max_position_embeddings x
    factor), which transformers runs too."""
    qwen = dict(SMALL, model_type="qwen2", max_position_embeddings=128, rope_theta=1e6)
    cfg = config_from_hf_dict(dict(qwen, rope_scaling=scaling))
    assert cfg.max_position_embeddings == context


def test_a_yarn_model_serves_prompts_past_its_unscaled_context(tmp_path):
    """The golden Llama with YaRN x4 over its 256 positions: a 600-token prompt is served, and
    its greedy tokens are the single-device reference's."""
    from xds_jax import LLM, SamplingParams

    model = tmp_path / "llama"
    shutil.copytree(GOLDEN / "llama", model)
    config = json.loads((model / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (model / "config.json").write_text(json.dumps(config))
    prompt = {"prompt_token_ids": [(i * 37) % 300 + 3 for i in range(600)]}
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outs = [LLM(str(model), dtype="float32", max_model_len=1024, engine=engine,
                kv_cache_bytes=8 << 20).generate(prompt, params)[0].outputs[0].token_ids
            for engine in ("flowserve", "reference")]
    assert outs[0] == outs[1] and len(outs[0]) == 6
