"""A2E / E2A: tokens from a decode-attention slice to the expert slice and back.

Two shapes, both checked against the dense MoE:

``trampoline`` (xDeepServe's design, needs attention ranks A <= expert ranks E): hop 1 is a
1:1 per-shard copy of the attention batch onto A *trampoline* devices of the expert slice
(evenly spread); the trampoline shards plus empty buffers on the other expert devices are
assembled (no copy) into one array on the expert mesh; hop 2 is the dispatch all-to-all
inside the expert mesh, then experts and combine; E2A mirrors it (combine lands on the
trampolines, then a 1:1 copy back to the attention devices). Each attention rank talks to
exactly one expert rank.

``direct``: one program over the union of both slices; attention ranks own no expert slots
and every attention rank writes into every expert rank (the high fan-out trampolines
avoid). Works for any A and E.

Shape legend: A attention ranks, E expert ranks, T tokens per attention rank, K choices,
D hidden.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from collectives.ep_moe import EpMoe
from collectives.expert_map import ExpertMap
from collectives.stats import CollectiveRecord, CollectiveStats


class A2EError(ValueError):
    """The two slices cannot be connected the way asked."""


def trampoline_devices(expert_devices: list, num_attention: int) -> list:
    """``num_attention`` expert devices spread evenly over the expert slice."""
    e = len(expert_devices)
    if num_attention > e:
        raise A2EError(f"trampolines need attention ranks ({num_attention}) <= expert ranks "
                       f"({e}); use mode='direct'")
    return [expert_devices[(i * e) // num_attention] for i in range(num_attention)]


def shards_in_order(x: jax.Array) -> list[jax.Array]:
    """The per-device buffers of an array sharded on its first axis, in index order."""
    shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
    return [s.data for s in shards]


def _assemble(shape, sharding, per_device: dict, devices, make_empty) -> jax.Array:
    """One global array from per-device buffers; devices without one get ``make_empty``."""
    arrays = [per_device[dev] if dev in per_device else make_empty(dev) for dev in devices]
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


class A2E:
    """Attention-to-expert transport plus the expert step, for one attention domain.

    ``__call__(experts_P, x_TD, topk_ids_TK, topk_w_TK)`` takes tokens on the attention mesh
    (rank-major over ``attn_axis``) and expert slot weights on the expert mesh, and returns
    the gate-weighted expert output on the attention mesh. ``send`` / ``compute`` /
    ``receive`` are the three steps for callers that pipeline them (MA micro-batches).
    """

    def __init__(self, attn_mesh: Mesh, expert_mesh: Mesh, expert_map: ExpertMap, *,
                 attn_axis: str = "dp", expert_axis: str = "ep", mode: str = "trampoline",
                 stats: CollectiveStats | None = None, **moe_kwargs) -> None:
        self.attn_devices = list(attn_mesh.devices.flat)
        self.expert_devices = list(expert_mesh.devices.flat)
        if set(self.attn_devices) & set(self.expert_devices):
            raise A2EError("attention and expert slices share devices")
        self.attn_sharding = NamedSharding(attn_mesh, P(attn_axis))
        self.mode = mode
        self.stats = stats if stats is not None else CollectiveStats()
        a = len(self.attn_devices)
        if mode == "trampoline":
            self.trampolines = trampoline_devices(self.expert_devices, a)
            self.tramp_sharding = NamedSharding(Mesh(np.array(self.trampolines), ("t",)), P("t"))
            self.moe = EpMoe(expert_mesh, expert_map, axis=expert_axis, stats=self.stats,
                             **moe_kwargs)
            self.run_devices = self.expert_devices
        elif mode == "direct":
            union = Mesh(np.array(self.attn_devices + self.expert_devices), (expert_axis,))
            self.moe = EpMoe(union, expert_map.with_empty_ranks(before=a), axis=expert_axis,
                             stats=self.stats, **moe_kwargs)
            self.run_devices = self.attn_devices + self.expert_devices
        else:
            raise A2EError(f"unknown A2E mode {mode!r}; use 'trampoline' or 'direct'")
        self.run_sharding = NamedSharding(self.moe.mesh, P(expert_axis))

    def place_experts(self, experts_L: dict) -> dict:
        """Slot weights for ``compute``, from logical expert weights ``[L, ...]``."""
        return jax.tree.map(self.moe.shard, self.moe.expert_map.physical_weights(experts_L))

    def send(self, x_TD, topk_ids_TK, topk_w_TK) -> tuple[jax.Array, ...]:
        """A2E hop 1: the attention batch onto the mesh the expert step runs on."""
        arrays = (x_TD, topk_ids_TK, topk_w_TK)
        t = x_TD.shape[0] // len(self.attn_devices)
        if self.mode == "trampoline":
            moved = [{dev: jax.device_put(s, dev) for dev, s in
                      zip(self.trampolines, shards_in_order(arr), strict=True)}
                     for arr in arrays]
        else:  # direct: the attention shards are already on their union ranks
            moved = [dict(zip(self.attn_devices, shards_in_order(arr), strict=True))
                     for arr in arrays]
        out = []
        for arr, per_device, fill in zip(arrays, moved, (0, -1, 0), strict=True):
            shape = (t * len(self.run_devices),) + arr.shape[1:]
            out.append(_assemble(shape, self.run_sharding, per_device, self.run_devices,
                                 functools.partial(_empty, (t,) + arr.shape[1:], arr.dtype,
                                                   fill)))
        return tuple(out)

    def compute(self, experts_P: dict, inputs: tuple[jax.Array, ...]) -> jax.Array:
        """Hop 2 (dispatch inside the expert mesh), experts, combine."""
        return self.moe(experts_P, *inputs)

    def compute_async(self, experts_P: dict, inputs: tuple[jax.Array, ...],
                      capacity: int) -> tuple[jax.Array, object]:
        """Hop 2, experts and combine at a fixed capacity without waiting:
        ``(out, LocalStats)``; the caller checks ``LocalStats.overflow`` (``EpMoe.launch``)."""
        return self.moe.launch(capacity, experts_P, *inputs)

    def hop_bytes(self, x_TD, topk_ids_TK) -> tuple[int, int]:
        """Bytes of hop 1 (A2E: rows, ids and gates) and of the E2A hop back, all ranks;
        zero in direct mode (no copy between slices)."""
        if self.mode != "trampoline":
            return 0, 0
        row = x_TD.shape[-1] * jnp.dtype(x_TD.dtype).itemsize
        tokens = x_TD.shape[0]
        return tokens * (row + topk_ids_TK.shape[-1] * 8), tokens * row

    def receive(self, out_TD: jax.Array) -> jax.Array:
        """E2A: combined outputs back onto the attention devices, in token order."""
        by_dev = {s.device: s.data for s in out_TD.addressable_shards}
        t = out_TD.shape[0] // len(self.run_devices)
        if self.mode == "trampoline":
            shards = [jax.device_put(by_dev[dev], a) for dev, a in
                      zip(self.trampolines, self.attn_devices, strict=True)]
        else:
            shards = [by_dev[a] for a in self.attn_devices]
        shape = (t * len(self.attn_devices),) + out_TD.shape[1:]
        return jax.make_array_from_single_device_arrays(shape, self.attn_sharding, shards)

    def __call__(self, experts_P: dict, x_TD, topk_ids_TK, topk_w_TK) -> jax.Array:
        start = time.perf_counter()
        inputs = jax.block_until_ready(self.send(x_TD, topk_ids_TK, topk_w_TK))
        sent = time.perf_counter()
        out_TD = self.compute(experts_P, inputs)
        computed = time.perf_counter()
        out = jax.block_until_ready(self.receive(out_TD))
        self._record(x_TD, topk_ids_TK, sent - start, time.perf_counter() - computed)
        return out

    def _record(self, x_TD, topk_ids_TK, send_s: float, recv_s: float) -> None:
        """Bytes of the hops between slices (the expert-mesh exchanges are in the
        ``dispatch`` / ``combine`` records of the same stats)."""
        a = len(self.attn_devices)
        hop, back = self.hop_bytes(x_TD, topk_ids_TK)  # ids int32 + gates float32 per choice
        extra = {"mode": self.mode, "attention": a, "experts": len(self.expert_devices)}
        self.stats.record(CollectiveRecord("a2e_hop", hop, send_s, a, 0, extra))
        self.stats.record(CollectiveRecord("e2a_hop", back, recv_s, a, 0, extra))


@functools.cache
def _zeros_on(shape, dtype, fill, device):
    return jax.device_put(np.full(shape, fill, dtype), device)


def _empty(shape, dtype, fill, device):
    return _zeros_on(tuple(shape), np.dtype(dtype), fill, device)
