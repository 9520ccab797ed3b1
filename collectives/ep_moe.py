"""Host-side runner for expert-parallel MoE: compiled programs per capacity bucket,
overflow re-runs, and byte/latency/load stats.

``EpMoe(mesh, expert_map)(experts_P, x_TD, topk_ids_TK, topk_w_TK)`` returns the MoE output
for tokens sharded over the mesh axis (rank-major, T per rank). Programs are compiled once
per capacity bucket. When a step overflows its bucket the step is re-run with the next
bucket (the overflowing result is discarded, never returned), the rerun is counted, and
later steps start from that bucket (grow-only).

On TPU/GPU and CPU meshes up to 256 devices one program does everything ("fused"). On
larger XLA:CPU meshes the same stage functions run as separate programs with each
exchange alone in its own program ("staged"; see ``collectives.exchange``).
"""

from __future__ import annotations

import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from collectives import dispatch as d
from collectives.exchange import gather_exchange, needs_staging
from collectives.expert_map import ExpertMap
from collectives.layout import route
from collectives.stats import CollectiveRecord, CollectiveStats, min_payload_bytes
from xds_jax.model.moe import expert_ffn


def shard_from_host(x, sharding: NamedSharding) -> jax.Array:
    """A global array from host data, each device given only its own slice."""
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx],
                                        dtype=host.dtype)


def capacity_buckets(tokens_per_rank: int, top_k: int, num_ranks: int) -> tuple[int, ...]:
    """Doubling buckets from twice the balanced share up to ``T * K`` (never overflows)."""
    top = tokens_per_rank * top_k
    c = max(1, min(top, 2 * math.ceil(top / num_ranks)))
    out = [c]
    while out[-1] < top:
        out.append(min(top, out[-1] * 2))
    return tuple(out)


def next_capacity(capacity: int, tokens_per_rank: int, top_k: int, num_ranks: int) -> int:
    """The smallest capacity bucket above ``capacity`` (``T * K`` at most, which fits all)."""
    larger = [b for b in capacity_buckets(tokens_per_rank, top_k, num_ranks) if b > capacity]
    return larger[0] if larger else tokens_per_rank * top_k


