"""Fused projections, made once at load time: K and V as one matmul, gate and up as one.

Layouts that tensor parallelism splits whole (a TP shard is a contiguous block of columns),
with exactly the sharding the separate weights had:

- ``kv [D, K * 2 * Dh]``: per KV head ``j``, ``k_j`` then ``v_j``; split by KV heads (axis
  ``kv_heads``) as ``k`` and ``v`` were. Q stays its own matmul here: fused into the KV-head
  groups it would split only where TP divides the KV heads, and replicate the query
  projection where TP divides the query heads alone (2 KV heads under TP 4), so the loader,
  which does not know the layout, never fuses it. ``fuse_query`` does, for an engine whose
  groups each hold a whole layer (``LLM``'s colocated DP groups, TP 1):
  ``qkv [D, H * Dh + K * 2 * Dh]``, the query's columns then ``kv``'s (one matmul instead of
  two: a decode step's calls are each a weight stream with a fixed cost).
- ``gate_up [D, 2F]``: columns interleaved, ``2f`` gate ``f`` and ``2f + 1`` up ``f``, so a
  block of columns holds matching gate/up pairs (axis ``mlp``).

Biases fuse alike (``kv_bias``, ``gate_up_bias``). MLA attention and routed experts stay
unfused (the expert slice gathers and moves experts by their own names). The stage code takes
either layout, so trees built without loading (``init_params``) still run.

Shape legend: D hidden, K KV heads, Dh head dim, F MLP width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xds_jax.model.config import ModelConfig
from xds_jax.model.out_major import in_major_layer
from xds_jax.model.quant import SCALE_SUFFIX, TRANSPOSED_SUFFIX


def _fuse_kv_cols(k, v, kv_heads: int):
    """``[..., K*Dh], [..., K*Dh]`` -> ``[..., K*2*Dh]`` grouped by KV head."""
    lead = k.shape[:-1]
    k_ = k.reshape(lead + (kv_heads, -1))
    v_ = v.reshape(lead + (kv_heads, -1))
    return jnp.concatenate([k_, v_], axis=-1).reshape(lead + (-1,))


def _interleave(gate, up):
    """``[..., F], [..., F]`` -> ``[..., 2F]`` with gate/up pairs side by side."""
    return jnp.stack([gate, up], axis=-1).reshape(gate.shape[:-1] + (-1,))


def fuse_attention(p: dict, cfg: ModelConfig) -> dict:
    """A GQA attention dict with ``k``/``v`` (and biases) replaced by ``kv``."""
    if cfg.mla is not None or "k" not in p:
        return p
    heads = cfg.num_kv_heads
    out = {n: w for n, w in p.items() if n not in ("k", "v", "k_bias", "v_bias")}
    out["kv"] = _fuse_kv_cols(p["k"], p["v"], heads)
    if "k_bias" in p:
        out["kv_bias"] = _fuse_kv_cols(p["k_bias"], p["v_bias"], heads)
    return out


def fuse_mlp(p: dict) -> dict:
    """A SwiGLU dict with ``gate``/``up`` (and biases) replaced by ``gate_up``."""
    if "gate" not in p:
        return p
    out = {n: w for n, w in p.items() if n not in ("gate", "up", "gate_bias", "up_bias")}
    out["gate_up"] = _interleave(p["gate"], p["up"])
    if "gate_bias" in p:
        out["gate_up_bias"] = _interleave(p["gate_bias"], p["up_bias"])
    return out


def fuse_projections(params: dict, cfg: ModelConfig) -> dict:
    """Every layer's attention, dense MLP and shared expert fused, MTP blocks' layers too."""
    out = dict(params, layers=[fuse_layer(lay, cfg) for lay in params["layers"]])
    if params.get("mtp"):
        out["mtp"] = [fuse_block(block, cfg) for block in params["mtp"]]
    return out


def fuse_layer(lay: dict, cfg: ModelConfig) -> dict:
    """One decoder layer's attention, dense MLP and shared expert fused."""
    out = dict(lay, attn=fuse_attention(lay["attn"], cfg))
    if "mlp" in lay:
        out["mlp"] = fuse_mlp(lay["mlp"])
    if "moe" in lay and "shared" in lay["moe"]:
        out["moe"] = dict(lay["moe"], shared=fuse_mlp(lay["moe"]["shared"]))
    return out


def fuse_block(block: dict, cfg: ModelConfig) -> dict:
    """An MTP block (``xds_jax.model.mtp``) with its decoder layer fused: a draft pass runs
    the same matmuls as a target layer."""
    return dict(block, layer=fuse_layer(block["layer"], cfg))


def fuse_query(params: dict, cfg: ModelConfig, *, in_place: bool = False) -> dict:
    """Every GQA layer's ``q`` and ``kv`` (either layout, int8 scales and biases too) as one
    ``qkv``, MTP blocks' layers too; for layouts that keep each layer's attention on one
    device (the ``qkv`` leaf splits on no mesh axis). ``in_place``: each layer replaced in
    ``params``' own lists as it is fused, so a caller dropping the rest holds one layer's
    Q and K/V twice at a time, not the model's (start-up peak memory)."""
    if cfg.mla is not None:
        return params

    def layer(lay: dict) -> dict:
        return dict(lay, attn=_fuse_query_attn(lay["attn"])) if "attn" in lay else lay

    layers = params["layers"] if in_place else list(params["layers"])
    for i, lay in enumerate(layers):
        layers[i] = layer(lay)
    out = dict(params, layers=layers)
    if params.get("mtp"):
        out["mtp"] = [dict(block, layer=layer(block["layer"])) for block in params["mtp"]]
    return out


