"""Weight-only INT8 (W8A16): per-output-channel scales and matmuls that read the int8 weights.

A quantised matrix ``w`` is stored as ``w`` (int8, ``[..., K, N]``) and ``w_scale`` (float32,
``[..., N]``): ``w ~= w_int8 * w_scale``, one scale per output channel, ``max|w| / 127`` over
the input dim, values rounded to nearest and clipped to [-127, 127]. The embedding ``[V, D]``
has one scale per vocabulary row (its output channel as the tied LM head, and the scale of
the row a lookup reads).

The matmul keeps the activations at 16-bit precision and never materialises a float copy of
the weight. XLA:CPU does not fuse a convert into a dot operand: ``x @ w.astype(bf16)`` writes
the whole converted weight on every call, slower than a bfloat16 weight. An int8 x int8 dot
with an int32 result reads the int8 weight as stored (XNNPACK). So each activation row is
scaled to 16-bit fixed point (``max|row|`` maps to 32639) and split into two int8 halves,
``x_q = 256 * hi + lo``; both halves go through one dot as extra rows (which also gives a
single-row decode the two rows XLA:CPU wants), and ``y = (256 * y_hi + y_lo) * x_scale *
w_scale``. The products are exact in int32 (for ``K`` < 130,000 inputs); the only rounding
is the weight's and the 16-bit activation's (finer than bfloat16's 8-bit mantissa for the
large entries of a row).

Shape legend: M rows, K inputs, N outputs, E experts, V vocabulary, D hidden.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from xds_jax.kernels import cpu_matmul

QUANTIZATIONS = ("int8",)
# Leaves quantised in a layer (attention, MLP, shared and routed experts) and at the top.
# Routers, the shared-expert gate, norms, biases and MTP blocks stay in the model's dtype:
# routing decisions are sensitive and those weights are a tiny share of the bytes.
LAYER_LEAVES = frozenset({"q", "k", "v", "kv", "qkv", "o", "q_a", "q_b", "kv_a", "kv_b", "gate",
                          "up", "gate_up", "down"})
TOP_LEAVES = frozenset({"embed", "lm_head"})
SCALE_SUFFIX = "_scale"
TRANSPOSED_SUFFIX = "_t"  # a weight stored [out, in] (xds_jax.model.out_major)
_ACT_LIMIT = 127 * 256 + 127  # hi = (x_q + 128) >> 8 then stays in int8
MAX_INPUTS = (2**31 - 1) // (128 * 127)  # int32 accumulation of K products stays exact


class QuantizationError(ValueError):
    """An unknown quantization method or a weight it cannot hold."""


def check_quantization(method: str | None) -> str | None:
    """``method`` if it is None or a known quantization; a clear error otherwise."""
    if method is not None and method not in QUANTIZATIONS:
        raise QuantizationError(f"quantization must be one of {list(QUANTIZATIONS)} or None, "
                                f"got {method!r}")
    return method


def contract_axis(name: str) -> int:
    """The input (reduced) axis of weight ``name``: the embedding's and an output-major
    weight's (``<name>_t``, ``xds_jax.model.out_major``) last, others' ``-2``."""
    return -1 if name == "embed" or name.endswith(TRANSPOSED_SUFFIX) else -2


def quantize_weight(w, axis: int = -2) -> tuple[np.ndarray, np.ndarray]:
    """``(int8 values, float32 scales)`` of ``w`` with one scale per slice along ``axis``.

    ``w [..., K, N]`` with ``axis=-2`` gives scales ``[..., N]``. An all-zero channel gets
    scale 1 (its values are exactly 0).
    """
    w32 = np.asarray(w, np.float32)
    if w32.shape[axis] > MAX_INPUTS:
        raise QuantizationError(f"int8 weights take at most {MAX_INPUTS} inputs, got "
                                f"{w32.shape[axis]}")
    absmax = np.max(np.abs(w32), axis=axis, keepdims=True)
    scale = np.where(absmax > 0, absmax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w32 / scale), -127, 127).astype(np.int8)
    return q, np.squeeze(scale, axis)


def dequantize(q: jax.Array, scale: jax.Array, axis: int = -2) -> jax.Array:
    """float32 ``q * scale`` (the inverse of ``quantize_weight``)."""
    return q.astype(jnp.float32) * jnp.expand_dims(scale, axis)


def quantize_params(params: dict, method: str | None) -> dict:
    """The tree with every linear weight of ``LAYER_LEAVES`` / ``TOP_LEAVES`` as int8 plus a
    ``<name>_scale`` sibling; ``method=None`` returns ``params`` as is."""

    def one(name: str, w) -> tuple:
        q, scale = quantize_weight(w, contract_axis(name))
        return jnp.asarray(q), jnp.asarray(scale)

    return params if check_quantization(method) is None else _map_linear(params, one)


def quantized_shapes(params: dict, method: str | None) -> dict:
    """``quantize_params``'s tree as ``ShapeDtypeStruct``s, from a tree of them (planning)."""

    def one(name: str, w) -> tuple:
        axis = contract_axis(name) % len(w.shape)
        return (jax.ShapeDtypeStruct(w.shape, jnp.int8),
                jax.ShapeDtypeStruct(w.shape[:axis] + w.shape[axis + 1:], jnp.float32))

    return params if check_quantization(method) is None else _map_linear(params, one)


