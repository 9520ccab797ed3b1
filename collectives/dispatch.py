"""MoE dispatch and combine on an expert-parallel axis, in fixed-capacity buffers.

XCCL's two phases on JAX, called per rank inside ``jax.shard_map``:

1. ``all_to_all`` of the per-(destination, slot) row counts (``[N, S]`` int32);
2. ``all_to_all`` of ``[N, C, D]`` payload buffers (optionally INT8 + per-token scales),
   C rows per destination per round. A rank whose rows to some destination exceed C sends
   the rest in further rounds; ``rounds`` is static, and rows beyond ``rounds * C`` are
   *reported* (``overflow``) so the caller re-runs with a larger capacity bucket
   (``collectives.ep_moe.EpMoe`` does). Nothing is dropped silently.

The receiver lays rows out as ``[S, N * C, D]`` (slot s, rows of source j at
``[j * C, (j + 1) * C)``), which is exactly the ``[E, C, D]`` input of
``xds_jax.model.moe.expert_ffn``. Combine sends outputs back the same way and sums them,
weighted by the gates, in the original token order.

Shape legend: T tokens per rank, K choices, D hidden, N ranks, S slots per rank,
C capacity, X = N * C rows per slot.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from collectives.exchange import EXCHANGES
from collectives.layout import Routes, received_slots, route, send_index
from xds_jax.model.moe import expert_ffn


class Payload(NamedTuple):
    """A buffer on the wire: activations, or INT8 values with one scale per row."""

    data: jax.Array  # [N, C, D] float or int8
    scale: jax.Array | None  # [N, C] float32 when data is int8


class LocalStats(NamedTuple):
    """Per-rank counters returned by ``moe_ep_local`` (leading axis 1 for stacking)."""

    slot_tokens_S: jax.Array  # [1, S] rows received per local slot (all rounds)
    overflow: jax.Array  # [1] rows this rank could not send within rounds * C
    max_rows: jax.Array  # [1] largest row count this rank sends to one destination


def quantize_int8(x_TD: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Symmetric per-row INT8: ``|x - q * scale| <= scale / 2``, ``scale = max|x| / 127``."""
    amax_T = jnp.max(jnp.abs(x_TD.astype(jnp.float32)), axis=-1)
    scale_T = jnp.maximum(amax_T, 1e-30) / 127.0
    q_TD = jnp.clip(jnp.round(x_TD.astype(jnp.float32) / scale_T[..., None]), -127, 127)
    return q_TD.astype(jnp.int8), scale_T


def dequantize(p: Payload, dtype) -> jax.Array:
    if p.scale is None:
        return p.data.astype(dtype)
    return (p.data.astype(jnp.float32) * p.scale[..., None]).astype(dtype)


def _pack(rows_AD: jax.Array, routes: Routes, capacity: int, r: int, int8: bool) -> Payload:
    n = routes.counts_NS.shape[0]
    dest_A, c_A = send_index(routes, capacity, r)
    shape = (n, capacity, rows_AD.shape[-1])
    if not int8:
        buf = jnp.zeros(shape, rows_AD.dtype).at[dest_A, c_A].set(rows_AD, mode="drop")
        return Payload(buf, None)
    q_AD, scale_A = quantize_int8(rows_AD)
    buf = jnp.zeros(shape, jnp.int8).at[dest_A, c_A].set(q_AD, mode="drop")
    scale = jnp.zeros(shape[:2], jnp.float32).at[dest_A, c_A].set(scale_A, mode="drop")
    return Payload(buf, scale)


def pack_tokens(x_TD, routes: Routes, *, capacity: int, round_index: int, int8: bool) -> Payload:
    """Phase-2 send buffer of one round: every assignment's token row at its (dest, c)."""
    k = routes.dest_A.shape[0] // x_TD.shape[0]
    return _pack(jnp.repeat(x_TD, k, axis=0), routes, capacity, round_index, int8)


def unpack_for_experts(
    recv: Payload, recv_counts_NS, *, capacity: int, round_index: int, dtype
) -> tuple[jax.Array, jax.Array]:
    """Received ``[N, C, D]`` rows to the expert layout ``[S, N * C, D]`` (+ slot per row)."""
    n, s = recv_counts_NS.shape
    slot_NC = received_slots(recv_counts_NS, capacity, round_index)
    x_NCD = dequantize(recv, dtype)
    onehot_SNC = slot_NC[None] == jnp.arange(s, dtype=jnp.int32)[:, None, None]
    x_SNCD = jnp.where(onehot_SNC[..., None], x_NCD[None], jnp.zeros((), dtype))
    return x_SNCD.reshape(s, n * capacity, -1), slot_NC


