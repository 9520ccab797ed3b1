"""Where each (token, choice) goes in the fixed-capacity dispatch buffers.

Pure per-rank math, no communication, so it is property-tested on its own.

A rank holds T tokens, each routed to K logical experts. Each assignment ``a = t * K + k``
goes to one physical slot, hence to a destination rank ``dest`` and a local slot on it. The
replica of expert ``e`` is ``(j + rank + e) mod replicas[e]`` for the rank's ``j``-th
assignment to ``e`` (in token order): a rank spreads an expert's tokens over its replicas
exactly evenly, the offset staggers ranks (and experts, so replicas with the same index do
not fill together), and no rank needs to know what the others send. Rows sent to one destination are
ordered by (local slot, token, choice) and numbered ``row = 0, 1, ...``; with capacity C a
round ``r`` carries rows ``[r * C, (r + 1) * C)`` of every destination in a ``[N, C, D]``
buffer. Phase 1 of the dispatch exchanges the per-(destination, slot) counts, which lets
the receiver find the slot of every row without any per-row metadata.

Shape legend: T tokens, K choices, A = T * K assignments, N ranks, S slots per rank,
C capacity (rows per destination per round), L experts, R replicas.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Routes(NamedTuple):
    """Per-assignment destinations and the per-destination counts (phase-1 payload)."""

    dest_A: jax.Array  # [A] destination rank
    row_A: jax.Array  # [A] row number in the destination's stream
    counts_NS: jax.Array  # [N, S] rows for each (destination, local slot)


def route(
    topk_ids_TK: jax.Array,
    rank: jax.Array | int,
    replicas_LR: jax.Array,
    num_replicas_L: jax.Array,
    *,
    num_devices: int,
    slots_per_device: int,
) -> Routes:
    """Physical slot, destination and row of every assignment.

    Args:
      topk_ids_TK: logical expert ids; a negative id means "no expert" (padding token).
      rank: this rank's index on the expert-parallel axis (offsets the replica choice).
      replicas_LR, num_replicas_L: the expert map (see ``ExpertMap.device_arrays``).
    """
    n, s = num_devices, slots_per_device
    t, k = topk_ids_TK.shape
    valid_TK = topk_ids_TK >= 0
    ids_TK = jnp.where(valid_TK, topk_ids_TK, 0)
    replica_TK = (expert_occurrence(ids_TK, valid_TK) + rank + ids_TK) % num_replicas_L[ids_TK]
    slot_TK = replicas_LR[ids_TK, replica_TK]
    # Invalid assignments get the key n * s, past every real (destination, slot).
    key_A = jnp.where(valid_TK, slot_TK, n * s).reshape(t * k)
    counts_P = jnp.bincount(key_A, length=n * s + 1)[: n * s].astype(jnp.int32)
    counts_NS = counts_P.reshape(n, s)
    order_A = jnp.argsort(key_A, stable=True)
    start_P = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(counts_P)])
    rank_sorted = jnp.arange(t * k, dtype=jnp.int32) - start_P[key_A[order_A]]
    rank_A = jnp.zeros(t * k, jnp.int32).at[order_A].set(rank_sorted)
    slot_offset_NS = jnp.cumsum(counts_NS, axis=1) - counts_NS
    dest_A = jnp.where(key_A < n * s, key_A // s, n)
    row_A = slot_offset_NS.reshape(-1)[jnp.minimum(key_A, n * s - 1)] + rank_A
    row_A = jnp.where(dest_A < n, row_A, -1)
    return Routes(dest_A.astype(jnp.int32), row_A.astype(jnp.int32), counts_NS)


def expert_occurrence(ids_TK: jax.Array, valid_TK: jax.Array) -> jax.Array:
    """``[T, K]``: how many earlier assignments (token-major) of this rank chose the same
    expert; invalid assignments count in a group of their own."""
    t, k = ids_TK.shape
    key_A = jnp.where(valid_TK, ids_TK, -1).reshape(t * k)
    order_A = jnp.argsort(key_A, stable=True)
    sorted_A = key_A[order_A]
    first_A = jnp.searchsorted(sorted_A, sorted_A, side="left").astype(jnp.int32)
    occ_sorted = jnp.arange(t * k, dtype=jnp.int32) - first_A
    return jnp.zeros(t * k, jnp.int32).at[order_A].set(occ_sorted).reshape(t, k)


def rounds_needed(counts_NS: jax.Array, capacity: int) -> jax.Array:
    """Rounds of capacity C this rank needs so that no row is left behind."""
    return (jnp.max(jnp.sum(counts_NS, axis=1)) + capacity - 1) // capacity


def send_index(routes: Routes, capacity: int, round_index: int) -> tuple[jax.Array, jax.Array]:
    """``(dest_A, c_A)`` buffer coordinates for this round; out-of-round rows get ``c = C``.

    Scatters with ``mode="drop"`` then skip them: nothing is lost, they ride a later round.
    """
    c_A = routes.row_A - round_index * capacity
    in_round = (routes.dest_A < routes.counts_NS.shape[0]) & (c_A >= 0) & (c_A < capacity)
    return jnp.where(in_round, routes.dest_A, 0), jnp.where(in_round, c_A, capacity)


def received_slots(recv_counts_NS: jax.Array, capacity: int, round_index: int) -> jax.Array:
    """``[N, C]`` local slot of each received row (by source rank), ``S`` for empty rows."""
    s = recv_counts_NS.shape[1]
    q_C = round_index * capacity + jnp.arange(capacity, dtype=jnp.int32)
    ends_NS = jnp.cumsum(recv_counts_NS, axis=1)
    slot_NC = jnp.sum(q_C[None, :, None] >= ends_NS[:, None, :], axis=2)
    return jnp.minimum(slot_NC, s).astype(jnp.int32)
