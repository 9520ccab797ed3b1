"""Family-specific ``config.json`` fields as ``ModelConfig`` fields: Gemma's (Gemma, Gemma 2,
Gemma 3; an image-text checkpoint's text config is read by ``config_image_text``), Granite's
multipliers (Granite and Granite MoE), SmolLM3's layers without RoPE, OLMo 2/3's post-norms,
OLMo 2/3 and OLMoE's whole-projection q/k norms, GLM-4 and GLM-4.5's half-width RoPE and
defaults, ERNIE 4.5's, EXAONE 4's hybrid local / global layers."""

from __future__ import annotations

import math

from xds_jax.errors import ConfigError, UnsupportedModelError
from xds_jax.model.config_fields import int_field, rope_by_layer_type
from xds_jax.model.config_image_text import GEMMA3_TEXT_DEFAULTS

GEMMA_TYPES = ("gemma", "gemma2", "gemma3_text")
OLMO_TYPES = ("olmo2", "olmo3")
GRANITE_MOE_TYPES = ("granitemoe", "granitemoeshared")
GLM_TYPES = ("glm4", "glm4_moe", "glm4_moe_lite")
LAYER_TYPES = ("full_attention", "sliding_attention")
GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new", "gelu_fast")
GELU_ACTS = (*GELU_TANH, "gelu")  # "gelu": exact (Gemma 1 checkpoints mean the tanh form)


def gemma_fields(d: dict, model_type: str, source: str) -> dict:
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
    if act not in GELU_ACTS:
        raise UnsupportedModelError(f"{source}: hidden_activation {act!r} is not supported "
                                    f"for {model_type} (supported: {', '.join(GELU_ACTS)})")
    layers = int_field(d, "num_hidden_layers", source)
    # transformers runs Gemma 1's "gelu" as the tanh form (its checkpoints say "gelu" and
    # were trained with it), Gemma 2's and 3's as exact GELU
    exact = act == "gelu" and model_type != "gemma"
    out: dict = {"mlp_act": "gelu" if exact else "gelu_tanh",
                 "norm_placement": "pre" if model_type == "gemma" else "sandwich"}
    scalar = d.get("query_pre_attn_scalar")
    if scalar is not None and model_type != "gemma":
        out["attention_multiplier"] = float(scalar) ** -0.5
    # Gemma 2 caps attention logits and final logits; Gemma 3 only the final ones
    # (transformers' Gemma 3 reads no attn_logit_softcapping: its checkpoints set it null)
    caps = {"gemma2": ("attn_logit_softcapping", "final_logit_softcapping"),
            "gemma3_text": ("final_logit_softcapping",)}.get(model_type, ())
    for key in caps:
        if d.get(key) is not None:
            out["attn_softcap" if key.startswith("attn") else "final_softcap"] = float(d[key])
    hidden = int_field(d, "hidden_size", source)
    out["embedding_multiplier"] = math.sqrt(hidden)
    tied = bool(d.get("tie_word_embeddings", True))
    out["logits_scale"] = 1 / math.sqrt(hidden) if tied else 1.0
    config = dict(d, tie_word_embeddings=tied)
    if model_type != "gemma" and d.get("sliding_window"):
        types = layer_types(d, layers, source)
        if types:
            out["local_layers"] = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
        elif model_type == "gemma2":
            out["local_layers"] = tuple(range(0, layers, 2))
        else:
            pattern = int_field(d, "sliding_window_pattern", source, default=6)
            out["local_layers"] = tuple(i for i in range(layers) if (i + 1) % pattern)
    else:
        config["sliding_window"] = None
    by_type = rope_by_layer_type(d)
    if by_type is not None:  # Gemma 3, transformers 5
        config["rope_parameters"] = by_type[0]
        local = by_type[1].get("rope_theta")
    else:
        local = d.get("rope_local_base_freq")
    if model_type == "gemma3_text":
        out["local_rope_theta"] = float(local if local is not None else 10000.0)
        if not (config.get("rope_parameters") or {}).get("rope_theta") and "rope_theta" not in d:
            config["rope_theta"] = GEMMA3_TEXT_DEFAULTS["rope_theta"]  # the global base
    out["config"] = config
    out["sliding_window"] = config.get("sliding_window")
    return out


