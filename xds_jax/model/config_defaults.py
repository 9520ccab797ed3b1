"""What transformers reads for the fields a ``config.json`` leaves out, and the types of the
fields it states.

A config on the Hub names only some fields; transformers builds the architecture's config class
from it, so every absent field is the class's constructor default: Mixtral's RoPE base is 1e6,
DeepSeek-V3's ``routed_scaling_factor`` 2.5 and one shared expert, Qwen3-MoE's
``norm_topk_prob`` false, Gemma 2's soft-caps 50 and 30. ``hf_class_defaults.json`` holds each
supported architecture's defaults, written by ``tests/golden/default_configs.py`` from
transformers (the version it names) so that no transformers is needed at run time. The sizes
(``vocab_size``, ``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``) and token ids
are left out: a config without a size is an error naming it, and the tokenizer's files give the
ids. A null stays null (the reader then derives the field, as transformers' constructors do).
"""

from __future__ import annotations

import functools
import json
import numbers
from pathlib import Path

from xds_jax.errors import ConfigError

TABLE = Path(__file__).with_name("hf_class_defaults.json")
# Image-text checkpoints whose language model transformers builds from a class of its own (its
# defaults differ: Qwen3-VL-MoE's text model renormalises its top-k, Qwen3-MoE does not).
TEXT_CLASS_TYPES = {"qwen2_vl": "qwen2_vl_text", "qwen2_5_vl": "qwen2_5_vl_text",
                    "qwen3_vl": "qwen3_vl_text", "qwen3_vl_moe": "qwen3_vl_moe_text"}
# Fields whose checkpoints also use another type than the default's: EXAONE 4's
# sliding_window_pattern is 4 or "LLLG" (config_families reads both).
FLEXIBLE = {"sliding_window_pattern"}


@functools.cache
def _table() -> dict:
    return json.loads(TABLE.read_text())


def class_defaults() -> dict[str, dict]:
    """``{model_type: {field: default}}``."""
    return _table()["defaults"]


def aliases(model_type: str) -> dict[str, str]:
    """``model_type``'s other spellings of fields (``{"num_experts": "num_local_experts"}``:
    transformers' ``attribute_map``)."""
    return _table()["aliases"].get(model_type, {})


def _kind(value) -> tuple[str, tuple]:
    """What a field holding ``value`` by default takes: (its name in errors, the types)."""
    if isinstance(value, bool):
        return "true or false", (bool,)
    if isinstance(value, int):
        return "an integer", (numbers.Integral,)
    if isinstance(value, float):
        return "a number", (numbers.Real,)
    if isinstance(value, str):
        return "a string", (str,)
    return ("a list", (list,)) if isinstance(value, list) else ("an object", (dict,))


def check_value(field: str, value, default, source: str) -> None:
    """``value`` (not null) of the type ``default`` has, else a ConfigError naming ``field``.
    An integral float counts as an integer (``4096.0``) and 0 / 1 as false / true."""
    name, types = _kind(default)
    if isinstance(value, bool) and bool not in types:
        ok = False
    elif isinstance(default, bool):
        ok = isinstance(value, bool) or (isinstance(value, int) and value in (0, 1))
    elif isinstance(default, int) and isinstance(value, float):
        ok = value.is_integer()
    else:
        ok = isinstance(value, types)
    if not ok:
        raise ConfigError(f"{source}: {field} must be {name}, got {value!r}")


def with_class_defaults(d: dict, model_type: str, source: str) -> dict:
    """``d`` with the absent fields of ``model_type``'s class filled in, the fields it states
    checked against their defaults' types. An explicit RoPE setting (``rope_theta``, or a
    ``rope_parameters`` / ``rope_scaling`` object) keeps the class's base out of it."""
    defaults = dict(class_defaults().get(model_type, {}))
    d = dict(d)
    for field, default in defaults.items():
        value = d.get(field)
        if value is not None and field not in FLEXIBLE:
            check_value(field, value, default, source)
            if isinstance(default, bool | int) and not isinstance(value, bool):
                d[field] = type(default)(value)  # 1 -> true, 4096.0 -> 4096
    for alias, field in aliases(model_type).items():  # stated under either name: no default
        if d.get(alias) is not None or d.get(field) is not None:
            defaults.pop(alias, None)
            defaults.pop(field, None)
    if any(isinstance(d.get(key), dict) and "rope_theta" in d[key]
           for key in ("rope_parameters", "rope_scaling")):
        defaults.pop("rope_theta", None)
    return defaults | d
