"""Image-text checkpoints served as their language model, text in and out: the text part's
``config.json`` fields (``text_config`` or the top level) as the text model's own config.

Gemma 3 (4B up), Mistral Small 3.1 / 3.2 and Qwen2-VL / Qwen2.5-VL / Qwen3-VL (-MoE) ship as
image-text models; their language model is a ``gemma3_text``, ``mistral`` / ``llama``,
``qwen2`` or ``qwen3`` (``qwen3_moe``) model whose weights the loader finds under the
checkpoint's language-model prefix (``weights_hf.TextModelSource``).
"""

from __future__ import annotations

from xds_jax.errors import ConfigError, UnsupportedModelError

# transformers' Gemma3TextConfig defaults: the text_config of an image-text Gemma 3 on the Hub
# names only what differs from them (gemma-3-4b-it: sizes, layer count, rope_scaling, window).
GEMMA3_TEXT_DEFAULTS = {
    "vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216,
    "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4,
    "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-6, "bos_token_id": 2, "eos_token_id": 1, "tie_word_embeddings": True,
    "query_pre_attn_scalar": 256, "sliding_window": 4096, "rope_theta": 1_000_000.0,
    "rope_local_base_freq": 10_000.0,
}


def gemma3_text_config(d: dict, source: str) -> dict:
    """The language model's config of an image-text Gemma 3 (``model_type: gemma3``): its
    ``text_config`` over Gemma3TextConfig's defaults, the top level's token ids and dtype."""
    text, top = _text_config(d, source, "tie_word_embeddings")
    return {**GEMMA3_TEXT_DEFAULTS, **top, **text, "model_type": "gemma3_text"}


def _text_config(d: dict, source: str, *shared: str) -> tuple[dict, dict]:
    """An image-text config's ``text_config`` and the top level's token ids, dtype and
    ``shared`` fields (those it sets)."""
    text = d.get("text_config")
    if not isinstance(text, dict):
        raise ConfigError(f"{source}: model_type {d.get('model_type')} needs a text_config "
                          "object")
    keys = ("eos_token_id", "bos_token_id", "torch_dtype", "dtype", *shared)
    return text, {k: d[k] for k in keys if d.get(k) is not None}


def mistral3_text_config(d: dict, source: str) -> dict:
    """The language model's config of an image-text Mistral 3 (Mistral Small 3.1 / 3.2,
    ``model_type: mistral3``): its ``text_config`` (a Mistral or Llama config) with the top
    level's token ids and dtype. Tying follows the top level where it says (transformers 5
    ties the head there, and saves no ``lm_head``), else the text config (released
    checkpoints: untied, ``language_model.lm_head.weight`` stored)."""
    text, top = _text_config(d, source)
    if text.get("model_type", "mistral") not in ("mistral", "llama"):
        raise UnsupportedModelError(f"{source}: mistral3 text_config model_type "
                                    f"{text.get('model_type')!r} is not supported")
    tied = d.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    return {**top, **text, "model_type": text.get("model_type", "mistral"),
            "tie_word_embeddings": bool(tied)}


# The text model of each Qwen image-text type. Qwen's multimodal RoPE (mrope: t / h / w
# sections of the rotary dims, interleaved in Qwen3-VL) rotates a text-only prompt with one
# position in all three, which is the plain rotation at the same base.
QWEN_VL_TEXT_TYPES = {"qwen2_vl": "qwen2", "qwen2_5_vl": "qwen2", "qwen3_vl": "qwen3",
                      "qwen3_vl_moe": "qwen3_moe"}
_MROPE_KEYS = ("mrope_section", "mrope_interleaved")


def qwen_vl_text_config(d: dict, source: str) -> dict:
    """The language model's config of a Qwen2-VL / 2.5-VL / 3-VL checkpoint: its
    ``text_config`` (transformers 5, and the Hub's newer configs) with the top level's token
    ids and dtype, else the top level itself (transformers 4 kept the text fields there);
    tying as the top level says where it does (Qwen2.5-VL-3B ties), and the multimodal RoPE
    as the plain one it is for text."""
    if isinstance(d.get("text_config"), dict):
        text, top = _text_config(d, source)
    else:
        text, top = {k: v for k, v in d.items() if k != "vision_config"}, {}
    config = {**top, **text, "model_type": QWEN_VL_TEXT_TYPES[d["model_type"]],
              "tie_word_embeddings": bool(d.get("tie_word_embeddings",
                                                text.get("tie_word_embeddings", False)))}
    for key in ("rope_scaling", "rope_parameters"):
        rope = config.get(key)
        if isinstance(rope, dict):
            rope = {k: v for k, v in rope.items() if k not in _MROPE_KEYS}
            for name in ("type", "rope_type"):
                if rope.get(name) == "mrope":
                    rope[name] = "default"
            config[key] = rope
    return config