class EpMoe:
    """Dispatch + experts + combine over ``mesh[axis]`` with an ``ExpertMap``."""

    def __init__(
        self,
        mesh: jax.sharding.Mesh,
        expert_map: ExpertMap,
        *,
        axis: str = "ep",
        capacity: int | None = None,
        rounds: int = 1,
        int8_dispatch: bool = False,
        int8_combine: bool = False,
        expert_fn=expert_ffn,
        staged: bool | None = None,
        stats: CollectiveStats | None = None,
        replica_width: int | None = None,
    ) -> None:
        if mesh.shape[axis] != expert_map.num_devices:
            raise ValueError(f"mesh axis {axis!r} has {mesh.shape[axis]} ranks, expert map "
                             f"has {expert_map.num_devices}")
        self.mesh, self.axis, self.expert_map = mesh, axis, expert_map
        self.capacity, self.rounds = capacity, rounds
        self.int8_dispatch, self.int8_combine = int8_dispatch, int8_combine
        self.expert_fn = expert_fn
        self.staged = needs_staging(mesh, axis) if staged is None else staged
        self.stats = stats if stats is not None else CollectiveStats()
        self.replica_width = max(replica_width or 1, int(expert_map.replica_counts().max()))
        self.replicas = self.map_arrays(expert_map)
        self._programs: dict = {}

    @property
    def n(self) -> int:
        return self.expert_map.num_devices

    def map_arrays(self, expert_map: ExpertMap) -> tuple[jax.Array, jax.Array]:
        """``(replicas_LR, num_replicas_L)`` of a map on this mesh, replicated, at the fixed
        width ``replica_width``: a program input, so a new map needs no recompile."""
        if expert_map.num_devices != self.n or expert_map.num_experts != \
                self.expert_map.num_experts:
            raise ValueError(f"map of {expert_map.num_devices} devices x "
                             f"{expert_map.num_experts} experts on an EpMoe of {self.n} x "
                             f"{self.expert_map.num_experts}")
        repl = NamedSharding(self.mesh, P())
        return (shard_from_host(expert_map.replica_table(self.replica_width), repl),
                shard_from_host(expert_map.replica_counts(), repl))

    def shard(self, x):
        """Put a rank-major host array (leading dim N * something) on the mesh axis.

        Built shard by shard from host memory: ``device_put`` of a one-device array
        compiles a slicing program, which takes tens of seconds on 384 CPU devices.
        """
        return shard_from_host(x, NamedSharding(self.mesh, P(self.axis)))

    def __call__(self, experts_P: dict, x_TD, topk_ids_TK, topk_w_TK,
                 expert_map: ExpertMap | None = None):
        """The MoE output; ``expert_map`` routes with another map of the same experts (its
        slots must hold what ``experts_P`` holds)."""
        emap = expert_map or self.expert_map
        replicas = self.map_arrays(emap) if expert_map is not None else None
        t, k = topk_ids_TK.shape[0] // self.n, topk_ids_TK.shape[1]
        buckets = capacity_buckets(t, k, self.n)
        if self.capacity is not None:
            buckets = (self.capacity,) + tuple(b for b in buckets if b > self.capacity)
        for i, cap in enumerate(buckets):
            start = time.perf_counter()
            out, st = self._run(cap, experts_P, x_TD, topk_ids_TK, topk_w_TK, replicas)
            out = jax.block_until_ready(out)
            seconds = time.perf_counter() - start
            overflow = int(np.sum(np.asarray(st.overflow)))
            if overflow == 0 or i == len(buckets) - 1:
                break
            self.stats.overflow_rows += overflow
            self.stats.reruns += 1
        if self.capacity is None or cap > self.capacity:
            self.capacity = cap  # grow-only: later steps start from the bucket that fit
        self._record(cap, seconds, x_TD, t, k, st, emap)
        return out

    def launch(self, capacity: int, experts_P: dict, x_TD, topk_ids_TK, topk_w_TK,
               replicas=None):
        """One dispatch + experts + combine at ``capacity``, without waiting or re-running.

        Returns device arrays ``(out_TD, LocalStats)``; ``out_TD`` is exact only if
        ``LocalStats.overflow`` sums to 0. For callers that launch many steps and check
        overflow once (MA decode checks once per model step, then re-runs the step with
        ``next_capacity``). Nothing is recorded in ``stats``. ``replicas``: a map from
        ``map_arrays`` (default the constructor's).
        """
        return self._run(capacity, experts_P, x_TD, topk_ids_TK, topk_w_TK, replicas)

    def _record(self, cap, seconds, x_TD, t, k, st, emap: ExpertMap) -> None:
        n, s, rounds = self.n, self.expert_map.slots_per_device, self.rounds
        dsize = x_TD.shape[-1]
        item = jnp.dtype(x_TD.dtype).itemsize
        rows = rounds * n * n * cap  # every rank sends C rows to every rank per round
        row_in = dsize + 4 if self.int8_dispatch else dsize * item
        row_out = dsize + 4 if self.int8_combine else dsize * item
        slot_tokens = np.asarray(st.slot_tokens_S).reshape(-1)
        held = emap.slot_expert_P >= 0
        self.stats.add_expert_tokens(
            np.bincount(emap.slot_expert_P[held], weights=slot_tokens[held],
                        minlength=emap.num_experts))
        payload = min_payload_bytes(n * t, k, dsize, item)
        extra = {"capacity": cap, "rounds": rounds, "staged": self.staged,
                 "max_rows": int(np.max(np.asarray(st.max_rows)))}
        # One program runs dispatch, experts and combine, so wall time is per step; the
        # benchmark separates communication by timing a step with identity experts.
        self.stats.record(CollectiveRecord("dispatch_counts", n * n * s * 4, 0.0, n, 0, extra))
        self.stats.record(CollectiveRecord("dispatch", rows * row_in, 0.0, n, payload, extra))
        self.stats.record(CollectiveRecord("combine", rows * row_out, 0.0, n, payload, extra))
        self.stats.record(CollectiveRecord("ep_moe_step", rows * (row_in + row_out), seconds,
                                           n, 2 * payload, extra))

    def _run(self, cap, experts_P, x_TD, ids_TK, w_TK, replicas=None):
        replicas = replicas if replicas is not None else self.replicas
        if not self.staged:
            return self._fused(cap)(experts_P, x_TD, ids_TK, w_TK, *replicas)
        return self._run_staged(cap, experts_P, x_TD, ids_TK, w_TK, replicas)

    def _fused(self, cap):
        return _fused_program(self.mesh, self.axis, cap, self.rounds, self.int8_dispatch,
                              self.int8_combine, self.expert_fn)

    # --- staged: the same stages, one program each, exchanges alone -------------------

    def _program(self, name, fn, n_in, n_replicated=0):
        if name not in self._programs:
            a = P(self.axis)
            specs = (a,) * n_in + (P(),) * n_replicated
            self._programs[name] = jax.jit(jax.shard_map(
                fn, mesh=self.mesh, in_specs=specs, out_specs=a))
        return self._programs[name]

    def _exchange(self, x):
        ax = self.axis
        prog = self._program("exchange", lambda a: gather_exchange(a, ax), 1)
        return prog(x)

    def _run_staged(self, cap, experts_P, x_TD, ids_TK, w_TK, replicas):
        ax, s = self.axis, self.expert_map.slots_per_device
        i8d, i8c, efn = self.int8_dispatch, self.int8_combine, self.expert_fn

        def routes_of(ids, rep, nrep):
            return route(ids, jax.lax.axis_index(ax), rep, nrep,
                         num_devices=jax.lax.axis_size(ax), slots_per_device=s)

        routes = self._program("route", routes_of, 1, 2)(ids_TK, *replicas)
        recv_counts = self._exchange(routes.counts_NS)
        out = jnp.zeros_like(x_TD)
        for r in range(self.rounds):
            pack = functools.partial(_pack_staged, capacity=cap, round_index=r, int8=i8d)
            send = self._program(("pack", cap, r), pack, 4)(x_TD, *routes)
            recv = jax.tree.map(self._exchange, send)
            expert = functools.partial(_expert_staged, capacity=cap, round_index=r,
                                       int8=i8c, expert_fn=efn, dtype=x_TD.dtype)
            back = self._program(("expert", cap, r), expert, 4)(experts_P, recv_counts, *recv)
            back = jax.tree.map(self._exchange, back)
            comb = functools.partial(_combine_staged, capacity=cap, round_index=r,
                                     dtype=x_TD.dtype)
            out = out + self._program(("combine", cap, r), comb, 6)(w_TK, *routes, *back)
        stats = self._program(("stats", cap), functools.partial(
            _stats_staged, capacity=cap, rounds=self.rounds), 2)(routes.counts_NS, recv_counts)
        return out, stats


