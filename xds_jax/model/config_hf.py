"""Hugging Face ``config.json`` to ``ModelConfig``, for every spelling real checkpoints use.

Hub checkpoints (transformers 4) write ``rope_theta`` + ``rope_scaling`` (DeepSeek: ``type``),
``torch_dtype`` and ``num_experts``; transformers 5 writes ``rope_parameters``, ``dtype``,
``num_local_experts`` and, for DeepSeek, a ``head_dim`` that is only the RoPE part.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from xds_jax.errors import ConfigError, ModelNotFoundError, UnsupportedModelError
from xds_jax.loading.checkpoint_quant import checkpoint_quantization
from xds_jax.model.config import MLAConfig, ModelConfig, MoEConfig, RopeConfig

GEMMA_TYPES = ("gemma", "gemma2", "gemma3_text")
DENSE_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "granite") + GEMMA_TYPES
MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3")
MLA_TYPES = ("deepseek_v2", "deepseek_v3")
# DeepSeek-V2's topk_method: "greedy" (V2-Lite: top-k of all experts) or "group_limited_greedy"
# (V2: the topk_group groups with the best single expert score first).
V2_TOPK_METHODS = ("greedy", "group_limited_greedy")
SUPPORTED_TYPES = DENSE_TYPES + MOE_TYPES
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")
_DTYPE_ALIASES = {"float": "float32", "fp32": "float32", "bf16": "bfloat16", "half": "float16",
                  "fp16": "float16"}


def _get(d: dict, *names: str, default: Any = None) -> Any:
    """The first of ``names`` present with a non-null value."""
    for name in names:
        if d.get(name) is not None:
            return d[name]
    return default


def _require(d: dict, name: str, source: str) -> Any:
    if d.get(name) is None:
        raise ConfigError(f"{source}: required field {name!r} is missing")
    return d[name]


def _int(d: dict, name: str, source: str, default: Any = ...) -> int:
    value = _require(d, name, source) if default is ... else d.get(name, default)
    if value is None:
        return value
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
        raise ConfigError(f"{source}: {name} must be an integer, got {value!r}")
    return int(value)


def _token_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def parse_rope(d: dict, source: str, interleaved: bool = False) -> RopeConfig:
    """RoPE settings from ``rope_parameters`` (v5) or ``rope_theta`` + ``rope_scaling`` (v4)."""
    params = d.get("rope_parameters") or {}
    if params and all(isinstance(v, dict) for v in params.values()):
        raise UnsupportedModelError(f"{source}: per-layer-type rope_parameters are not supported")
    scaling = d.get("rope_scaling") or {}
    merged = {**scaling, **params}
    theta = _get(merged, "rope_theta", default=_get(d, "rope_theta", default=10000.0))
    rope_type = _get(merged, "rope_type", "type", default="default")
    if rope_type == "su":  # Phi-3's first name for LongRoPE
        rope_type = "longrope"
    if rope_type not in ROPE_TYPES:
        raise UnsupportedModelError(
            f"{source}: rope type {rope_type!r} is not supported (supported: {ROPE_TYPES})"
        )
    factor = float(_get(merged, "factor", default=1.0))
    original = _get(merged, "original_max_position_embeddings",
                    default=d.get("original_max_position_embeddings"))
    if rope_type in ("yarn", "llama3", "longrope") and original is None:
        original = d.get("max_position_embeddings")
    freq_factors = attention = None
    if rope_type == "longrope":
        freq_factors, attention = _longrope(merged, d, original, source)
    return RopeConfig(
        theta=float(theta),
        type=rope_type,
        factor=factor,
        original_max_position_embeddings=None if original is None else int(original),
        low_freq_factor=float(_get(merged, "low_freq_factor", default=1.0)),
        high_freq_factor=float(_get(merged, "high_freq_factor", default=4.0)),
        beta_fast=float(_get(merged, "beta_fast", default=32.0)),
        beta_slow=float(_get(merged, "beta_slow", default=1.0)),
        mscale=merged.get("mscale"),
        mscale_all_dim=merged.get("mscale_all_dim"),
        attention_factor=attention if attention is not None else merged.get("attention_factor"),
        truncate=bool(merged.get("truncate", True)),
        interleaved=interleaved,
        partial_rotary_factor=float(
            _get(merged, "partial_rotary_factor", default=d.get("partial_rotary_factor", 1.0))
        ),
        freq_factors=freq_factors,
    )


def _longrope(merged: dict, d: dict, original, source: str) -> tuple[tuple[float, ...], float]:
    """LongRoPE (Phi-3/3.5/4-mini) within its original context: the short factors divide the
    frequencies, and cos/sin carry transformers' attention factor, ``sqrt(1 + ln(s) / ln(L0))``
    for ``s = max_position_embeddings / L0``. Past ``L0`` transformers switches every position
    to the long factors; the engine serves the original context (``max_position_embeddings``
    becomes ``L0``, ``config_from_hf_dict``)."""
    short = merged.get("short_factor")
    if not isinstance(short, list) or not short or original is None:
        raise ConfigError(f"{source}: longrope needs short_factor (a list) and "
                          "original_max_position_embeddings")
    attention = merged.get("attention_factor")
    if attention is None:
        scale = d.get("max_position_embeddings", original) / original
        attention = 1.0 if scale <= 1 else math.sqrt(1 + math.log(scale) / math.log(original))
    return tuple(float(f) for f in short), float(attention)


def _dtype(d: dict) -> str:
    name = _get(d, "dtype", "torch_dtype", default="bfloat16")
    name = str(name).removeprefix("torch.")
    return _DTYPE_ALIASES.get(name, name)


def _sliding_window(d: dict, model_type: str) -> dict:
    """``sliding_window`` and ``local_layers`` of a non-Gemma model (Gemma: ``_gemma``).

    Qwen's window (``use_sliding_window``) covers the layers from ``max_window_layers`` on, as
    transformers builds its ``layer_types``; an explicit ``layer_types`` list wins. Others
    (Mistral) slide on every layer."""
    window = d.get("sliding_window")
    layers = d.get("num_hidden_layers", 0)
    types = d.get("layer_types")
    if model_type in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe"):
        if not d.get("use_sliding_window", False):
            return {"sliding_window": None}
        if not types:
            start = d.get("max_window_layers", layers)
            types = ["sliding_attention" if i >= start else "full_attention"
                     for i in range(layers)]
    if window is None or not types:
        return {"sliding_window": window}
    local = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    return {"sliding_window": window if local else None, "local_layers": local or None}


def _moe(d: dict, model_type: str, num_layers: int, source: str) -> MoEConfig | None:
    if model_type == "mixtral":
        return MoEConfig(
            num_experts=_int(d, "num_local_experts", source),
            num_experts_per_tok=_int(d, "num_experts_per_tok", source),
            moe_intermediate_size=_int(d, "intermediate_size", source),
            moe_layers=tuple(range(num_layers)),
        )
    if model_type in ("qwen2_moe", "qwen3_moe"):
        num_experts = _get(d, "num_experts", "num_local_experts")
        if num_experts is None:
            raise ConfigError(f"{source}: required field 'num_experts' is missing")
        step = _int(d, "decoder_sparse_step", source, default=1)
        dense = set(d.get("mlp_only_layers") or [])
        layers = tuple(i for i in range(num_layers) if i not in dense and (i + 1) % step == 0)
        shared = _int(d, "shared_expert_intermediate_size", source, default=0) or 0
        return MoEConfig(
            num_experts=int(num_experts),
            num_experts_per_tok=_int(d, "num_experts_per_tok", source),
            moe_intermediate_size=_int(d, "moe_intermediate_size", source),
            norm_topk_prob=bool(d.get("norm_topk_prob", model_type == "qwen3_moe")),
            num_shared_experts=1 if shared else 0,
            shared_intermediate_size=shared,
            shared_expert_gate=bool(shared),
            moe_layers=layers,
        )
    if model_type in MLA_TYPES:
        v2 = model_type == "deepseek_v2"
        scoring = d.get("scoring_func", "softmax" if v2 else "sigmoid")
        topk_method = d.get("topk_method", "greedy" if v2 else "noaux_tc")
        if v2 and topk_method not in V2_TOPK_METHODS:
            raise UnsupportedModelError(f"{source}: topk_method {topk_method!r} is not supported "
                                        f"for deepseek_v2 (supported: {V2_TOPK_METHODS})")
        grouped = not v2 or topk_method == "group_limited_greedy"
        first_dense = _int(d, "first_k_dense_replace", source, default=0)
        freq = _int(d, "moe_layer_freq", source, default=1)
        layers = tuple(i for i in range(first_dense, num_layers) if i % freq == 0)
        inter = _int(d, "moe_intermediate_size", source)
        n_shared = _int(d, "n_shared_experts", source, default=0) or 0
        num_experts = _get(d, "n_routed_experts", "num_local_experts")
        if num_experts is None:
            raise ConfigError(f"{source}: required field 'n_routed_experts' is missing")
        return MoEConfig(
            num_experts=int(num_experts),
            num_experts_per_tok=_int(d, "num_experts_per_tok", source),
            moe_intermediate_size=inter,
            router=scoring,
            norm_topk_prob=bool(d.get("norm_topk_prob", not v2)),
            n_group=(_int(d, "n_group", source, default=1) or 1) if grouped else 1,
            topk_group=(_int(d, "topk_group", source, default=1) or 1) if grouped else 1,
            group_score="max" if v2 else "top2_sum",
            routed_scaling_factor=float(d.get("routed_scaling_factor", 1.0)),
            score_correction_bias=topk_method == "noaux_tc",
            num_shared_experts=n_shared,
            shared_intermediate_size=inter * n_shared,
            moe_layers=layers,
        )
    return None


def config_from_hf_dict(d: dict, source: str = "config") -> ModelConfig:
    """Build and validate a ``ModelConfig`` from a parsed ``config.json``."""
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
    if d.get("model_type") == "gemma3":  # image-text Gemma 3: serve its language model
        d = gemma3_text_config(d, source)
    model_type = d.get("model_type")
    if model_type is None:
        raise ConfigError(f"{source}: required field 'model_type' is missing")
    if model_type not in SUPPORTED_TYPES:
        raise UnsupportedModelError(
            f"{source}: model_type {model_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_TYPES)})"
        )
    gemma = _gemma(d, model_type, source) if model_type in GEMMA_TYPES else {}
    if gemma:
        d = gemma.pop("config")  # Gemma 3's per-layer-type rope_parameters: the global ones
    act = d.get("hidden_act", "silu")
    if not gemma and act not in ("silu", "swish"):
        raise UnsupportedModelError(f"{source}: hidden_act {act!r} is not supported (only silu)")
    hidden = _int(d, "hidden_size", source)
    heads = _int(d, "num_attention_heads", source)
    layers = _int(d, "num_hidden_layers", source)
    checkpoint_quantization(d, source)  # an unsupported quant_method fails here, by name
    mla = None
    if model_type in MLA_TYPES:
        mla = MLAConfig(
            q_lora_rank=_int(d, "q_lora_rank", source, default=None),
            kv_lora_rank=_int(d, "kv_lora_rank", source),
            qk_nope_head_dim=_int(d, "qk_nope_head_dim", source),
            qk_rope_head_dim=_int(d, "qk_rope_head_dim", source),
            v_head_dim=_int(d, "v_head_dim", source),
        )
        head_dim = mla.qk_head_dim  # transformers 5 writes only the RoPE part as head_dim
    else:
        head_dim = _int(d, "head_dim", source, default=None) or (hidden // max(heads, 1))
    if model_type in ("qwen2", "qwen2_moe"):
        qkv_bias, out_bias = True, False  # hard-wired in Qwen2: biases on q/k/v only
    elif model_type in ("mistral", "mixtral"):
        qkv_bias = out_bias = False
    else:
        qkv_bias = out_bias = bool(d.get("attention_bias", False))
    if mla is not None and qkv_bias:
        raise UnsupportedModelError(f"{source}: attention_bias is not supported with MLA")
    rope = parse_rope(d, source, interleaved=bool(d.get("rope_interleave", mla is not None)))
    context = _int(d, "max_position_embeddings", source, default=2048)
    if rope.type == "longrope":  # served within the context its short factors cover
        context = min(context, rope.original_max_position_embeddings)
    granite = _granite(d, source) if model_type == "granite" else {}
    return ModelConfig(
        **granite,
        **gemma,
        model_type=model_type,
        vocab_size=_int(d, "vocab_size", source),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=_int(d, "num_key_value_heads", source, default=None) or heads,
        head_dim=head_dim,
        intermediate_size=_int(d, "intermediate_size", source, default=0) or 0,
        max_position_embeddings=context,
        rms_norm_eps=float(_get(d, "rms_norm_eps", default=1e-6)),
        rope=rope,
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        attention_bias=qkv_bias,
        attention_out_bias=out_bias,
        mlp_bias=bool(d.get("mlp_bias", False)),
        qk_norm=model_type in ("qwen3", "qwen3_moe", "gemma3_text"),
        **({"sliding_window": d.get("sliding_window")} if gemma
           else _sliding_window(d, model_type)),
        mla=mla,
        moe=_moe(d, model_type, layers, source),
        num_mtp_layers=_int(d, "num_nextn_predict_layers", source, default=0) or 0,
        dtype=_dtype(d),
        bos_token_id=d.get("bos_token_id"),
        eos_token_ids=_token_ids(d.get("eos_token_id")),
    )


GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new", "gelu")
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
    text = d.get("text_config")
    if not isinstance(text, dict):
        raise ConfigError(f"{source}: model_type gemma3 needs a text_config object")
    top = {k: d[k] for k in ("eos_token_id", "bos_token_id", "torch_dtype", "dtype",
                             "tie_word_embeddings") if d.get(k) is not None}
    return {**GEMMA3_TEXT_DEFAULTS, **top, **text, "model_type": "gemma3_text"}


def _gemma(d: dict, model_type: str, source: str) -> dict:
    """Gemma / Gemma 2 / Gemma 3 (text) fields of ``ModelConfig``, plus ``config``: ``d`` with
    Gemma 3's per-layer-type ``rope_parameters`` replaced by the global layers' ones.

    Norm weights are stored as ``w`` and applied as ``1 + w``; the loader adds the one. The
    embeddings are scaled by ``sqrt(hidden_size)`` (folded into the table like Granite's
    multiplier, the tied head undoing it). Local (sliding-window) layers: ``layer_types``
    (transformers 5), else Gemma 2's even layers, else Gemma 3's ``sliding_window_pattern``."""
    if d.get("use_bidirectional_attention"):
        raise UnsupportedModelError(f"{source}: use_bidirectional_attention (an embedding "
                                    "model) is not supported")
    act = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in GELU_TANH:
        raise UnsupportedModelError(f"{source}: hidden_activation {act!r} is not supported "
                                    f"for {model_type} (supported: {', '.join(GELU_TANH)})")
    layers = _int(d, "num_hidden_layers", source)
    out: dict = {"mlp_act": "gelu_tanh", "sandwich_norms": model_type != "gemma"}
    scalar = d.get("query_pre_attn_scalar")
    if scalar is not None and model_type != "gemma":
        out["attention_multiplier"] = float(scalar) ** -0.5
    for key, field in (("attn_logit_softcapping", "attn_softcap"),
                       ("final_logit_softcapping", "final_softcap")):
        if d.get(key) is not None and model_type == "gemma2":
            out[field] = float(d[key])
    hidden = _int(d, "hidden_size", source)
    out["embedding_multiplier"] = math.sqrt(hidden)
    tied = bool(d.get("tie_word_embeddings", True))
    out["logits_scale"] = 1 / math.sqrt(hidden) if tied else 1.0
    config = dict(d, tie_word_embeddings=tied)
    if model_type != "gemma" and d.get("sliding_window"):
        types = d.get("layer_types")
        if types:
            out["local_layers"] = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
        elif model_type == "gemma2":
            out["local_layers"] = tuple(range(0, layers, 2))
        else:
            pattern = _int(d, "sliding_window_pattern", source, default=6)
            out["local_layers"] = tuple(i for i in range(layers) if (i + 1) % pattern)
    else:
        config["sliding_window"] = None
    params = d.get("rope_parameters") or {}
    if params and all(isinstance(v, dict) for v in params.values()):  # Gemma 3, transformers 5
        config["rope_parameters"] = params.get("full_attention", {})
        local = params.get("sliding_attention", {}).get("rope_theta")
    else:
        local = d.get("rope_local_base_freq")
    if model_type == "gemma3_text":
        out["local_rope_theta"] = float(local if local is not None else 10000.0)
        if not (config.get("rope_parameters") or {}).get("rope_theta") and "rope_theta" not in d:
            config["rope_theta"] = GEMMA3_TEXT_DEFAULTS["rope_theta"]  # the global base
    out["config"] = config
    return out


def _granite(d: dict, source: str) -> dict:
    """Granite's multipliers as ``ModelConfig`` fields; the logits scale also undoes the
    embedding multiplier a tied head reads (it is folded into the embedding table)."""
    out = {}
    for name in ("embedding_multiplier", "residual_multiplier", "attention_multiplier",
                 "logits_scaling"):
        value = d.get(name, 1.0)
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise ConfigError(f"{source}: {name} must be a positive number, got {value!r}")
        out[name] = float(value)
    scaling = out.pop("logits_scaling")
    tied = bool(d.get("tie_word_embeddings", False))
    out["logits_scale"] = 1.0 / (scaling * (out["embedding_multiplier"] if tied else 1.0))
    return out


def read_json(path: Path) -> dict:
    """Read a JSON object, with errors that name the file."""
    if not path.is_file():
        raise ModelNotFoundError(f"no such config file: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def load_model_config(path: str | Path) -> ModelConfig:
    """Load a ``ModelConfig`` from a ``config.json`` file or a directory holding one."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    return config_from_hf_dict(read_json(path), source=str(path))