def _map_linear(params: dict, quantize) -> dict:
    """``params`` with each quantised leaf ``w`` replaced by ``quantize(name, w)``'s
    ``(values, scales)`` as ``name`` and ``name_scale``."""

    def leaves(d: dict, names: frozenset) -> dict:
        out = {}
        for key, value in d.items():
            if isinstance(value, dict):
                out[key] = leaves(value, names if key != "experts" else LAYER_LEAVES)
            elif key.removesuffix(TRANSPOSED_SUFFIX) in names:
                out[key], out[key + SCALE_SUFFIX] = quantize(key, value)
            else:
                out[key] = value
        return out

    out = leaves({k: v for k, v in params.items() if k in TOP_LEAVES}, TOP_LEAVES)
    out["layers"] = [leaves(layer, LAYER_LEAVES) for layer in params["layers"]]
    return {k: v for k, v in params.items() if k not in out} | out


def _split_rows(x_MK: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(hi, lo)`` int8 halves of the 16-bit fixed point rows of ``x`` and the row scales
    ``[..., M, 1]``: ``x ~= (256 * hi + lo) * scale``."""
    return cpu_matmul.split_rows(x_MK, _ACT_LIMIT)


def int8_matmul(x: jax.Array, w_q: jax.Array, scale: jax.Array,
                w_transposed: bool = False) -> jax.Array:
    """``x [..., K] @ (w_q * scale)`` with ``w_q [K, N]`` (``[N, K]`` when ``w_transposed``)
    int8 and ``scale [N]``; float32 ``[..., N]``. On CPU a few rows against an output-major
    ``w_q`` go through xds-jax's kernel (``xds_jax.kernels.cpu_matmul``, the same numbers)."""
    lead, k = x.shape[:-1], x.shape[-1]
    x_MK = x.reshape(-1, k)
    if cpu_matmul.applies_int8(x_MK, w_q, w_transposed):
        y_MN = cpu_matmul.few_row_int8_matmul(x_MK, w_q, scale, _ACT_LIMIT)
    else:
        hi, lo, x_scale = _split_rows(x_MK)
        y_MN = cpu_matmul.split_rows_matmul(hi, lo, x_scale, w_q, scale, w_transposed)
    return y_MN.reshape(lead + (y_MN.shape[-1],))


def int8_expert_matmul(x_ECK: jax.Array, w_q: jax.Array, scale_EN: jax.Array) -> jax.Array:
    """Per-expert ``x [E, C, K] @ w [E, K, N]`` (int8, scales ``[E, N]``); float32 ``[E, C, N]``."""
    hi, lo, x_scale = _split_rows(x_ECK)
    c = x_ECK.shape[1]
    y = jnp.einsum("eck,ekn->ecn", jnp.concatenate([hi, lo], axis=1), w_q,
                   preferred_element_type=jnp.int32).astype(jnp.float32)
    return (y[:, :c] * 256.0 + y[:, c:]) * x_scale * scale_EN[:, None, :].astype(jnp.float32)


def int8_ragged_matmul(x_MK: jax.Array, w_q: jax.Array, scale_EN: jax.Array,
                       sizes_E: jax.Array, expert_M: jax.Array) -> jax.Array:
    """``ragged_dot`` of rows grouped by expert (``sizes_E`` rows each, ``expert_M`` the
    expert of each row) with int8 ``w_q [E, K, N]``; float32 ``[M, N]``. The two halves go
    through two ragged dots, each reading the int8 weights."""
    hi, lo, x_scale = _split_rows(x_MK)
    i32 = jnp.int32
    y_hi = jax.lax.ragged_dot(hi, w_q, sizes_E, preferred_element_type=i32)
    y_lo = jax.lax.ragged_dot(lo, w_q, sizes_E, preferred_element_type=i32)
    y = y_hi.astype(jnp.float32) * 256.0 + y_lo.astype(jnp.float32)
    return y * x_scale * scale_EN[expert_M].astype(jnp.float32)
