"""Mixture-of-experts math: routers, expert SwiGLU and a dense reference combine.

Shape legend: T tokens, D hidden, E experts (local or global), C capacity per expert,
F expert intermediate size, K experts per token, G expert groups.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xds_jax.model.config import MoEConfig
from xds_jax.model.quant import SCALE_SUFFIX, int8_expert_matmul, int8_ragged_matmul


def _is_int8(experts: dict) -> bool:
    return experts["gate"].dtype == jnp.int8


def _scale(experts: dict, name: str) -> jax.Array:
    return experts[name + SCALE_SUFFIX]


def expert_ffn(experts: dict, x_ECD: jax.Array) -> jax.Array:
    """SwiGLU of each expert on its own tokens.

    Args:
      experts: ``{"gate": [E, D, F], "up": [E, D, F], "down": [E, F, D]}``; int8 weights
        (``xds_jax.model.quant``) come with ``gate_scale`` ``[E, F]`` etc.
      x_ECD: tokens grouped by expert, ``[E, C, D]``.
    Returns:
      ``[E, C, D]`` expert outputs in ``x_ECD``'s dtype (padding rows give garbage-free zeros
      for zero input). Matmuls read the weights as stored and accumulate in float32.
    """
    if _is_int8(experts):
        g_ECF = int8_expert_matmul(x_ECD, experts["gate"], _scale(experts, "gate"))
        u_ECF = int8_expert_matmul(x_ECD, experts["up"], _scale(experts, "up"))
        y_ECD = int8_expert_matmul(jax.nn.silu(g_ECF) * u_ECF, experts["down"],
                                   _scale(experts, "down"))
        return y_ECD.astype(x_ECD.dtype)
    dt = experts["gate"].dtype
    x_ECD = x_ECD.astype(dt)
    g_ECF = jnp.einsum("ecd,edf->ecf", x_ECD, experts["gate"], preferred_element_type=jnp.float32)
    u_ECF = jnp.einsum("ecd,edf->ecf", x_ECD, experts["up"], preferred_element_type=jnp.float32)
    h_ECF = (jax.nn.silu(g_ECF) * u_ECF).astype(dt)
    y_ECD = jnp.einsum("ecf,efd->ecd", h_ECF, experts["down"], preferred_element_type=jnp.float32)
    return y_ECD.astype(x_ECD.dtype)


def moe_dense_reference(
    experts: dict, x_TD: jax.Array, topk_ids_TK: jax.Array, topk_w_TK: jax.Array
) -> jax.Array:
    """Every expert on every token, then the gate-weighted sum of the chosen ones.

    The ground truth for dispatch/combine: no capacity, no communication.
    """
    num_experts = experts["gate"].shape[0]
    y_ETD = expert_ffn(experts, jnp.broadcast_to(x_TD, (num_experts,) + x_TD.shape))
    y_TKD = jnp.take_along_axis(
        jnp.transpose(y_ETD, (1, 0, 2)), topk_ids_TK[:, :, None], axis=1
    )
    return jnp.einsum("tkd,tk->td", y_TKD, topk_w_TK.astype(y_TKD.dtype))


def route(p: dict, moe: MoEConfig, h_TD: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Pick ``K`` experts per token and their combine weights.

    Softmax routers (Mixtral, Qwen-MoE, DeepSeek-V2): softmax over all experts, top-k (V2's
    group-limited greedy: among the ``topk_group`` groups with the best single score), optional
    renormalise. Sigmoid routers (DeepSeek-V3): sigmoid scores; choice by scores plus the
    correction bias, restricted to the ``topk_group`` groups with the best top-2 sums. Weights
    are the unbiased scores, optionally renormalised, times ``routed_scaling_factor``.

    Returns:
      expert ids ``[T, K]`` int32, weights ``[T, K]`` float32, router logits ``[T, E]`` float32.
    """
    logits_TE = h_TD.astype(jnp.float32) @ p["router"].astype(jnp.float32)
    k = moe.num_experts_per_tok
    if moe.router == "softmax":
        scores_TE = jax.nn.softmax(logits_TE, axis=-1)
    else:
        scores_TE = jax.nn.sigmoid(logits_TE)
    choice_TE = scores_TE + p["router_bias"] if moe.score_correction_bias else scores_TE
    if moe.n_group > 1:
        choice_TE = _mask_groups(choice_TE, moe.n_group, moe.topk_group, moe.group_score)
    _, ids_TK = jax.lax.top_k(choice_TE, k)
    weights_TK = jnp.take_along_axis(scores_TE, ids_TK, axis=-1)
    if moe.norm_topk_prob:
        denom = weights_TK.sum(-1, keepdims=True)
        weights_TK = weights_TK / (denom + 1e-20 if moe.router == "sigmoid" else denom)
    return ids_TK.astype(jnp.int32), weights_TK * moe.routed_scaling_factor, logits_TE


def _mask_groups(choice_TE: jax.Array, n_group: int, topk_group: int,
                 group_score: str = "top2_sum") -> jax.Array:
    """Keep only experts of the ``topk_group`` groups ranked highest by their two best scores'
    sum (``top2_sum``, DeepSeek-V3) or their best score (``max``, DeepSeek-V2)."""
    t, e = choice_TE.shape
    grouped_TGX = choice_TE.reshape(t, n_group, e // n_group)
    best = 1 if group_score == "max" else min(2, e // n_group)
    group_TG = jax.lax.top_k(grouped_TGX, best)[0].sum(-1)
    _, keep_TJ = jax.lax.top_k(group_TG, topk_group)
    keep_TG = jnp.zeros((t, n_group), bool).at[jnp.arange(t)[:, None], keep_TJ].set(True)
    return jnp.where(keep_TG[:, :, None], grouped_TGX, -jnp.inf).reshape(t, e)


def moe_local(experts: dict, x_TD: jax.Array, ids_TK: jax.Array, w_TK: jax.Array) -> jax.Array:
    """All experts on one device, no capacity limit: sort by expert and grouped matmuls.

    Exact (no token is dropped) and proportional to ``T * K`` expert rows, not ``T * E``.
    """
    t, k = ids_TK.shape
    num_experts = experts["gate"].shape[0]
    flat = ids_TK.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    sizes_E = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    if _is_int8(experts):
        x_MD, expert_M = x_TD[order // k], flat[order]

        def mm(x, name):
            return int8_ragged_matmul(x, experts[name], _scale(experts, name), sizes_E,
                                      expert_M)

        y_MD = mm(jax.nn.silu(mm(x_MD, "gate")) * mm(x_MD, "up"), "down")
    else:
        dt = experts["gate"].dtype
        x_MD = x_TD.astype(dt)[order // k]
        f32 = jnp.float32
        g = jax.lax.ragged_dot(x_MD, experts["gate"], sizes_E, preferred_element_type=f32)
        u = jax.lax.ragged_dot(x_MD, experts["up"], sizes_E, preferred_element_type=f32)
        y_MD = jax.lax.ragged_dot((jax.nn.silu(g) * u).astype(dt), experts["down"], sizes_E,
                                  preferred_element_type=f32)
    y_TKD = jnp.zeros_like(y_MD).at[order].set(y_MD).reshape(t, k, -1)
    return jnp.einsum("tkd,tk->td", y_TKD.astype(jnp.float32), w_TK).astype(x_TD.dtype)