def pack_outputs(y_SXD, slot_NC, *, int8: bool) -> Payload:
    """Expert outputs back to per-source ``[N, C, D]`` buffers (empty rows are zero)."""
    s, _, d = y_SXD.shape
    n, c = slot_NC.shape
    y_NCSD = jnp.transpose(y_SXD.reshape(s, n, c, d), (1, 2, 0, 3))
    y_NCD = jnp.take_along_axis(y_NCSD, jnp.minimum(slot_NC, s - 1)[..., None, None], axis=2)
    y_NCD = jnp.where((slot_NC < s)[..., None], y_NCD[:, :, 0], jnp.zeros((), y_SXD.dtype))
    if not int8:
        return Payload(y_NCD, None)
    q, scale = quantize_int8(y_NCD.reshape(n * c, d))
    return Payload(q.reshape(n, c, d), scale.reshape(n, c))


def combine_round(back: Payload, routes: Routes, topk_w_TK, *, capacity: int, round_index: int,
                  dtype) -> jax.Array:
    """Gate-weighted sum of this round's returned rows, in token order: ``[T, D]``."""
    t, k = topk_w_TK.shape
    dest_A, c_A = send_index(routes, capacity, round_index)
    y_NCD = dequantize(back, dtype)
    in_round_A = c_A < capacity
    y_AD = y_NCD[dest_A, jnp.minimum(c_A, capacity - 1)]
    w_A = jnp.where(in_round_A, topk_w_TK.reshape(t * k).astype(dtype), 0)
    return jnp.sum((y_AD * w_A[:, None]).reshape(t, k, -1), axis=1)


def moe_ep_local(
    experts_S: dict,
    x_TD: jax.Array,
    topk_ids_TK: jax.Array,
    topk_w_TK: jax.Array,
    replicas_LR: jax.Array,
    num_replicas_L: jax.Array,
    *,
    axis: str,
    capacity: int,
    rounds: int = 1,
    int8_dispatch: bool = False,
    int8_combine: bool = False,
    expert_fn: Callable = expert_ffn,
    exchange: str = "all_to_all",
) -> tuple[jax.Array, LocalStats]:
    """Dispatch, expert compute and combine for one rank; call inside ``shard_map``.

    Args:
      experts_S: this rank's slot weights, e.g. ``{"gate": [S, D, F], ...}``.
      x_TD: this rank's tokens. topk_ids_TK / topk_w_TK: logical experts and gates
        (negative ids are skipped).
      replicas_LR, num_replicas_L: the expert map (replicated on every rank).
      capacity: C, rows per destination per round; rounds: static number of rounds.
    Returns:
      ``(out_TD, LocalStats)``; ``out_TD`` is exact when ``LocalStats.overflow`` is 0.
    """
    xchg = EXCHANGES[exchange]
    n = jax.lax.axis_size(axis)
    s = next(iter(experts_S.values())).shape[0]
    routes = route(topk_ids_TK, jax.lax.axis_index(axis), replicas_LR, num_replicas_L,
                   num_devices=n, slots_per_device=s)
    recv_counts_NS = xchg(routes.counts_NS, axis)  # phase 1
    out_TD = jnp.zeros_like(x_TD)
    for r in range(rounds):  # phase 2, round by round
        send = pack_tokens(x_TD, routes, capacity=capacity, round_index=r, int8=int8_dispatch)
        recv = jax.tree.map(lambda a: xchg(a, axis), send)
        x_SXD, slot_NC = unpack_for_experts(recv, recv_counts_NS, capacity=capacity,
                                            round_index=r, dtype=x_TD.dtype)
        back = pack_outputs(expert_fn(experts_S, x_SXD), slot_NC, int8=int8_combine)
        back = jax.tree.map(lambda a: xchg(a, axis), back)
        out_TD = out_TD + combine_round(back, routes, topk_w_TK, capacity=capacity,
                                        round_index=r, dtype=x_TD.dtype)
    sent_N = jnp.sum(routes.counts_NS, axis=1)
    stats = LocalStats(
        slot_tokens_S=jnp.sum(recv_counts_NS, axis=0)[None],
        overflow=jnp.sum(jnp.maximum(sent_N - rounds * capacity, 0))[None],
        max_rows=jnp.max(sent_N)[None],
    )
    return out_TD, stats
