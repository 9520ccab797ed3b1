"""Tiny checkpoints with an MTP block (DeepSeek-V3's, GLM-4.5's): a golden model plus MTP weights
(transformers builds the models without their MTP layers, so the goldens have none)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from tests.helpers import GOLDEN


def make_mtp_checkpoint(out: Path, seed: int = 0, name: str = "deepseek_v3") -> Path:
    """Copy ``tests/golden/<name>`` (a model whose config counts ``num_nextn_predict_layers``)
    into ``out`` with an MTP block (layer N) named as DeepSeek-V3 and GLM-4.5 ship it: the last
    layer's weights, perturbed, and random enorm/hnorm/eh_proj. Returns ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(GOLDEN / name / "config.json", out / "config.json")
    tensors = load_file(str(GOLDEN / name / "model.safetensors"))
    cfg = json.loads((out / "config.json").read_text())
    last, mtp, d = cfg["num_hidden_layers"] - 1, cfg["num_hidden_layers"], cfg["hidden_size"]
    rng = np.random.default_rng(seed)
    for key in [k for k in tensors if k.startswith(f"model.layers.{last}.")]:
        noise = rng.normal(0, 0.01, tensors[key].shape).astype(np.float32)
        tensors[key.replace(f"layers.{last}.", f"layers.{mtp}.")] = tensors[key] + noise
    tensors[f"model.layers.{mtp}.enorm.weight"] = np.ones(d, np.float32)
    tensors[f"model.layers.{mtp}.hnorm.weight"] = np.ones(d, np.float32)
    # Mostly the target's hidden: the draft then leans on what the target already knows.
    eh = rng.normal(0, 0.02, (d, 2 * d)).astype(np.float32)
    eh[:, d:] += np.eye(d, dtype=np.float32)
    tensors[f"model.layers.{mtp}.eh_proj.weight"] = eh
    tensors[f"model.layers.{mtp}.shared_head.norm.weight"] = np.ones(d, np.float32)
    save_file(tensors, str(out / "model.safetensors"))
    return out


def make_mimic_checkpoint(out: Path, moe: bool = False) -> Path:
    """A one-layer DeepSeek-V3 whose MTP block imitates the target, so drafts are mostly
    accepted: the block is a copy of layer 0, ``eh_proj`` passes the (RMS-1) token embedding
    through, and the attention over the MTP KV sees the target's inputs shifted by one
    position (RoPE is relative), missing only the first token. With ``moe`` the one layer
    (and so the MTP block) is the golden model's first MoE layer (its routed experts go to an
    MA expert slice); else its dense layer 0."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((GOLDEN / "deepseek_v3" / "config.json").read_text())
    cfg["num_hidden_layers"] = 1
    src = cfg["first_k_dense_replace"] if moe else 0
    if moe:
        cfg["first_k_dense_replace"] = 0
    (out / "config.json").write_text(json.dumps(cfg))
    full = load_file(str(GOLDEN / "deepseek_v3" / "model.safetensors"))
    tensors = {k.replace(f"layers.{src}.", "layers.0."): v for k, v in full.items()
               if not k.startswith("model.layers.") or k.startswith(f"model.layers.{src}.")}
    emb = tensors["model.embed_tokens.weight"]
    tensors["model.embed_tokens.weight"] = emb / np.sqrt((emb ** 2).mean(-1, keepdims=True))
    d = cfg["hidden_size"]
    for key in [k for k in tensors if k.startswith("model.layers.0.")]:
        tensors[key.replace("layers.0.", "layers.1.")] = tensors[key].copy()
    tensors["model.layers.1.enorm.weight"] = np.ones(d, np.float32)
    tensors["model.layers.1.hnorm.weight"] = np.ones(d, np.float32)
    eh = np.zeros((d, 2 * d), np.float32)
    eh[:, :d] = np.eye(d, dtype=np.float32)
    tensors["model.layers.1.eh_proj.weight"] = eh
    tensors["model.layers.1.shared_head.norm.weight"] = tensors["model.norm.weight"].copy()
    save_file(tensors, str(out / "model.safetensors"))
    return out
