"""A model's default sampling parameters, from its ``generation_config.json`` (vLLM's
``--generation-config`` / ``--override-generation-config``).

Checkpoints name the sampling their authors recommend there (Qwen3: temperature 0.6, top_p
0.95, top_k 20; Llama 3: temperature 0.6, top_p 0.9). As vLLM does by default, a request that
leaves one of these fields unset gets the model's value instead of the engine's: the server's
completions, chat and responses routes, and ``LLM.generate`` without ``SamplingParams``
(``LLM.get_default_sampling_params()``). ``max_new_tokens`` becomes ``max_tokens``: the
default where a request sets none, and the most a request gets (vLLM's min of the two).

Sources (``EngineConfig.generation_config``): ``"auto"`` (default) the model directory's file
where it has one (GGUF files and config-only models have none); ``"vllm"`` none, the engine's
own defaults; or a directory holding a ``generation_config.json``. ``override_generation_config``
(a dict, or a JSON object as text) sets fields on top, in the file's spelling.
"""

from __future__ import annotations

import json
import logging
import numbers
from pathlib import Path

from xds_jax.errors import ConfigError, SamplingParamsError

log = logging.getLogger(__name__)

FILE = "generation_config.json"
# generation_config.json's name -> SamplingParams' (vLLM's ``get_diff_sampling_param``)
FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
          "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}
INTEGER_FIELDS = ("top_k", "max_new_tokens")
# transformers' GenerationConfig defaults: a file stating one changes nothing (vLLM reads the
# file's differences from them, ``to_diff_dict``), so an explicit top_k 50 is not applied.
HF_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 50, "repetition_penalty": 1.0}
SOURCES = ("auto", "vllm")


def generation_file(source: str, model_path: Path) -> Path | None:
    """The ``generation_config.json`` that ``source`` names for the model at ``model_path``."""
    if not isinstance(source, str) or not source:
        raise ConfigError(f"generation_config must be 'auto', 'vllm' or a directory holding "
                          f"{FILE}, got {source!r}")
    if source == "vllm":
        return None
    if source == "auto":
        path = model_path / FILE
        return path if model_path.is_dir() and path.is_file() else None
    folder = Path(source).expanduser()
    if not (folder / FILE).is_file():
        raise ConfigError(f"generation_config: {folder} holds no {FILE} (give 'auto', 'vllm' "
                          f"or a directory with one)")
    return folder / FILE


def directory_eos(source: str) -> tuple[int, ...]:
    """The ``eos_token_id`` (one or a list) of a directory source's generation_config.json:
    vLLM reads a model's stop tokens from the generation config it is given. () for ``"auto"``
    and ``"vllm"`` (the loader reads the model directory's own file)."""
    if source in SOURCES:
        return ()
    from xds_jax.model.config_hf import token_ids

    path = generation_file(source, Path())
    return token_ids(_read_object(path).get("eos_token_id"), str(path))


def _read_object(path: Path) -> dict:
    """The JSON object in ``path``, or a ConfigError naming the file."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot read it as JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


def overrides_dict(value) -> dict:
    """``override_generation_config`` as a dict (None: empty; text: a JSON object)."""
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ConfigError(f"override_generation_config is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"override_generation_config must be a JSON object, got {value!r}")
    unknown = sorted(set(value) - set(FIELDS))
    if unknown:
        raise ConfigError(f"override_generation_config: unknown field(s) {', '.join(unknown)}; "
                          f"the fields are {', '.join(FIELDS)}")
    return value


def _checked(fields: dict, where: str) -> dict:
    """The sampling fields of ``fields`` with their values checked, as SamplingParams names."""
    out = {}
    for name, key in FIELDS.items():
        value = fields.get(name)
        if value is None:
            continue
        integer = name in INTEGER_FIELDS
        kind = numbers.Integral if integer else numbers.Real
        if isinstance(value, bool) or not isinstance(value, kind):
            raise ConfigError(f"{where}: {name} must be {'an integer' if integer else 'a number'}"
                              f", got {value!r}")
        if name == "max_new_tokens" and value < 1:
            raise ConfigError(f"{where}: max_new_tokens must be at least 1, got {value}")
        out[key] = int(value) if integer else float(value)
    return out


def sampling_defaults(source: str, model_path: Path, overrides=None) -> dict:
    """SamplingParams fields (``temperature``, ``top_p``, ``top_k``, ``min_p``,
    ``repetition_penalty``, ``max_tokens``) the model sets by default, per ``source`` and
    ``overrides``; empty where it sets none. A value SamplingParams refuses is a ConfigError
    naming where it came from."""
    extra = overrides_dict(overrides)
    path = generation_file(source, model_path)
    found = {}
    if path is not None:
        data = {k: v for k, v in _read_object(path).items()
                if k in FIELDS and (isinstance(v, bool) or HF_DEFAULTS.get(k) != v)}
        found = _checked(data, str(path))
    found |= _checked(extra, "override_generation_config")
    if found:
        from xds_jax.sampling.params import SamplingParams

        try:
            SamplingParams(**found)
        except SamplingParamsError as e:
            where = path if path is not None else "override_generation_config"
            raise ConfigError(f"default sampling parameters from {where}: {e}") from None
        log.info("default sampling parameters from %s: %s (a request's own values take "
                 "precedence; generation_config='vllm' turns these off)",
                 path or "override_generation_config", found)
    return found
