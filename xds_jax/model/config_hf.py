"""Hugging Face ``config.json`` to ``ModelConfig``, for every spelling real checkpoints use.

Hub checkpoints (transformers 4) write ``rope_theta`` + ``rope_scaling`` (DeepSeek: ``type``),
``torch_dtype`` and ``num_experts``; transformers 5 writes ``rope_parameters``, ``dtype``,
``num_local_experts`` and, for DeepSeek, a ``head_dim`` that is only the RoPE part.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from xds_jax.errors import ConfigError, ModelNotFoundError, UnsupportedModelError, XdsError
from xds_jax.loading.checkpoint_quant import checkpoint_quantization
from xds_jax.model.config import DTYPES, MLAConfig, ModelConfig, MoEConfig
from xds_jax.model.config_defaults import TEXT_CLASS_TYPES, with_class_defaults
from xds_jax.model.config_families import (
    GELU_ACTS,
    GEMMA_TYPES,
    GLM_TYPES,
    GRANITE_MOE_TYPES,
    OLMO_TYPES,
    family_fields,
    layer_types,
    window_fields,
)
from xds_jax.model.config_fields import bool_field, get_any, int_field
from xds_jax.model.config_image_text import (
    QWEN_VL_TEXT_TYPES,
    gemma3_text_config,
    mistral3_text_config,
    qwen_vl_text_config,
)
from xds_jax.model.config_rope import parse_rope

DENSE_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "granite", "smollm3", *GEMMA_TYPES,
               *OLMO_TYPES, "glm4", "ernie4_5", "seed_oss", "exaone4", "internlm3")
MOE_TYPES = ("mixtral", "minimax_m2", "qwen2_moe", "qwen3_moe", "olmoe", *GRANITE_MOE_TYPES,
             "deepseek_v2", "deepseek_v3", "glm4_moe", "glm4_moe_lite", "dots1", "ernie4_5_moe")
MLA_TYPES = ("deepseek_v2", "deepseek_v3", "glm4_moe_lite")
# DeepSeek's MoE (router, shared experts, dense first layers, MTP layers after the last): with
# MLA in DeepSeek and GLM-4.7-Flash (glm4_moe_lite), with grouped-query attention in GLM-4.5 /
# 4.6 (glm4_moe) and dots.llm1 (dots1, Qwen3's attention).
DEEPSEEK_MOE_TYPES = (*MLA_TYPES, "glm4_moe", "dots1")
# DeepSeek-V2's topk_method: "greedy" (V2-Lite: top-k of all experts) or "group_limited_greedy"
# (V2: the topk_group groups with the best single expert score first).
V2_TOPK_METHODS = ("greedy", "group_limited_greedy")
SUPPORTED_TYPES = DENSE_TYPES + MOE_TYPES
_DTYPE_ALIASES = {"float": "float32", "fp32": "float32", "bf16": "bfloat16", "half": "float16",
                  "fp16": "float16"}


def token_ids(value: Any, source: str) -> tuple[int, ...]:
    """``eos_token_id``: one id, a list of them, or null."""
    if value is None:
        return ()
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"{source}: eos_token_id must be a token id or a list of them, got "
                          f"{value!r}")
    return tuple(values)


def _dtype(d: dict, source: str) -> str:
    field = "dtype" if d.get("dtype") is not None else "torch_dtype"
    name = str(get_any(d, "dtype", "torch_dtype", default="bfloat16")).removeprefix("torch.")
    name = _DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise ConfigError(f"{source}: {field} {name!r} is not a dtype this engine loads "
                          f"(one of {', '.join(DTYPES)})")
    return name


def _sliding_window(d: dict, model_type: str) -> dict:
    """``sliding_window`` and ``local_layers`` of a model whose family sets none
    (``config_families.family_fields``), as transformers reads them.

    Qwen's window needs ``use_sliding_window``. Qwen2/Qwen3's covers the layers from
    ``max_window_layers`` on, as does dots.llm1's without the switch (its class default: from
    layer 62); Qwen2-MoE's the even layers below ``max_window_layers``; Qwen3-MoE's every layer
    (its class has no ``layer_types``). An explicit ``layer_types`` list wins, except for
    Qwen3-MoE. Others (Mistral) slide on every layer."""
    window = d.get("sliding_window")
    layers = d.get("num_hidden_layers", 0)
    types = d.get("layer_types")
    if model_type in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "dots1"):
        if model_type != "dots1" and not d.get("use_sliding_window", False):
            return {"sliding_window": None}
        if model_type == "qwen3_moe":
            return {"sliding_window": window}
        if not types:
            start = d.get("max_window_layers", 62 if model_type == "dots1" else layers)
            if model_type == "qwen2_moe":
                slides = [i % 2 == 0 and i < start for i in range(layers)]
            else:
                slides = [i >= start for i in range(layers)]
            types = ["sliding_attention" if s else "full_attention" for s in slides]
    if window is None or not types:
        return {"sliding_window": window}
    return window_fields(window, types)


def _spelt(d: dict, name: str, alias: str) -> str:
    """``name``, or ``alias`` where the config spells the field so (transformers' attribute
    maps let either be written)."""
    return alias if name not in d and alias in d else name


def _moe(d: dict, model_type: str, num_layers: int, source: str) -> MoEConfig | None:
    if model_type == "mixtral":
        return MoEConfig(
            num_experts=int_field(d, _spelt(d, "num_local_experts", "num_experts"), source),
            num_experts_per_tok=int_field(d, "num_experts_per_tok", source),
            moe_intermediate_size=int_field(d, "intermediate_size", source),
            moe_layers=tuple(range(num_layers)),
        )
    if model_type == "minimax_m2":  # Mixtral's experts, DeepSeek-V3's biased sigmoid choice
        return MoEConfig(
            num_experts=int_field(d, _spelt(d, "num_local_experts", "num_experts"), source,
                                  default=256),
            num_experts_per_tok=int_field(d, "num_experts_per_tok", source, default=8),
            moe_intermediate_size=int_field(d, "intermediate_size", source, default=1536),
            router=d.get("scoring_func") or "sigmoid",
            norm_topk_prob=True,
            score_correction_bias=bool_field(d, "use_routing_bias", source, default=True),
            moe_layers=tuple(range(num_layers)),
        )
    if model_type == "olmoe":  # softmax, top-k, renormalised only with norm_topk_prob
        return MoEConfig(
            num_experts=int_field(d, _spelt(d, "num_experts", "num_local_experts"), source,
                                  default=64),
            num_experts_per_tok=int_field(d, "num_experts_per_tok", source, default=8),
            moe_intermediate_size=int_field(d, "intermediate_size", source, default=2048),
            norm_topk_prob=bool_field(d, "norm_topk_prob", source, default=False),
            moe_layers=tuple(range(num_layers)),
        )
    if model_type in GRANITE_MOE_TYPES:  # softmax over the top-k logits: renormalised top-k
        shared = int_field(d, "shared_intermediate_size", source, default=0) or 0
        return MoEConfig(
            num_experts=int_field(d, "num_local_experts", source, default=8),
            num_experts_per_tok=int_field(d, "num_experts_per_tok", source, default=2),
            moe_intermediate_size=int_field(d, "intermediate_size", source, default=11008),
            norm_topk_prob=True,
            num_shared_experts=1 if shared else 0,
            shared_intermediate_size=shared,
            moe_layers=tuple(range(num_layers)),
        )
    if model_type == "ernie4_5_moe":  # softmax, chosen with a correction bias, renormalised
        inter = int_field(d, "moe_intermediate_size", source, default=1536)
        shared = int_field(d, "moe_num_shared_experts", source, default=2) or 0
        step = int_field(d, "moe_layer_interval", source, default=1)
        first = int_field(d, "moe_layer_start_index", source, default=1)
        last = int_field(d, "moe_layer_end_index", source, default=-1)
        last = num_layers - 1 if last == -1 else last
        return MoEConfig(
            num_experts=int_field(d, _spelt(d, "moe_num_experts", "num_experts"), source,
                                  default=64),
            num_experts_per_tok=int_field(d, _spelt(d, "moe_k", "num_experts_per_tok"), source,
                                          default=6),
            moe_intermediate_size=inter,
            norm_topk_prob=True,
            score_correction_bias=True,
            num_shared_experts=shared,
            shared_intermediate_size=inter * shared,
            moe_layers=tuple(i for i in range(num_layers)
                             if (i + 1) % step == 0 and first <= i <= last),
        )
    if model_type in ("qwen2_moe", "qwen3_moe"):
        num_experts = get_any(d, "num_experts", "num_local_experts")
        if num_experts is None:
            raise ConfigError(f"{source}: required field 'num_experts' is missing")
        step = int_field(d, "decoder_sparse_step", source, default=1)
        dense = set(d.get("mlp_only_layers") or [])
        layers = tuple(i for i in range(num_layers) if i not in dense and (i + 1) % step == 0)
        shared = int_field(d, "shared_expert_intermediate_size", source, default=0) or 0
        return MoEConfig(
            num_experts=int(num_experts),
            num_experts_per_tok=int_field(d, "num_experts_per_tok", source),
            moe_intermediate_size=int_field(d, "moe_intermediate_size", source),
            norm_topk_prob=bool(d.get("norm_topk_prob", model_type == "qwen3_moe")),
            num_shared_experts=1 if shared else 0,
            shared_intermediate_size=shared,
            shared_expert_gate=bool(shared),
            moe_layers=layers,
        )
    if model_type in DEEPSEEK_MOE_TYPES:
        v2, glm = model_type == "deepseek_v2", model_type in ("glm4_moe", "glm4_moe_lite")
        scoring = d.get("scoring_func", "softmax" if v2 else "sigmoid")
        topk_method = d.get("topk_method", "greedy" if v2 else "noaux_tc")
        if v2 and topk_method not in V2_TOPK_METHODS:
            raise UnsupportedModelError(f"{source}: topk_method {topk_method!r} is not supported "
                                        f"for deepseek_v2 (supported: {V2_TOPK_METHODS})")
        grouped = not v2 or topk_method == "group_limited_greedy"
        first_dense = int_field(d, "first_k_dense_replace", source, default=int(glm))
        freq = int_field(d, "moe_layer_freq", source, default=1)
        layers = tuple(i for i in range(first_dense, num_layers) if i % freq == 0)
        kinds = layer_types(d, num_layers, source, "mlp_layer_types", ("dense", "sparse"))
        if kinds is not None:  # GLM-4.7-Flash: "dense" / "sparse" per layer
            layers = tuple(i for i, kind in enumerate(kinds) if kind == "sparse")
        inter = int_field(d, "moe_intermediate_size", source)
        n_shared = int_field(d, "n_shared_experts", source, default=int(glm)) or 0
        num_experts = get_any(d, "n_routed_experts", "num_local_experts", "num_experts")
        if num_experts is None:
            raise ConfigError(f"{source}: required field 'n_routed_experts' is missing")
        return MoEConfig(
            num_experts=int(num_experts),
            num_experts_per_tok=int_field(d, "num_experts_per_tok", source),
            moe_intermediate_size=inter,
            router=scoring,
            norm_topk_prob=bool(d.get("norm_topk_prob", not v2 and model_type != "dots1")),
            n_group=(int_field(d, "n_group", source, default=1) or 1) if grouped else 1,
            topk_group=(int_field(d, "topk_group", source, default=1) or 1) if grouped else 1,
            group_score="max" if v2 else "top2_sum",
            routed_scaling_factor=float(d.get("routed_scaling_factor", 1.0)),
            score_correction_bias=topk_method == "noaux_tc",
            num_shared_experts=n_shared,
            shared_intermediate_size=inter * n_shared,
            moe_layers=layers,
        )
    return None


def config_from_hf_dict(d: dict, source: str = "config") -> ModelConfig:
    """Build and validate a ``ModelConfig`` from a parsed ``config.json``: absent fields are
    the architecture's transformers defaults (``config_defaults``), a field of the wrong type
    a ``ConfigError`` naming it."""
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
    if not isinstance(d.get("model_type"), str | None):
        raise ConfigError(f"{source}: model_type must be a string, got {d['model_type']!r}")
    try:
        return _config_from_hf_dict(d, source)
    except (TypeError, ValueError, AttributeError, KeyError) as e:
        if isinstance(e, XdsError):
            raise
        # a value of a type no check above foresaw: still an error about the config
        raise ConfigError(f"{source}: a field has a value of the wrong type or form "
                          f"({type(e).__name__}: {e})") from e


def _config_from_hf_dict(d: dict, source: str) -> ModelConfig:
    defaults_of = TEXT_CLASS_TYPES.get(d.get("model_type"))  # an image-text model's text class
    if d.get("model_type") == "gemma3":  # image-text Gemma 3: serve its language model
        d = gemma3_text_config(d, source)
    elif d.get("model_type") == "mistral3":  # image-text Mistral Small 3.x: likewise
        d = mistral3_text_config(d, source)
    elif d.get("model_type") in QWEN_VL_TEXT_TYPES:  # Qwen2-VL / 2.5-VL / 3-VL: likewise
        d = qwen_vl_text_config(d, source)
    model_type = d.get("model_type")
    if model_type is None:
        raise ConfigError(f"{source}: required field 'model_type' is missing")
    if model_type not in SUPPORTED_TYPES:
        raise UnsupportedModelError(
            f"{source}: model_type {model_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_TYPES)}; image-text checkpoints served as "
            f"their language model: gemma3, mistral3, {', '.join(QWEN_VL_TEXT_TYPES)})"
        )
    d = with_class_defaults(d, defaults_of or model_type, source)
    family = family_fields(d, model_type, source)
    d = family.pop("config")  # e.g. per-layer-type rope_parameters: the global layers' ones
    act = d.get("hidden_act", "silu")
    if model_type not in GEMMA_TYPES:
        family["mlp_act"] = _mlp_act(act, source)
    hidden = int_field(d, "hidden_size", source)
    heads = int_field(d, "num_attention_heads", source)
    layers = int_field(d, "num_hidden_layers", source)
    checkpoint_quantization(d, source)  # an unsupported quant_method fails here, by name
    mla = None
    if model_type in MLA_TYPES:
        mla = MLAConfig(
            q_lora_rank=int_field(d, "q_lora_rank", source, default=None),
            kv_lora_rank=int_field(d, "kv_lora_rank", source),
            qk_nope_head_dim=int_field(d, "qk_nope_head_dim", source),
            qk_rope_head_dim=int_field(d, "qk_rope_head_dim", source),
            v_head_dim=int_field(d, "v_head_dim", source),
        )
        head_dim = mla.qk_head_dim  # transformers 5 writes only the RoPE part as head_dim
    else:
        head_dim = int_field(d, "head_dim", source, default=None) or (
            128 if model_type == "seed_oss" else hidden // max(heads, 1))
    if model_type in ("qwen2", "qwen2_moe"):
        qkv_bias, out_bias = True, False  # hard-wired in Qwen2: biases on q/k/v only
    elif model_type in GLM_TYPES:  # attention_bias puts biases on q/k/v; o_proj has none
        qkv_bias, out_bias = bool(d.get("attention_bias", False)), False
    elif model_type == "seed_oss":  # q/k/v and o biases apart, as SeedOssConfig's defaults
        qkv_bias = bool_field(d, "attention_bias", source, default=True)
        out_bias = bool_field(d, "attention_out_bias", source, default=False)
    elif model_type in ("mistral", "mixtral"):
        qkv_bias = out_bias = False
    else:
        qkv_bias = out_bias = bool(d.get("attention_bias", False))
    if mla is not None and qkv_bias:
        raise UnsupportedModelError(f"{source}: attention_bias is not supported with MLA")
    rope = parse_rope(d, source, interleaved=bool(d.get("rope_interleave", mla is not None)))
    rotary = int(head_dim * rope.partial_rotary_factor) if mla is None else mla.qk_rope_head_dim
    if rope.freq_factors is not None and len(rope.freq_factors) != rotary // 2:
        raise ConfigError(f"{source}: rope short_factor has {len(rope.freq_factors)} factors; "
                          f"a rotary dimension of {rotary} needs {rotary // 2}")
    context = int_field(d, "max_position_embeddings", source, default=2048)
    if rope.type == "longrope":  # served within the context its short factors cover
        context = min(context, rope.original_max_position_embeddings)
    elif rope.type in ("linear", "yarn") and "gemma3" not in model_type:
        # The scaled positions are the context, as vLLM derives it (YaRN: the original
        # context times the factor); dynamic NTK is served within max_position_embeddings,
        # where transformers' frequencies are the unscaled ones.
        scaled = context if rope.type == "linear" else rope.original_max_position_embeddings
        context = int(scaled * rope.factor)
    if "sliding_window" not in family:
        family |= _sliding_window(d, model_type)
    moe = _moe(d, model_type, layers, source)
    if moe is not None and family.get("mlp_act", "silu") != "silu":
        raise UnsupportedModelError(f"{source}: hidden_act {act!r} is not supported for MoE "
                                    "experts (only silu)")
    return ModelConfig(
        **family,
        model_type=model_type,
        vocab_size=int_field(d, "vocab_size", source),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int_field(d, "num_key_value_heads", source, default=None) or heads,
        head_dim=head_dim,
        intermediate_size=int_field(d, "intermediate_size", source, default=0) or 0,
        max_position_embeddings=context,
        rms_norm_eps=float(get_any(d, "rms_norm_eps", default=1e-6)),
        rope=rope,
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        attention_bias=qkv_bias,
        attention_out_bias=out_bias,
        mlp_bias=bool(d.get("mlp_bias", False)),
        qk_norm=(model_type in ("qwen3", "qwen3_moe", "gemma3_text", "olmoe", "dots1",
                                "exaone4", "minimax_m2") + OLMO_TYPES
                 or (model_type == "glm4_moe" and bool_field(d, "use_qk_norm", source,
                                                             default=False))),
        mla=mla,
        moe=moe,
        num_mtp_layers=int_field(d, "num_nextn_predict_layers", source, default=0) or 0,
        dtype=_dtype(d, source),
        bos_token_id=d.get("bos_token_id"),
        eos_token_ids=token_ids(d.get("eos_token_id"), source),
    )


def _mlp_act(act: str, source: str) -> str:
    """The MLP activation of a ``hidden_act`` as transformers' ``ACT2FN`` reads it: SiLU,
    exact GELU, or GELU's tanh form."""
    if act in ("silu", "swish"):
        return "silu"
    if act in GELU_ACTS:
        return "gelu" if act == "gelu" else "gelu_tanh"
    raise UnsupportedModelError(f"{source}: hidden_act {act!r} is not supported (supported: "
                                f"silu, swish, {', '.join(GELU_ACTS)})")


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
