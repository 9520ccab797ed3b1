"""Small pure layers: RMSNorm, rotary embeddings, SwiGLU, projections.

Shape legend: B batch, S tokens per sequence, D hidden, H heads, R rotary dims, F intermediate.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from xds_jax.kernels import cpu_matmul, cpu_swiglu
from xds_jax.kernels.materialize import materialize
from xds_jax.model.config import ModelConfig, RopeConfig
from xds_jax.model.fused import split_gate_up
from xds_jax.model.out_major import has_weight, weight_for
from xds_jax.model.quant import SCALE_SUFFIX, TRANSPOSED_SUFFIX, dequantize, int8_matmul


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in float32, as Hugging Face does; float32 out whatever ``weight``'s dtype.

    Activations stay float32 between matmuls: XLA:CPU has no 16-bit element-wise kernels and
    upcasts every such op (a convert pair each), while float32 chains fuse into one loop.
    """
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(jnp.float32) * x32.astype(x.dtype).astype(jnp.float32)


def matmul_f32(x: jax.Array, w: jax.Array, w_transposed: bool = False,
               scale: jax.Array | None = None) -> jax.Array:
    """``x [..., K] @ w [K, N]`` (``w [N, K]`` when ``w_transposed``), float32 result.

    An int8 ``w`` is a quantised weight with per-output-channel ``scale [N]``
    (``xds_jax.model.quant.int8_matmul``).

    ``x`` is cast to ``w``'s dtype (a 16-bit weight is read as stored) and the dot accumulates
    in float32: on XLA:CPU a bfloat16 x bfloat16 dot with a float32 result runs about twice as
    fast as float32, while one with a bfloat16 result is upcast (the whole weight converted to
    float32 on every call). A single-row 16-bit dot is upcast too, so it runs as two rows.
    """
    if w.dtype == jnp.int8:
        if scale is None:
            raise ValueError(f"an int8 weight {w.shape} needs its per-channel scale")
        return int8_matmul(x, w, scale, w_transposed)
    lead, k = x.shape[:-1], x.shape[-1]
    x_MK = x.reshape(-1, k).astype(w.dtype)
    if cpu_matmul.applies(x_MK, w, w_transposed):
        return cpu_matmul.few_row_matmul(x_MK, w).reshape(lead + (w.shape[0],))
    single = x_MK.shape[0] == 1 and w.dtype.itemsize == 2
    if single:
        x_MK = jnp.concatenate([x_MK, jnp.zeros_like(x_MK)])
    dims = (((1,), (1 if w_transposed else 0,)), ((), ()))
    y_MN = jax.lax.dot_general(x_MK, w, dims, preferred_element_type=jnp.float32)
    if single:
        y_MN = y_MN[:1]
    return y_MN.reshape(lead + (y_MN.shape[-1],))


def linear(x: jax.Array, w: jax.Array, b: jax.Array | None = None,
           scale: jax.Array | None = None) -> jax.Array:
    """``x @ w (+ b)`` with ``w`` stored ``[in, out]``; float32 out (see ``matmul_f32``)."""
    y = matmul_f32(x, w, scale=scale)
    return y if b is None else y + b.astype(jnp.float32)


def project(p: dict, name: str, x: jax.Array) -> jax.Array:
    """``x @ p[name]`` plus ``p[name + "_bias"]`` and with ``p[name + "_scale"]`` (int8
    weights) when the tree has them; float32 out. A weight stored output-major
    (``p[name + "_t"]``, ``xds_jax.model.out_major``) is contracted as stored."""
    w, transposed = weight_for(p, name)
    stored = name + TRANSPOSED_SUFFIX if transposed else name
    y = matmul_f32(x, w, transposed, p.get(stored + SCALE_SUFFIX))
    b = p.get(name + "_bias")
    return y if b is None else y + b.astype(jnp.float32)


def weight_f32(p: dict, name: str) -> jax.Array:
    """``p[name]`` as float32, dequantised when it is int8 with a ``_scale`` sibling."""
    scale = p.get(name + SCALE_SUFFIX)
    w = p[name]
    return w.astype(jnp.float32) if scale is None else dequantize(w, scale)


