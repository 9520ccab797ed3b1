"""Hugging Face safetensors checkpoints: the tensor source and the key map per architecture.

Experts are read split per expert (``mlp.experts.{e}.gate_proj.weight``, Mixtral's
``block_sparse_moe.experts.{e}.w1``) and stacked, or fused (``mlp.experts.gate_up_proj``) as
transformers 5 keeps them in memory and Granite MoE stores them (``input_linear``). DeepSeek
MTP blocks sit after the last decoder layer.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from safetensors import safe_open

from xds_jax.errors import WeightLoadError
from xds_jax.loading.checkpoint_quant import RAW_DTYPES, read_raw
from xds_jax.loading.weights import Leaf, first_present, transpose, transpose_last2
from xds_jax.model.config import ModelConfig
from xds_jax.model.config_families import GEMMA_TYPES, GRANITE_MOE_TYPES

_ATTN = {
    "q": "q_proj.weight", "k": "k_proj.weight", "v": "v_proj.weight", "o": "o_proj.weight",
    "q_bias": "q_proj.bias", "k_bias": "k_proj.bias", "v_bias": "v_proj.bias",
    "o_bias": "o_proj.bias", "q_norm": "q_norm.weight", "k_norm": "k_norm.weight",
    "q_a": "q_a_proj.weight", "q_a_norm": "q_a_layernorm.weight", "q_b": "q_b_proj.weight",
    "kv_a": "kv_a_proj_with_mqa.weight", "kv_a_norm": "kv_a_layernorm.weight",
    "kv_b": "kv_b_proj.weight",
}
_MLP = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
_MIXTRAL_EXPERT = {"gate": "w1", "up": "w3", "down": "w2"}


class SafetensorsSource:
    """All ``*.safetensors`` files of a directory, read lazily by tensor name."""

    def __init__(self, directory: Path):
        files = sorted(Path(directory).glob("*.safetensors"))
        if not files:
            raise WeightLoadError(f"no *.safetensors files in {directory}")
        self._where: dict[str, Path] = {}
        for f in files:
            try:
                with safe_open(str(f), framework="numpy") as h:
                    for key in h.keys():
                        self._where[key] = f
            except Exception as e:  # safetensors raises its own error types
                raise WeightLoadError(f"cannot read {f}: {e}") from e
        self._handles: dict[Path, object] = {}

    def names(self):
        return self._where.keys()

    def float_dtype(self) -> str | None:
        """The dtype of the checkpoint's first float32 / bfloat16 / float16 tensor (what
        transformers loads with ``dtype="auto"`` where the config names none), or None."""
        names = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
        for f in dict.fromkeys(self._where.values()):
            with safe_open(str(f), framework="numpy") as h:
                for key in h.keys():
                    found = names.get(h.get_slice(key).get_dtype())
                    if found is not None:
                        return found
        return None

    def get(self, name: str) -> np.ndarray:
        f = self._where[name]
        if f not in self._handles:
            self._handles[f] = safe_open(str(f), framework="flax")
        handle = self._handles[f]
        if handle.get_slice(name).get_dtype() in RAW_DTYPES:  # FP8: safetensors cannot convert it
            return read_raw(f, name)
        return np.asarray(handle.get_tensor(name))


TEXT_MODEL_PREFIXES = ("language_model.model.", "model.language_model.")


class TextModelSource:
    """An image-text checkpoint's language model under the plain names (``model.*``,
    ``lm_head.weight``): Gemma 3 keeps it under ``language_model.model.`` (transformers 4)
    or ``model.language_model.`` (5); the vision tower's tensors are left out."""

    def __init__(self, src, prefix: str):
        self._src, self._prefix = src, prefix
        self._map = {"model." + n[len(prefix):]: n for n in src.names() if n.startswith(prefix)}
        for head in ("language_model.lm_head.weight", "lm_head.weight"):
            if head in src.names():
                self._map["lm_head.weight"] = head

    def names(self):
        return self._map.keys()

    def get(self, name: str):
        return self._src.get(self._map[name])


def text_model_source(src):
    """``src`` itself, or its language model (``TextModelSource``) where it nests one."""
    names = set(src.names())
    for prefix in TEXT_MODEL_PREFIXES:
        if prefix + "embed_tokens.weight" in names:
            return TextModelSource(src, prefix)
    return src


def _leaf(name: str) -> Leaf:
    return Leaf((name,), transpose) if not name.endswith(("norm.weight", "bias")) else Leaf((name,))


def _mlp(prefix: str, shapes: dict) -> dict:
    out = {k: Leaf((f"{prefix}.{_MLP[k]}.weight",), transpose) for k in ("gate", "up", "down")}
    for k in ("gate_bias", "up_bias", "down_bias"):
        if k in shapes:
            out[k] = Leaf((f"{prefix}.{_MLP[k[:-5]]}.bias",))
    return out


def _rows_first(a: np.ndarray, rows: int) -> np.ndarray:
    """A fused expert tensor as transformers 5 holds it, ``[E, rows, cols]``: as stored, or
    transposed where the checkpoint keeps ``[E, cols, rows]`` (Qwen3-VL-MoE's gate_up
    ``[E, D, 2F]`` and down ``[E, F, D]``; transformers transposes them on load too)."""
    return a if a.shape[1] == rows else np.swapaxes(a, 1, 2)


