"""Fused projections, made once at load time: Q, K and V as one matmul, gate and up as one.

Layouts that tensor parallelism splits whole (a TP shard is a contiguous block of columns):

- ``qkv [D, K * (G + 2) * Dh]``: per KV head ``j``, its ``G`` query heads, then ``k_j``, then
  ``v_j``. Split by KV heads (logical axis ``kv_heads``), each TP rank holds whole groups:
  its query heads with the keys and values they attend to. Query head ``j * G + g`` is the
  unfused ``q``'s head of that index, so GQA's ``h // G`` pairing is unchanged.
- ``gate_up [D, 2F]``: columns interleaved, ``2f`` gate ``f`` and ``2f + 1`` up ``f``, so a
  block of columns holds matching gate/up pairs (axis ``mlp``).

Biases fuse alike (``qkv_bias``, ``gate_up_bias``). MLA attention and routed experts stay
unfused (the expert slice gathers and moves experts by their own names). The stage code takes
either layout, so trees built without loading (``init_params``) still run.

Shape legend: D hidden, H query heads, K KV heads, G = H / K, Dh head dim, F MLP width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xds_jax.model.config import ModelConfig


def _fuse_qkv_cols(q, k, v, kv_heads: int):
    """``[..., H*Dh], [..., K*Dh], [..., K*Dh]`` -> ``[..., K*(G+2)*Dh]`` grouped by KV head."""
    lead = q.shape[:-1]
    q_ = q.reshape(lead + (kv_heads, -1))
    k_ = k.reshape(lead + (kv_heads, -1))
    v_ = v.reshape(lead + (kv_heads, -1))
    return jnp.concatenate([q_, k_, v_], axis=-1).reshape(lead + (-1,))


def _interleave(gate, up):
    """``[..., F], [..., F]`` -> ``[..., 2F]`` with gate/up pairs side by side."""
    return jnp.stack([gate, up], axis=-1).reshape(gate.shape[:-1] + (-1,))


def fuse_attention(p: dict, cfg: ModelConfig) -> dict:
    """A GQA attention dict with ``q``/``k``/``v`` (and biases) replaced by ``qkv``."""
    if cfg.mla is not None or "q" not in p:
        return p
    k = cfg.num_kv_heads
    out = {n: w for n, w in p.items() if n not in ("q", "k", "v", "q_bias", "k_bias", "v_bias")}
    out["qkv"] = _fuse_qkv_cols(p["q"], p["k"], p["v"], k)
    if "q_bias" in p:
        out["qkv_bias"] = _fuse_qkv_cols(p["q_bias"], p["k_bias"], p["v_bias"], k)
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
    """Every layer's attention, dense MLP and shared expert fused (MTP blocks as they are)."""

    def layer(lay: dict) -> dict:
        out = dict(lay, attn=fuse_attention(lay["attn"], cfg))
        if "mlp" in lay:
            out["mlp"] = fuse_mlp(lay["mlp"])
        if "moe" in lay and "shared" in lay["moe"]:
            out["moe"] = dict(lay["moe"], shared=fuse_mlp(lay["moe"]["shared"]))
        return out

    return dict(params, layers=[layer(lay) for lay in params["layers"]])


def split_qkv(y: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``qkv``'s output ``[B, S, K*(G+2)*Dh]`` -> q ``[B, S, H, Dh]``, k and v ``[B, S, K, Dh]``."""
    b, s = y.shape[:2]
    k, dh = cfg.num_kv_heads, cfg.head_dim
    g = cfg.num_heads // k
    y = y.reshape(b, s, k, g + 2, dh)
    return y[:, :, :, :g].reshape(b, s, k * g, dh), y[:, :, :, g], y[:, :, :, g + 1]


def split_gate_up(y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``gate_up``'s output ``[..., 2F]`` -> gate and up ``[..., F]``."""
    y = y.reshape(y.shape[:-1] + (-1, 2))
    return y[..., 0], y[..., 1]
