"""Text embeddings from a decoder model's hidden states (vLLM's pooling runner, ``LLM.embed``).

A prompt runs once through the model from an empty cache of its own; its final hidden states
(after the final norm: transformers' ``last_hidden_state``) are pooled into one vector:

- ``last``: the last token's state (what vLLM pools a causal LM with by default, and what
  decoder embedding models such as Qwen3-Embedding and e5-mistral are trained for);
- ``mean``: the average over the prompt's tokens;
- ``cls``: the first token's state;

then, with ``normalize``, scaled to unit length. A model directory with a sentence-transformers
configuration (``modules.json``, ``1_Pooling/config.json``) names its pooling and whether it
normalises; without one it is ``last``, normalised, as vLLM.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp

from xds_jax.errors import ConfigError
from xds_jax.model.config import ModelConfig
from xds_jax.model.layers import rms_norm
from xds_jax.model.params import model_dtype
from xds_jax.model.reference import forward, new_caches

POOLINGS = ("last", "mean", "cls")
# sentence-transformers' 1_Pooling/config.json flags, in the order they are taken
ST_MODES = {"pooling_mode_lasttoken": "last", "pooling_mode_mean_tokens": "mean",
            "pooling_mode_cls_token": "cls"}


@functools.partial(jax.jit, static_argnames=("cfg", "pooling", "normalize"))
def embed_tokens(params: dict, tokens_S: jax.Array, length: jax.Array, *, cfg: ModelConfig,
                 pooling: str, normalize: bool) -> jax.Array:
    """The embedding ``[D]`` (float32) of the first ``length`` of ``tokens_S`` (the rest is
    padding, hidden from them by the causal mask)."""
    s = tokens_S.shape[0]
    caches = new_caches(cfg, 1, s, model_dtype(params))
    x_1SD, _ = forward(params, cfg, tokens_S[None], jnp.arange(s)[None], caches,
                       jnp.zeros((1, 1), jnp.int32))
    h_SD = rms_norm(x_1SD[0], params["final_norm"], cfg.rms_norm_eps).astype(jnp.float32)
    if pooling == "last":
        e_D = h_SD[length - 1]
    elif pooling == "cls":
        e_D = h_SD[0]
    else:
        mask_S = (jnp.arange(s) < length).astype(jnp.float32)
        e_D = (h_SD * mask_S[:, None]).sum(axis=0) / length.astype(jnp.float32)
    if normalize:
        e_D = e_D / jnp.maximum(jnp.linalg.norm(e_D), 1e-12)
    return e_D


def check_pooling(pooling: str) -> str:
    if pooling not in POOLINGS:
        raise ConfigError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    return pooling


def model_pooling(model_path: Path | None) -> tuple[str, bool]:
    """The pooling and normalisation a model directory's sentence-transformers configuration
    names; ``("last", True)`` without one."""
    if model_path is None or not Path(model_path).is_dir():
        return "last", True
    root = Path(model_path)
    try:
        modules = json.loads((root / "modules.json").read_text())
    except (OSError, ValueError):
        return "last", True
    pooling, normalize = "last", False
    for module in modules if isinstance(modules, list) else []:
        kind = str(module.get("type", ""))
        if kind.endswith("Normalize"):
            normalize = True
        elif kind.endswith("Pooling"):
            try:
                flags = json.loads((root / module.get("path", "1_Pooling") / "config.json")
                                   .read_text())
            except (OSError, ValueError):
                continue
            pooling = next((name for key, name in ST_MODES.items() if flags.get(key)), pooling)
    return pooling, normalize