def _experts(cfg: ModelConfig, prefix: str, names: set[str], mixtral: bool) -> dict:
    fused = f"{prefix}.experts.gate_up_proj"
    if fused in names:  # transformers 5 in-memory layout: [E, 2F, D] and [E, D, F]
        f, d = cfg.moe.moe_intermediate_size, cfg.hidden_size
        return {
            "gate": Leaf((fused,), lambda a: transpose_last2(_rows_first(a, 2 * f)[:, :f])),
            "up": Leaf((fused,), lambda a: transpose_last2(_rows_first(a, 2 * f)[:, f:])),
            "down": Leaf((f"{prefix}.experts.down_proj",),
                         lambda a: transpose_last2(_rows_first(a, d))),
        }
    names_of = _MIXTRAL_EXPERT if mixtral else _MLP
    e = cfg.moe.num_experts
    return {
        k: Leaf(tuple(f"{prefix}.experts.{i}.{names_of[k]}.weight" for i in range(e)),
                transpose_last2)
        for k in ("gate", "up", "down")
    }


def _granite_moe(cfg: ModelConfig, p: str, shapes: dict, names: set[str]) -> dict:
    """Granite MoE: experts fused as ``input_linear`` ``[E, 2F, D]`` (gate rows, then up) and
    ``output_linear`` ``[E, D, F]`` (transformers 5 in memory: ``experts.gate_up_proj`` and
    ``experts.down_proj``); Granite MoE Shared's ``shared_mlp`` fuses its gate and up alike."""
    prefix, f = f"{p}.block_sparse_moe", cfg.moe.moe_intermediate_size
    gate_up = first_present(names, f"{prefix}.input_linear.weight",
                            f"{prefix}.experts.gate_up_proj")
    out = {
        "router": Leaf((first_present(names, f"{prefix}.router.layer.weight",
                                      f"{prefix}.router.weight"),), transpose),
        "experts": {
            "gate": Leaf((gate_up,), lambda a: transpose_last2(a[:, :f])),
            "up": Leaf((gate_up,), lambda a: transpose_last2(a[:, f:])),
            "down": Leaf((first_present(names, f"{prefix}.output_linear.weight",
                                        f"{prefix}.experts.down_proj"),), transpose_last2),
        },
    }
    if "shared" in shapes:
        s, shared = cfg.moe.shared_intermediate_size, f"{p}.shared_mlp"
        out["shared"] = {
            "gate": _rows(f"{shared}.input_linear.weight", 0, s),
            "up": _rows(f"{shared}.input_linear.weight", s, 2 * s),
            "down": Leaf((f"{shared}.output_linear.weight",), transpose),
        }
    return out


def _moe(cfg: ModelConfig, p: str, shapes: dict, names: set[str]) -> dict:
    if cfg.model_type in GRANITE_MOE_TYPES:
        return _granite_moe(cfg, p, shapes, names)
    mixtral = f"{p}.block_sparse_moe.gate.weight" in names
    prefix = f"{p}.block_sparse_moe" if mixtral else f"{p}.mlp"
    out = {
        "router": Leaf((f"{prefix}.gate.weight",), transpose),
        "experts": _experts(cfg, prefix, names, mixtral),
    }
    if "router_bias" in shapes:
        statics = f"{prefix}.moe_statics.e_score_correction_bias"  # ERNIE 4.5: [1, E]
        out["router_bias"] = (Leaf((statics,), lambda a: a.reshape(-1)) if statics in names
                              else Leaf((first_present(  # MiniMax-M2: the block's own
                                  names, f"{prefix}.gate.e_score_correction_bias",
                                  f"{prefix}.e_score_correction_bias"),)))
    if "shared" in shapes:
        shared = first_present(names, f"{prefix}.shared_experts.gate_proj.weight",
                               f"{prefix}.shared_expert.gate_proj.weight")
        out["shared"] = _mlp(shared.rsplit(".", 2)[0], shapes["shared"])
    if "shared_gate" in shapes:
        out["shared_gate"] = Leaf((f"{prefix}.shared_expert_gate.weight",), transpose)
    return out


def _rows(name: str, start: int, stop: int) -> Leaf:
    """Rows ``start:stop`` of a fused ``[out, in]`` checkpoint weight, as ``[in, rows]``."""
    return Leaf((name,), lambda a: transpose(a[start:stop]))


def _fused_qkv(cfg: ModelConfig, p: str, out: dict) -> None:
    """Phi-3 stores q/k/v as one ``qkv_proj``."""
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    qkv = f"{p}.self_attn.qkv_proj.weight"
    out["attn"] |= {"q": _rows(qkv, 0, q), "k": _rows(qkv, q, q + kv),
                    "v": _rows(qkv, q + kv, q + 2 * kv)}