def granite_fields(d: dict, source: str) -> dict:
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


def family_fields(d: dict, model_type: str, source: str) -> dict:
    """The ``ModelConfig`` fields particular to ``model_type``'s family, plus ``config``: ``d``
    as the generic reading should see it (the family's defaults filled in). A family that sets
    ``sliding_window`` sets its ``local_layers`` too."""
    if model_type in GEMMA_TYPES:
        return gemma_fields(d, model_type, source)
    if model_type in ("granite", *GRANITE_MOE_TYPES):
        return granite_fields(d, source) | {"config": d}
    if model_type == "smollm3":
        return smollm3_fields(d, source)
    if model_type in OLMO_TYPES:
        return olmo_fields(d, model_type, source)
    if model_type == "olmoe":
        return olmoe_fields(d, source)
    if model_type in GLM_TYPES:
        return glm_fields(d, model_type)
    if model_type in ("ernie4_5", "ernie4_5_moe"):
        return ernie_fields(d, model_type, source)
    if model_type == "exaone4":
        return exaone4_fields(d, source)
    if model_type == "minimax_m2":
        return minimax_m2_fields(d)
    if model_type == "internlm3":
        return internlm3_fields(d)
    return {"config": d}


def layer_types(d: dict, layers: int, source: str, name: str = "layer_types",
                kinds: tuple[str, ...] = LAYER_TYPES) -> list[str] | None:
    """``d[name]`` (one of ``kinds`` per layer: ``layer_types``' attention kinds, or GLM-4.7-
    Flash's ``mlp_layer_types``), checked; None when absent."""
    types = d.get(name)
    if types is None:
        return None
    if (not isinstance(types, list) or len(types) < layers
            or any(t not in kinds for t in types)):
        raise ConfigError(f"{source}: {name} must list one of {kinds} for each of "
                          f"the {layers} layers, got {types!r}")
    return types[:layers]


def _with_defaults(d: dict, **fields) -> dict:
    """A copy of ``d`` with each of ``fields`` where ``d`` leaves it absent or null (a config
    class's defaults)."""
    return {**d, **{k: v for k, v in fields.items() if d.get(k) is None}}


def _rope_field(d: dict, name: str):
    """``name`` as the top level or the RoPE parameters (v4 ``rope_scaling``, v5
    ``rope_parameters``) set it; None where none does."""
    for where in (d, d.get("rope_parameters") or {}, d.get("rope_scaling") or {}):
        if where.get(name) is not None:
            return where[name]
    return None


def window_fields(window: int | None, types: list[str] | None) -> dict:
    """``sliding_window`` and ``local_layers`` for the layers ``types`` names sliding; no
    window where none is."""
    local = tuple(i for i, t in enumerate(types or ()) if t == "sliding_attention")
    return {"sliding_window": window if local else None, "local_layers": local or None}


def _with_rope_theta(d: dict, theta: float) -> dict:
    """``d`` with ``rope_theta`` set to the family's default where it names no RoPE base."""
    if d.get("rope_theta") is not None or (d.get("rope_parameters") or {}).get("rope_theta"):
        return d
    return dict(d, rope_theta=theta)


def smollm3_fields(d: dict, source: str) -> dict:
    """SmolLM3: a Llama whose ``no_rope_layers`` (1: RoPE, 0: none; by default every
    ``no_rope_layer_interval``-th layer has none) attend without RoPE; a sliding window only
    with ``use_sliding_window``, on the ``layer_types`` sliding layers (by default the NoPE
    ones), as SmolLM3Config builds them. Tied embeddings and RoPE base 2e6 by default."""
    layers = int_field(d, "num_hidden_layers", source)
    flags = d.get("no_rope_layers")
    if flags is None:
        interval = int_field(d, "no_rope_layer_interval", source, default=4)
        if interval is None or interval <= 0:
            raise ConfigError(f"{source}: no_rope_layer_interval must be a positive integer, "
                              f"got {interval!r}")
        flags = [int((i + 1) % interval != 0) for i in range(layers)]
    if (not isinstance(flags, list) or len(flags) < layers
            or any(isinstance(f, bool) or f not in (0, 1) for f in flags)):
        raise ConfigError(f"{source}: no_rope_layers must list 0 or 1 for each of the "
                          f"{layers} layers, got {flags!r}")
    out: dict = {"nope_layers": tuple(i for i in range(layers) if not flags[i])}
    window = int_field(d, "sliding_window", source, default=None)
    types = layer_types(d, layers, source)
    if d.get("use_sliding_window") and window is not None:
        types = types or ["full_attention" if flags[i] else "sliding_attention"
                          for i in range(layers)]
    else:
        types = None
    out |= window_fields(window, types)
    config = dict(d, tie_word_embeddings=bool(d.get("tie_word_embeddings", True)))
    out["config"] = _with_rope_theta(config, 2_000_000.0)
    return out


