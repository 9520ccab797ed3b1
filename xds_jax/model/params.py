"""Parameter tree layout: the shape of every weight, and random initialisation from a config.

Matrices are stored ``[in, out]`` so that stages compute ``x @ w``. The tree is::

    {"embed": [V, D], "final_norm": [D], "lm_head": [D, V] (untied only),
     "layers": [{"input_norm", "post_norm", "attn": {...}, "mlp" | "moe": {...}}, ...],
     "mtp": [{"enorm", "hnorm", "eh_proj", "layer": {...}, "final_norm"}, ...] (DeepSeek MTP)}

``input_norm`` is the attention block's norm and ``post_norm`` the FFN block's: on their
inputs, or on their outputs where ``ModelConfig.norm_placement`` is "post" (OLMo 2); Gemma's
sandwich norms add ``out_norm`` to ``attn`` and ``mlp``.

Loaders then fuse K/V and gate/up (``xds_jax.model.fused``) and may quantise linear weights
to int8 with ``<name>_scale`` siblings (``xds_jax.model.quant``); stages take every variant.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from xds_jax.model.config import ModelConfig


def _attention_shapes(cfg: ModelConfig) -> dict:
    d, h = cfg.hidden_size, cfg.num_heads
    if cfg.mla is not None:
        m = cfg.mla
        shapes = {
            "kv_a": (d, m.kv_lora_rank + m.qk_rope_head_dim),
            "kv_a_norm": (m.kv_lora_rank,),
            "kv_b": (m.kv_lora_rank, h * (m.qk_nope_head_dim + m.v_head_dim)),
            "o": (h * m.v_head_dim, d),
        }
        if m.q_lora_rank is None:
            shapes["q"] = (d, h * m.qk_head_dim)
        else:
            shapes |= {"q_a": (d, m.q_lora_rank), "q_a_norm": (m.q_lora_rank,),
                       "q_b": (m.q_lora_rank, h * m.qk_head_dim)}
        return shapes
    q_dim, kv_dim = h * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shapes = {"q": (d, q_dim), "k": (d, kv_dim), "v": (d, kv_dim), "o": (q_dim, d)}
    if cfg.attention_bias:
        shapes |= {"q_bias": (q_dim,), "k_bias": (kv_dim,), "v_bias": (kv_dim,)}
    if cfg.attention_out_bias:
        shapes["o_bias"] = (d,)
    if cfg.qk_norm and cfg.qk_norm_scope == "whole":  # OLMo 2: over all heads at once
        shapes |= {"q_norm": (q_dim,), "k_norm": (kv_dim,)}
    elif cfg.qk_norm:
        shapes |= {"q_norm": (cfg.head_dim,), "k_norm": (cfg.head_dim,)}
    return shapes


def _mlp_shapes(d: int, f: int, bias: bool = False) -> dict:
    shapes = {"gate": (d, f), "up": (d, f), "down": (f, d)}
    if bias:
        shapes |= {"gate_bias": (f,), "up_bias": (f,), "down_bias": (d,)}
    return shapes


def _moe_shapes(cfg: ModelConfig) -> dict:
    moe, d = cfg.moe, cfg.hidden_size
    e, f = moe.num_experts, moe.moe_intermediate_size
    shapes = {
        "router": (d, e),
        "experts": {"gate": (e, d, f), "up": (e, d, f), "down": (e, f, d)},
    }
    if moe.score_correction_bias:
        shapes["router_bias"] = (e,)
    if moe.num_shared_experts:
        shapes["shared"] = _mlp_shapes(d, moe.shared_intermediate_size)
    if moe.shared_expert_gate:
        shapes["shared_gate"] = (d, 1)
    return shapes


def layer_shapes(cfg: ModelConfig, index: int) -> dict:
    d = cfg.hidden_size
    shapes = {"input_norm": (d,), "post_norm": (d,), "attn": _attention_shapes(cfg)}
    if cfg.is_moe_layer(index):
        shapes["moe"] = _moe_shapes(cfg)
    else:
        shapes["mlp"] = _mlp_shapes(d, cfg.intermediate_size, cfg.mlp_bias)
    if cfg.norm_placement == "sandwich":  # Gemma 2/3: norms on the attention and MLP outputs
        shapes["attn"]["out_norm"] = (d,)
        shapes["mlp"]["out_norm"] = (d,)
    return shapes


def param_shapes(cfg: ModelConfig, with_mtp: bool = False) -> dict:
    """Nested dict of shape tuples, the layout every loader must produce."""
    d, v = cfg.hidden_size, cfg.vocab_size
    shapes = {
        "embed": (v, d),
        "final_norm": (d,),
        "layers": [layer_shapes(cfg, i) for i in range(cfg.num_layers)],
    }
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (d, v)
    if with_mtp and cfg.num_mtp_layers:
        # MTP blocks use the MoE layout of the last layer (DeepSeek-V3).
        last = layer_shapes(cfg, cfg.num_layers - 1)
        shapes["mtp"] = [
            {"enorm": (d,), "hnorm": (d,), "eh_proj": (2 * d, d), "layer": last,
             "final_norm": (d,)}
            for _ in range(cfg.num_mtp_layers)
        ]
    return shapes


def _is_norm(path: tuple) -> bool:
    name = str(path[-1].key if hasattr(path[-1], "key") else path[-1])
    return name.endswith("norm")


def init_params(cfg: ModelConfig, seed: int = 0, dtype=jnp.float32, scale: float = 0.02,
                with_mtp: bool = False) -> dict:
    """Random weights (normal(0, scale), norms 1) for simulation, tests and planning; with
    ``with_mtp``, the config's MTP blocks too."""
    shapes = param_shapes(cfg, with_mtp=with_mtp)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(
        shapes, is_leaf=lambda x: isinstance(x, tuple)
    )
    rng = np.random.default_rng(seed)
    out = []
    for path, shape in leaves:
        if _is_norm(path):
            out.append(jnp.ones(shape, dtype))
        else:
            out.append(jnp.asarray(rng.normal(0.0, scale, shape), dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def param_bytes(params: dict) -> int:
    """Bytes held by a parameter tree."""
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))


def model_dtype(params: dict):
    """The model's floating dtype (KV pages, activations between stages): the final norm's,
    which int8 quantisation (``xds_jax.model.quant``) never touches, unlike the embedding."""
    return params["final_norm"].dtype
