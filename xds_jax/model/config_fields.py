"""Reading ``config.json`` fields: the first present spelling, required fields, integers,
booleans, each error naming the field and the file."""

from __future__ import annotations

from typing import Any

from xds_jax.errors import ConfigError


def get_any(d: dict, *names: str, default: Any = None) -> Any:
    """The first of ``names`` present with a non-null value."""
    for name in names:
        if d.get(name) is not None:
            return d[name]
    return default


def require(d: dict, name: str, source: str) -> Any:
    if d.get(name) is None:
        raise ConfigError(f"{source}: required field {name!r} is missing")
    return d[name]


def int_field(d: dict, name: str, source: str, default: Any = ...) -> int:
    value = require(d, name, source) if default is ... else d.get(name, default)
    if value is None:
        return value
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
        raise ConfigError(f"{source}: {name} must be an integer, got {value!r}")
    return int(value)


def bool_field(d: dict, name: str, source: str, default: bool) -> bool:
    """``d[name]`` as a JSON boolean; ``default`` where it is absent or null."""
    value = d.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ConfigError(f"{source}: {name} must be true or false, got {value!r}")
    return value


def rope_by_layer_type(d: dict) -> tuple[dict, dict] | None:
    """transformers 5's per-layer-type ``rope_parameters`` (``{"full_attention": {...},
    "sliding_attention": {...}}``) as (full, sliding); None where ``d`` has one set."""
    params = d.get("rope_parameters") or {}
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        return params.get("full_attention") or {}, params.get("sliding_attention") or {}
    return None