def olmo_fields(d: dict, model_type: str, source: str) -> dict:
    """OLMo 2 / 3: norms on the attention and MLP outputs only, q/k norms over the whole
    projections, RMSNorm eps 1e-5 by default. OLMo 3 adds sliding-window layers
    (``layer_types``, by default three of every four; window 4096 by default) whose RoPE is
    the plain rotation at their own base (per-layer-type ``rope_parameters``; any scaling
    belongs to the full-attention layers)."""
    out: dict = {"norm_placement": "post", "qk_norm_scope": "whole"}
    config = _with_defaults(d, rms_norm_eps=1e-5)
    if model_type == "olmo2":
        out["config"] = config
        return out
    layers = int_field(d, "num_hidden_layers", source)
    types = layer_types(d, layers, source) or [
        "sliding_attention" if (i + 1) % 4 else "full_attention" for i in range(layers)]
    out |= window_fields(int_field(d, "sliding_window", source, default=4096), types)
    by_type = rope_by_layer_type(d)
    sliding = {}
    if by_type is not None:  # transformers 5
        config["rope_parameters"], sliding = by_type
    if sliding.get("rope_type", "default") != "default":
        raise UnsupportedModelError(f"{source}: rope_parameters.sliding_attention.rope_type "
                                    f"{sliding['rope_type']!r} is not supported (only default)")
    config = _with_rope_theta(config, 500_000.0)
    full_theta = (config.get("rope_parameters") or {}).get("rope_theta") or config["rope_theta"]
    out["local_rope_theta"] = float(sliding.get("rope_theta") or full_theta)
    out["config"] = config
    return out


def olmoe_fields(d: dict, source: str) -> dict:
    """OLMoE: pre-norm layers (unlike OLMo 2) with q/k norms over the whole projections, RMSNorm
    eps 1e-5 by default; its ``clip_qkv`` (unset on the released checkpoints) is not served."""
    if d.get("clip_qkv") is not None:
        raise UnsupportedModelError(f"{source}: clip_qkv {d['clip_qkv']!r} is not supported "
                                    "(only null)")
    return {"qk_norm_scope": "whole", "config": _with_defaults(d, rms_norm_eps=1e-5)}


def glm_fields(d: dict, model_type: str) -> dict:
    """GLM-4 (``glm4``: GLM-4-9B/32B-0414, GLM-Z1), GLM-4.5 / 4.6 (``glm4_moe``) and the MLA
    GLM (``glm4_moe_lite``: RMSNorm eps 1e-5 only) with their config classes' defaults where
    a field is absent: RoPE on the first half of each head
    (``partial_rotary_factor`` 0.5, at the top level or in ``rope_parameters``), RMSNorm eps
    (1.5625e-7 / 1e-5). GLM-4 also: q/k/v biases by default (``attention_bias`` true), RoPE on
    interleaved pairs, and norms on the attention and MLP outputs too (sandwich: its
    ``post_self_attn_layernorm`` and ``post_mlp_layernorm``). o_proj has no bias in either."""
    config = _with_defaults(d, rms_norm_eps=1.5625e-7 if model_type == "glm4" else 1e-5)
    if model_type == "glm4_moe_lite":  # DeepSeek's MLA: RoPE on its qk_rope_head_dim
        return {"config": config}
    if _rope_field(d, "partial_rotary_factor") is None:
        config["partial_rotary_factor"] = 0.5
    if model_type == "glm4_moe":
        return {"config": config}
    config = _with_defaults(config, attention_bias=True)
    config.setdefault("rope_interleave", True)
    return {"norm_placement": "sandwich", "config": config}


