"""transformers' default configuration of each supported architecture, as ``config.json``
would hold it, written to ``default_configs.json`` for ``tests/xds_jax/test_config_defaults.py``.

A config on the Hub names only some fields; the rest are these defaults, which the loader must
read as transformers does. Also writes ``xds_jax/model/hf_class_defaults.json``, each
architecture's constructor defaults, which the loader fills absent fields from. Run with the
golden venv: ``python tests/golden/default_configs.py``.
"""

import inspect
import json
from pathlib import Path

import transformers as tf

CLASSES = ["LlamaConfig", "MistralConfig", "Qwen2Config", "Qwen3Config", "Phi3Config",
           "GraniteConfig", "SmolLM3Config", "GemmaConfig", "Gemma2Config", "Gemma3TextConfig",
           "Olmo2Config", "Olmo3Config", "MixtralConfig", "Qwen2MoeConfig", "Qwen3MoeConfig",
           "OlmoeConfig", "GraniteMoeConfig", "GraniteMoeSharedConfig", "DeepseekV2Config",
           "DeepseekV3Config", "Glm4Config", "Glm4MoeConfig",
           "Ernie4_5Config", "Dots1Config", "SeedOssConfig",
           "Ernie4_5_MoeConfig", "Exaone4Config", "Glm4MoeLiteConfig",
           "MiniMaxM2Config", "InternLM3Config"]


# Constructor arguments that are no model fields (or that a config must state: the sizes, so
# that a config without them is an error naming the field rather than a 4096-wide model, and
# the token ids, which the tokenizer's files give).
NOT_DEFAULTED = {"self", "kwargs", "output_hidden_states", "return_dict",
                 "chunk_size_feed_forward", "is_encoder_decoder", "use_cache", "initializer_range",
                 "attention_dropout", "output_router_logits", "router_aux_loss_coef",
                 "router_jitter_noise", "pretraining_tp", "pad_token_id", "bos_token_id",
                 "eos_token_id", "vocab_size", "hidden_size", "num_hidden_layers",
                 "num_attention_heads", "dtype", "torch_dtype",
                 "num_mtp_layers"}  # DeepSeek-V3's MTP layers: none unless the config has them


def class_defaults(cls) -> dict:
    """The fields a config of ``cls`` takes when ``config.json`` leaves them out: its
    constructor's non-null defaults, and its RoPE base (``default_theta``)."""
    found = {}
    for name, param in inspect.signature(cls.__init__).parameters.items():
        value = param.default
        if name in NOT_DEFAULTED or value is inspect.Parameter.empty or value is None:
            continue
        if isinstance(value, bool | int | float | str | list | dict):
            found[name] = value
    theta = getattr(cls, "default_theta", None)
    if isinstance(theta, int | float):
        found["rope_theta"] = float(theta)
    return found


# The language models of image-text checkpoints, read under their own defaults
# (config_defaults.TEXT_CLASS_TYPES): only into the package's table.
TEXT_CLASSES = ["Qwen2VLTextConfig", "Qwen2_5_VLTextConfig", "Qwen3VLTextConfig",
                "Qwen3VLMoeTextConfig"]


def main() -> None:
    configs = {name: json.loads(getattr(tf, name)().to_json_string()) for name in CLASSES}
    out = Path(__file__).with_name("default_configs.json")
    out.write_text(json.dumps({"transformers": tf.__version__, "configs": configs}, indent=1,
                              sort_keys=True) + "\n")
    print(f"wrote {out} ({len(configs)} configs)")
    types = {name: getattr(tf, name).model_type for name in CLASSES + TEXT_CLASSES}
    defaults = {types[name]: class_defaults(getattr(tf, name)) for name in types}
    # a field's other spellings (num_local_experts for num_experts): one stated, none defaulted
    aliases = {types[name]: dict(getattr(tf, name).attribute_map) for name in types}
    package = Path(__file__).parents[2] / "xds_jax" / "model" / "hf_class_defaults.json"
    package.write_text(json.dumps({"transformers": tf.__version__, "defaults": defaults,
                                   "aliases": aliases}, indent=1, sort_keys=True) + "\n")
    print(f"wrote {package} ({len(defaults)} model types)")


if __name__ == "__main__":
    main()
