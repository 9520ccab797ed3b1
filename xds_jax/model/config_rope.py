"""RoPE settings of a ``config.json``: ``rope_parameters`` (transformers 5) or ``rope_theta``
+ ``rope_scaling`` (4; DeepSeek: ``type``), every scaling type checkpoints use."""

from __future__ import annotations

import math

from xds_jax.errors import ConfigError, UnsupportedModelError
from xds_jax.model.config import RopeConfig
from xds_jax.model.config_defaults import check_value
from xds_jax.model.config_fields import get_any, rope_by_layer_type

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")
ROPE_NUMBERS = ("rope_theta", "factor", "low_freq_factor", "high_freq_factor", "beta_fast",
                "beta_slow", "mscale", "mscale_all_dim", "attention_factor",
                "partial_rotary_factor", "original_max_position_embeddings")


def _rope_settings(d: dict, source: str) -> dict:
    """``rope_scaling`` (v4) under ``rope_parameters`` (v5), each an object or null, their
    numeric fields numbers."""
    merged: dict = {}
    for key in ("rope_scaling", "rope_parameters"):
        if d.get(key) is not None:
            check_value(key, d[key], {}, source)
        merged |= d.get(key) or {}
    for key in ROPE_NUMBERS:
        for where, value in ((f"rope_parameters.{key}", merged.get(key)), (key, d.get(key))):
            if value is not None:
                check_value(where, value, 1.0, source)
    return merged


def parse_rope(d: dict, source: str, interleaved: bool = False) -> RopeConfig:
    """RoPE settings from ``rope_parameters`` (v5) or ``rope_theta`` + ``rope_scaling`` (v4)."""
    if rope_by_layer_type(d) is not None:
        raise UnsupportedModelError(f"{source}: per-layer-type rope_parameters are not supported")
    merged = _rope_settings(d, source)
    theta = get_any(merged, "rope_theta", default=get_any(d, "rope_theta", default=10000.0))
    rope_type = get_any(merged, "rope_type", "type", default="default")
    if rope_type == "su":  # Phi-3's first name for LongRoPE
        rope_type = "longrope"
    if rope_type not in ROPE_TYPES:
        raise UnsupportedModelError(
            f"{source}: rope type {rope_type!r} is not supported (supported: {ROPE_TYPES})"
        )
    original = get_any(merged, "original_max_position_embeddings",
                       default=d.get("original_max_position_embeddings"))
    if rope_type in ("yarn", "llama3", "longrope") and original is None:
        original = d.get("max_position_embeddings")
        if original is None:
            raise ConfigError(f"{source}: {rope_type} RoPE needs "
                              "original_max_position_embeddings or max_position_embeddings")
    factor = merged.get("factor")
    if factor is None and rope_type in ("linear", "dynamic", "llama3"):
        raise ConfigError(f"{source}: {rope_type} RoPE needs a factor in "
                          f"{'rope_parameters' if 'rope_parameters' in d else 'rope_scaling'}")
    if factor is None and rope_type == "yarn" and d.get("max_position_embeddings"):
        factor = d["max_position_embeddings"] / original  # transformers' default for YaRN
    factor = float(1.0 if factor is None else factor)
    freq_factors = attention = None
    if rope_type == "longrope":
        freq_factors, attention = _longrope(merged, d, original, source)
    return RopeConfig(
        theta=float(theta),
        type=rope_type,
        factor=factor,
        original_max_position_embeddings=None if original is None else int(original),
        low_freq_factor=float(get_any(merged, "low_freq_factor", default=1.0)),
        high_freq_factor=float(get_any(merged, "high_freq_factor", default=4.0)),
        beta_fast=float(get_any(merged, "beta_fast", default=32.0)),
        beta_slow=float(get_any(merged, "beta_slow", default=1.0)),
        mscale=merged.get("mscale"),
        mscale_all_dim=merged.get("mscale_all_dim"),
        attention_factor=attention if attention is not None else merged.get("attention_factor"),
        truncate=bool(merged.get("truncate", True)),
        interleaved=interleaved,
        partial_rotary_factor=float(
            get_any(merged, "partial_rotary_factor", default=d.get("partial_rotary_factor", 1.0))
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