def swiglu(p: dict, x: jax.Array, act: str = "silu") -> jax.Array:
    """``down(silu(gate(x)) * up(x))`` (``act="gelu_tanh"``: GeGLU, Gemma's; ``"gelu"``: with
    exact GELU); biases when the
    checkpoint has them. Float32 out. A ``gate_up`` weight (``xds_jax.model.fused``) computes
    gate and up in one matmul."""
    if has_weight(p, "gate_up"):
        y = project(p, "gate_up", x)
        down = weight_for(p, "down")[0].dtype
        dtype = jnp.bfloat16 if down == jnp.bfloat16 else jnp.float32  # what "down" reads
        if act == "silu" and cpu_swiglu.applies(y, dtype):  # the pairs split in registers
            return project(p, "down", cpu_swiglu.silu_mul(y, dtype))
        g, u = split_gate_up(y)
    else:
        g, u = project(p, "gate", x), project(p, "up", x)
    g = (jax.nn.gelu(g, approximate=act == "gelu_tanh") if act.startswith("gelu")
         else jax.nn.silu(g))
    return project(p, "down", g * u)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_inv_freq(rope: RopeConfig, dim: int) -> tuple[np.ndarray, float]:
    """Inverse frequencies ``[dim / 2]`` (float32) and the cos/sin scale for a RoPE variant.

    ``dynamic`` NTK scaling only changes frequencies past the trained context; within it, it is
    the default rotation, which is what is computed here.
    """
    base = rope.theta
    inv = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
    inv = inv.astype(np.float32)
    if rope.freq_factors is not None:
        if len(rope.freq_factors) != inv.shape[0]:
            raise ValueError(f"{len(rope.freq_factors)} RoPE frequency factors for "
                             f"{inv.shape[0]} frequencies")
        inv = (inv / np.asarray(rope.freq_factors, np.float32)).astype(np.float32)
    factor = rope.factor
    if rope.type in ("default", "dynamic"):
        return inv, 1.0
    if rope.type == "longrope":  # the short factors are freq_factors (config_hf._longrope)
        return inv, float(rope.attention_factor if rope.attention_factor is not None else 1.0)
    if rope.type == "linear":
        return (inv / np.float32(factor)).astype(np.float32), 1.0
    if rope.type == "llama3":
        old = rope.original_max_position_embeddings
        low_wavelen = old / rope.low_freq_factor
        high_wavelen = old / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32), 1.0
    if rope.type == "yarn":
        return _yarn_inv_freq(rope, dim, inv)
    raise ValueError(f"unknown rope type {rope.type!r}")


def _yarn_inv_freq(rope: RopeConfig, dim: int, inv_extra: np.ndarray) -> tuple[np.ndarray, float]:
    factor = rope.factor
    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = _yarn_mscale(factor, rope.mscale) / _yarn_mscale(
                factor, rope.mscale_all_dim
            )
        else:
            attention_factor = _yarn_mscale(factor)
    original = rope.original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extra_factor = 1 - ramp.astype(np.float32)
    inv_inter = inv_extra / np.float32(factor)
    inv = inv_inter * (1 - extra_factor) + inv_extra * extra_factor
    return inv.astype(np.float32), float(attention_factor)


def attention_scale(cfg: ModelConfig) -> float:
    """Softmax scale: ``1/sqrt(qk dim)``, times yarn's ``mscale_all_dim`` correction for MLA
    (Granite's ``attention_multiplier`` where it sets one)."""
    if cfg.attention_multiplier is not None:
        return cfg.attention_multiplier
    if cfg.mla is None:
        return cfg.head_dim**-0.5
    scale = cfg.mla.qk_head_dim**-0.5
    if cfg.rope.type != "default" and cfg.rope.mscale_all_dim:
        m = _yarn_mscale(cfg.rope.factor, cfg.rope.mscale_all_dim)
        scale = scale * m * m
    return scale


def rope_cos_sin(cfg: ModelConfig, positions: jax.Array,
                 local: bool = False) -> tuple[jax.Array, jax.Array]:
    """cos and sin ``[..., R / 2]`` in float32 for integer positions ``[...]``; ``local``: a
    local layer's plain rotation at ``local_rope_theta`` (Gemma 3), where the model has one.

    Both are materialised (``kernels.materialize``): every layer's q and k rotation reads them
    rather than recomputing a cos and a sin per rotated element, which XLA:CPU's fusion
    otherwise does."""
    rope = cfg.rope
    if local and cfg.local_rope_theta is not None:
        rope = RopeConfig(theta=cfg.local_rope_theta, interleaved=rope.interleaved,
                          partial_rotary_factor=rope.partial_rotary_factor)
    inv, factor = rope_inv_freq(rope, cfg.rope_dim)
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv)
    return materialize(jnp.cos(freqs) * factor), materialize(jnp.sin(freqs) * factor)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, interleaved: bool) -> jax.Array:
    """Rotate the first ``2 * cos.shape[-1]`` dims of ``x [B, S, H, Dh]``.

    ``cos``/``sin`` are ``[B, S, R/2]``. Pairs are ``(i, i + R/2)`` (rotate-half layout), or
    ``(2i, 2i + 1)`` when ``interleaved``; interleaved output is written de-interleaved, as
    Hugging Face does, which leaves q.k unchanged because q and k are permuted alike.
    """
    half = cos.shape[-1]
    rot, rest = x[..., : 2 * half], x[..., 2 * half :]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
    else:
        x1, x2 = rot[..., :half], rot[..., half:]
    c = cos[:, :, None, :].astype(jnp.float32)
    s = sin[:, :, None, :].astype(jnp.float32)
    x1f, x2f = x1.astype(jnp.float32), x2.astype(jnp.float32)
    out = jnp.concatenate([x1f * c - x2f * s, x2f * c + x1f * s], axis=-1).astype(x.dtype)
    return jnp.concatenate([out, rest], axis=-1) if rest.shape[-1] else out