def _fuse_query_attn(p: dict) -> dict:
    t = next((t for t in ("", TRANSPOSED_SUFFIX) if "q" + t in p and "kv" + t in p), None)
    if t is None:
        return p
    q, kv = p["q" + t], p["kv" + t]
    axis = -2 if t else -1  # the output axis: [out, in] stored output-major
    fused = ("q" + t, "kv" + t, "q_bias", "kv_bias", "q" + t + SCALE_SUFFIX,
             "kv" + t + SCALE_SUFFIX)
    out = {n: w for n, w in p.items() if n not in fused}
    out["qkv" + t] = jnp.concatenate([q, kv], axis=axis)
    if "q" + t + SCALE_SUFFIX in p:
        out["qkv" + t + SCALE_SUFFIX] = jnp.concatenate(
            [p["q" + t + SCALE_SUFFIX], p["kv" + t + SCALE_SUFFIX]], axis=-1)
    if "q_bias" in p or "kv_bias" in p:  # a missing one is zeros
        dtype = p.get("q_bias", p.get("kv_bias")).dtype
        out["qkv_bias"] = jnp.concatenate(
            [p.get(n, jnp.zeros((w.shape[axis],), dtype))
             for n, w in (("q_bias", q), ("kv_bias", kv))], axis=-1)
    return out


def split_qkv(y: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``qkv``'s output ``[B, S, H*Dh + K*2*Dh]`` -> q ``[B, S, H, Dh]``, k and v."""
    b, s = y.shape[:2]
    q_dim = cfg.num_heads * cfg.head_dim
    k, v = split_kv(y[..., q_dim:], cfg)
    return y[..., :q_dim].reshape(b, s, cfg.num_heads, cfg.head_dim), k, v


def split_kv(y: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """``kv``'s output ``[B, S, K*2*Dh]`` -> k and v ``[B, S, K, Dh]``."""
    b, s = y.shape[:2]
    y = y.reshape(b, s, cfg.num_kv_heads, 2, cfg.head_dim)
    return y[:, :, :, 0], y[:, :, :, 1]


def split_gate_up(y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``gate_up``'s output ``[..., 2F]`` -> gate and up ``[..., F]``."""
    y = y.reshape(y.shape[:-1] + (-1, 2))
    return y[..., 0], y[..., 1]


def unfuse_layer(lay: dict, cfg: ModelConfig) -> dict:
    """A decoder layer with ``kv`` / ``gate_up`` (and their biases) split back into ``k``,
    ``v``, ``gate`` and ``up`` (the inverse of ``fuse_projections`` for one layer; e.g. to
    start a draft block from a loaded target layer); output-major leaves
    (``xds_jax.model.out_major``) come back ``[in, out]``."""

    def kv(w):
        lead = w.shape[:-1]
        w = w.reshape(lead + (cfg.num_kv_heads, 2, cfg.head_dim))
        return w[..., 0, :].reshape(lead + (-1,)), w[..., 1, :].reshape(lead + (-1,))

    def mlp(p: dict) -> dict:
        if "gate_up" not in p:
            return p
        out = {n: w for n, w in p.items() if n not in ("gate_up", "gate_up_bias")}
        out["gate"], out["up"] = split_gate_up(p["gate_up"])
        if "gate_up_bias" in p:
            out["gate_bias"], out["up_bias"] = split_gate_up(p["gate_up_bias"])
        return out

    lay = in_major_layer(lay)
    out = dict(lay)
    attn = lay["attn"]
    if "qkv" in attn:  # fuse_query's: the query's columns, then kv's
        attn = _unfuse_query(attn, cfg.num_heads * cfg.head_dim)
        out["attn"] = attn
    if "kv" in attn:
        out["attn"] = {n: w for n, w in attn.items() if n not in ("kv", "kv_bias")}
        out["attn"]["k"], out["attn"]["v"] = kv(attn["kv"])
        if "kv_bias" in attn:
            out["attn"]["k_bias"], out["attn"]["v_bias"] = kv(attn["kv_bias"])
    if "mlp" in lay:
        out["mlp"] = mlp(lay["mlp"])
    if "moe" in lay and "shared" in lay["moe"]:
        out["moe"] = dict(lay["moe"], shared=mlp(lay["moe"]["shared"]))
    return out


def _unfuse_query(p: dict, q_dim: int) -> dict:
    """``fuse_query``'s ``qkv`` (input-major) back as ``q`` and ``kv``."""
    out = {n: w for n, w in p.items() if n not in ("qkv", "qkv_bias", "qkv" + SCALE_SUFFIX)}
    for name in ("qkv", "qkv_bias", "qkv" + SCALE_SUFFIX):
        if name in p:
            rest = name[len("qkv"):]
            out["q" + rest], out["kv" + rest] = p[name][..., :q_dim], p[name][..., q_dim:]
    return out
