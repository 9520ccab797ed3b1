"""MTP draft heads shipped for models that have none (``xds_jax/assets/mtp/<name>/``).

A head is one DeepSeek-style MTP block (``enorm``, ``hnorm``, ``eh_proj``, ``layer``,
``final_norm``) saved with Orbax in bfloat16 under ``<dir>/block``, plus its draft vocabulary
``vocab_ids`` (int32 target ids) and ``<dir>/head.json`` (the target it was trained for and
its training numbers). Loading casts the block to the target's dtype and gathers the target's
LM-head rows of the draft vocabulary (``head [N, D]``, see ``xds_jax.model.mtp``).
``make train-mtp`` writes the SmolLM2 head (``xds_jax.train.mtp_train``). ``XDS_DRAFT_HEAD``
names another head directory to use instead (a head you trained; it must fit the model).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from xds_jax.errors import ConfigError
from xds_jax.model.config import ModelConfig
from xds_jax.model.fused import fuse_block
from xds_jax.model.out_major import out_major_block, prefers_out_major
from xds_jax.model.params import model_dtype
from xds_jax.model.quant import SCALE_SUFFIX

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "mtp"
# Target checkpoint file name -> the head trained on it.
SHIPPED = {"SmolLM2-135M-Instruct.Q4_1.gguf": ASSETS / "smollm2"}


def shipped_head_dir(model_path: Path) -> Path | None:
    """The shipped head's directory for a resolved model file (or ``XDS_DRAFT_HEAD``), if
    there is one."""
    override = os.environ.get("XDS_DRAFT_HEAD")
    if override:
        if not (Path(override) / "head.json").is_file():
            raise ConfigError(f"XDS_DRAFT_HEAD={override} is not a draft head directory "
                              "(no head.json)")
        return Path(override)
    path = SHIPPED.get(Path(model_path).name)
    return path if path is not None and (path / "head.json").is_file() else None


def save_head(path: Path, block: dict, vocab_ids: np.ndarray, meta: dict) -> None:
    """Write ``block`` (bfloat16), ``vocab_ids`` (most frequent first: a prefix is a smaller
    draft vocabulary) and ``meta`` as a head directory."""
    import orbax.checkpoint as ocp

    path = Path(path).resolve()
    tree = jax.tree_util.tree_map(lambda a: np.asarray(a, jnp.bfloat16), block)
    tree["vocab_ids"] = np.asarray(vocab_ids, np.int32)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path / "block", tree, force=True)
    checkpointer.wait_until_finished()
    (path / "head.json").write_text(json.dumps(meta, indent=1) + "\n")


def read_head(path: Path) -> tuple[dict, np.ndarray, dict]:
    """A head directory as stored: the block (bfloat16), ``vocab_ids`` and ``head.json``."""
    import orbax.checkpoint as ocp

    path = Path(path).resolve()
    meta = json.loads((path / "head.json").read_text())
    tree = ocp.StandardCheckpointer().restore(path / "block")
    return tree, np.asarray(tree.pop("vocab_ids"), np.int32), meta


def load_head(path: Path, params: dict, cfg: ModelConfig) -> dict:
    """The MTP block of a head directory, ready for ``params["mtp"]``."""
    tree, vocab_ids, meta = read_head(path)
    want = {"hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size,
            "num_heads": cfg.num_heads, "num_kv_heads": cfg.num_kv_heads}
    got = {k: meta.get(k) for k in want}
    if got != want:
        raise ConfigError(f"draft head {path} was trained for {got}, this model is {want}")
    dtype = model_dtype(params)
    block = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), tree)
    ids = jnp.asarray(vocab_ids)
    block["vocab_ids"] = ids
    block["head"] = _head_rows(params, cfg, ids).astype(dtype)
    return head_layout(block, cfg)


def head_layout(block: dict, cfg: ModelConfig) -> dict:
    """A head's block as the loader lays out a target layer: fused projections, and on CPU
    stored output-major (``xds_jax.model.fused``, ``xds_jax.model.out_major``)."""
    block = fuse_block(block, cfg)
    return out_major_block(block, cfg) if prefers_out_major() else block


def _head_rows(params: dict, cfg: ModelConfig, ids: jax.Array) -> jax.Array:
    """The target head's rows ``[N, D]`` for the draft vocabulary ``ids``, dequantised when
    the target's embedding / LM head is INT8 (``xds_jax.model.quant``: one scale per
    vocabulary row)."""
    name = "embed" if cfg.tie_word_embeddings else "lm_head"
    w = params[name] if name == "embed" else params[name].T  # [V, D]
    rows = jnp.take(w, ids, axis=0)
    scale = params.get(name + SCALE_SUFFIX)
    if scale is not None:
        rows = rows.astype(jnp.float32) * jnp.take(scale, ids)[:, None]
    return rows


def attach_shipped_head(params: dict, cfg: ModelConfig, model_path: Path) -> dict:
    """``params`` with the shipped head as its MTP block, when the model has no MTP weights
    and a head is shipped for it; otherwise ``params`` unchanged."""
    if params.get("mtp"):
        return params
    path = shipped_head_dir(model_path)
    if path is None:
        return params
    log.info("speculative decoding: MTP draft head from %s", path)
    return {**params, "mtp": [load_head(path, params, cfg)]}