def ernie_fields(d: dict, model_type: str, source: str) -> dict:
    """ERNIE 4.5 (``ernie4_5``: ERNIE-4.5-0.3B; ``ernie4_5_moe``: 21B-A3B, 300B-A47B): a Llama
    whose RoPE turns interleaved pairs (GLM's rotation over the whole head) and whose
    ``use_bias`` puts biases on every attention and MLP projection; the config classes'
    defaults where a field is absent (tied embeddings, eps 1e-5; the dense model's 128-wide
    heads). The MoE model's ``use_bias`` would also bias the LM head: not served."""
    defaults = {"tie_word_embeddings": True, "rms_norm_eps": 1e-5}
    if model_type == "ernie4_5":
        defaults["head_dim"] = 128
    config = {**defaults, **{k: v for k, v in d.items() if v is not None}}
    bias = bool(config.get("use_bias", False))
    if bias and model_type == "ernie4_5_moe":
        raise UnsupportedModelError(f"{source}: use_bias is not supported for ernie4_5_moe "
                                    "(its LM head would have a bias)")
    config |= {"attention_bias": bias, "mlp_bias": bias, "rope_interleave": True}
    return {"config": config}


def exaone4_fields(d: dict, source: str) -> dict:
    """EXAONE 4.0: OLMo 2's layer (norms on the attention and MLP outputs only) with per-head
    q/k norms; with a ``sliding_window``, hybrid attention: sliding layers (``layer_types``,
    else ``sliding_window_pattern``: every 4th layer global, or a string such as "LLLG"
    repeated) rotate with RoPE and the global ones use none (NoPE); without a window every
    layer is global with RoPE. Exaone4Config's defaults where absent: window 4096, eps 1e-5."""
    layers = int_field(d, "num_hidden_layers", source)
    window = int_field(d, "sliding_window", source, default=4096) if (
        d.get("sliding_window") is not None or "sliding_window" not in d) else None
    out: dict = {"norm_placement": "post", "config": _with_defaults(d, rms_norm_eps=1e-5)}
    if window is None:
        return out
    types = layer_types(d, layers, source)
    if types is None:
        pattern = d.get("sliding_window_pattern", 4)
        if isinstance(pattern, str) and pattern and set(pattern) <= {"L", "G"}:
            types = ["sliding_attention" if pattern[i % len(pattern)] == "L"
                     else "full_attention" for i in range(layers)]
        elif isinstance(pattern, int) and not isinstance(pattern, bool) and pattern > 0:
            types = ["sliding_attention" if (i + 1) % pattern else "full_attention"
                     for i in range(layers)]
        else:
            raise ConfigError(f"{source}: sliding_window_pattern must be a positive integer or "
                              f"a string of L and G, got {pattern!r}")
    out |= window_fields(window, types)
    out["nope_layers"] = tuple(i for i, t in enumerate(types) if t == "full_attention")
    return out


def minimax_m2_fields(d: dict) -> dict:
    """MiniMax-M2: q/k norms over the whole projections (OLMo's), RoPE on the first
    ``rotary_dim`` dims of each head (its released configs' spelling of a partial rotary
    factor), MiniMaxM2Config's RoPE base 5e6 and 128-wide heads where none is named."""
    config = _with_defaults(d, head_dim=128)
    rotary = d.get("rotary_dim")
    if rotary is not None and _rope_field(d, "partial_rotary_factor") is None:
        config["partial_rotary_factor"] = rotary / config["head_dim"]
    return {"qk_norm_scope": "whole", "config": _with_rope_theta(config, 5_000_000.0)}


def internlm3_fields(d: dict) -> dict:
    """InternLM3: a Llama whose configs spell its biases ``qkv_bias`` (every attention
    projection) and ``bias`` (the MLP's), as InternLM3Config's attribute map reads them, with
    its defaults where absent (128-wide heads, eps 1e-5)."""
    config = {"head_dim": 128, "rms_norm_eps": 1e-5,
              **{k: v for k, v in d.items() if v is not None}}
    for name, alias in (("attention_bias", "qkv_bias"), ("mlp_bias", "bias")):
        if name not in config and alias in config:
            config[name] = config[alias]
    return {"config": config}