def _fused_gate_up(cfg: ModelConfig, p: str, out: dict) -> None:
    """Phi-3 and GLM-4 store gate and up as one ``gate_up_proj`` (gate rows first)."""
    f, gate_up = cfg.intermediate_size, f"{p}.mlp.gate_up_proj.weight"
    out["mlp"] |= {"gate": _rows(gate_up, 0, f), "up": _rows(gate_up, f, 2 * f)}


def _layer(cfg: ModelConfig, p: str, shapes: dict, names: set[str]) -> dict:
    out = {
        "input_norm": Leaf((f"{p}.input_layernorm.weight",)),
        "post_norm": Leaf((f"{p}.post_attention_layernorm.weight",)),
        "attn": {k: _leaf(f"{p}.self_attn.{_ATTN[k]}") for k in shapes["attn"] if k in _ATTN},
    }
    if "moe" in shapes:
        out["moe"] = _moe(cfg, p, shapes["moe"], names)
    else:
        out["mlp"] = _mlp(f"{p}.mlp", shapes["mlp"])
    if f"{p}.self_attn.qkv_proj.weight" in names:
        _fused_qkv(cfg, p, out)
    if f"{p}.mlp.gate_up_proj.weight" in names:
        _fused_gate_up(cfg, p, out)
    if cfg.model_type == "glm4":  # GLM-4: norms on the attention and MLP outputs too
        out["attn"]["out_norm"] = Leaf((f"{p}.post_self_attn_layernorm.weight",))
        out["mlp"]["out_norm"] = Leaf((f"{p}.post_mlp_layernorm.weight",))
    elif cfg.norm_placement == "sandwich":  # Gemma 2/3: post-attention, pre- and post-FFN norms
        out["attn"]["out_norm"] = Leaf((f"{p}.post_attention_layernorm.weight",))
        out["post_norm"] = Leaf((f"{p}.pre_feedforward_layernorm.weight",))
        out["mlp"]["out_norm"] = Leaf((f"{p}.post_feedforward_layernorm.weight",))
    elif cfg.norm_placement == "post":  # OLMo 2: each block's one norm is on its output
        out["input_norm"] = Leaf((f"{p}.post_attention_layernorm.weight",))
        out["post_norm"] = Leaf((f"{p}.post_feedforward_layernorm.weight",))
    if cfg.residual_multiplier != 1.0:  # Granite: x + r * f(x), folded into f's last matmul
        r = cfg.residual_multiplier  # and its bias
        ffns = [out["mlp"]] if "mlp" in out else [out["moe"]["experts"], out["moe"].get("shared")]
        for block, key in [(out["attn"], "o"), *((ffn, "down") for ffn in filter(None, ffns))]:
            for name in (key, f"{key}_bias"):
                if name in block:
                    block[name] = _scaled(block[name], r)
    return out


def _then(leaf: Leaf, fn) -> Leaf:
    """``leaf`` with ``fn`` applied to its tensor, in float32, after its own transform."""
    return Leaf(leaf.names, lambda a, f=leaf.transform: fn(f(a).astype(np.float32)),
                leaf.optional)


def _plus_one(leaf: Leaf) -> Leaf:
    """Gemma stores its norm weights as ``w`` for ``1 + w``."""
    return _then(leaf, lambda w: w + 1.0)


def _scaled(leaf: Leaf, factor: float) -> Leaf:
    return _then(leaf, lambda w: w * factor)


def hf_keymap(cfg: ModelConfig, shapes: dict, names: set[str]) -> dict:
    """Key map tree for ``shapes`` (from ``param_shapes``) of a Hugging Face checkpoint."""
    out = {
        "embed": Leaf(("model.embed_tokens.weight",)),
        "final_norm": Leaf(("model.norm.weight",)),
        "layers": [_layer(cfg, f"model.layers.{i}", s, names)
                   for i, s in enumerate(shapes["layers"])],
    }
    if cfg.embedding_multiplier != 1.0:  # Granite, Gemma: embeddings scaled as they are read
        out["embed"] = _scaled(out["embed"], cfg.embedding_multiplier)
    if cfg.model_type in GEMMA_TYPES:  # Gemma's norms apply 1 + w
        out = jax.tree_util.tree_map_with_path(
            lambda path, leaf: _plus_one(leaf) if str(path[-1].key).endswith("norm") else leaf,
            out, is_leaf=lambda x: isinstance(x, Leaf))
    if "lm_head" in shapes:
        out["lm_head"] = Leaf(("lm_head.weight",), transpose)
    for j, s in enumerate(shapes.get("mtp", [])):
        p = f"model.layers.{cfg.num_layers + j}"
        out.setdefault("mtp", []).append({
            "enorm": Leaf((f"{p}.enorm.weight",)),
            "hnorm": Leaf((f"{p}.hnorm.weight",)),
            "eh_proj": Leaf((f"{p}.eh_proj.weight",), transpose),
            "layer": _layer(cfg, p, s["layer"], names),
            "final_norm": Leaf((f"{p}.shared_head.norm.weight",)),
        })
    return out


def has_mtp_weights(cfg: ModelConfig, names: set[str]) -> bool:
    return cfg.num_mtp_layers > 0 and f"model.layers.{cfg.num_layers}.eh_proj.weight" in names
