"""Mixture-of-experts math: routers, expert SwiGLU and a dense reference combine.

Shape legend: T tokens, D hidden, E experts (local or global), C capacity per expert,
F expert intermediate size, K experts per token, G expert groups.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def expert_ffn(experts: dict, x_ECD: jax.Array) -> jax.Array:
    """SwiGLU of each expert on its own tokens.

    Args:
      experts: ``{"gate": [E, D, F], "up": [E, D, F], "down": [E, F, D]}``.
      x_ECD: tokens grouped by expert, ``[E, C, D]``.
    Returns:
      ``[E, C, D]`` expert outputs (padding rows give garbage-free zeros for zero input).
    """
    g_ECF = jnp.einsum("ecd,edf->ecf", x_ECD, experts["gate"])
    u_ECF = jnp.einsum("ecd,edf->ecf", x_ECD, experts["up"])
    return jnp.einsum("ecf,efd->ecd", jax.nn.silu(g_ECF) * u_ECF, experts["down"])


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