@functools.cache
def _fused_program(mesh, axis, cap, rounds, int8_dispatch, int8_combine, expert_fn):
    """One compiled program per configuration, shared by every ``EpMoe`` on the mesh."""
    fn = functools.partial(d.moe_ep_local, axis=axis, capacity=cap, rounds=rounds,
                           int8_dispatch=int8_dispatch, int8_combine=int8_combine,
                           expert_fn=expert_fn)
    a = P(axis)
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(a, a, a, a, P(), P()),
                                 out_specs=(a, a)))


def _pack_staged(x_TD, dest_A, row_A, counts_NS, *, capacity, round_index, int8):
    p = d.pack_tokens(x_TD, d.Routes(dest_A, row_A, counts_NS), capacity=capacity,
                      round_index=round_index, int8=int8)
    return p if p.scale is not None else d.Payload(p.data, jnp.zeros(p.data.shape[:2]))


def _expert_staged(experts_S, recv_counts_NS, data, scale, *, capacity, round_index, int8,
                   expert_fn, dtype):
    recv = d.Payload(data, scale if data.dtype == jnp.int8 else None)
    x_SXD, slot_NC = d.unpack_for_experts(recv, recv_counts_NS, capacity=capacity,
                                          round_index=round_index, dtype=dtype)
    back = d.pack_outputs(expert_fn(experts_S, x_SXD), slot_NC, int8=int8)
    return back if back.scale is not None else d.Payload(back.data, jnp.zeros(data.shape[:2]))


def _combine_staged(w_TK, dest_A, row_A, counts_NS, data, scale, *, capacity, round_index,
                    dtype):
    back = d.Payload(data, scale if data.dtype == jnp.int8 else None)
    return d.combine_round(back, d.Routes(dest_A, row_A, counts_NS), w_TK, capacity=capacity,
                           round_index=round_index, dtype=dtype)


def _stats_staged(counts_NS, recv_counts_NS, *, capacity, rounds):
    sent_N = jnp.sum(counts_NS, axis=1)
    return d.LocalStats(jnp.sum(recv_counts_NS, axis=0)[None],
                        jnp.sum(jnp.maximum(sent_N - rounds * capacity, 0))[None],
                        jnp.max(sent_N)[None])
