"""Logical-to-physical expert placement, passed to the collectives as data.

A physical *slot* holds the weights of one logical expert; device ``d`` owns slots
``[d * S, (d + 1) * S)``. With more slots than experts the extra slots hold replicas of
(hot) experts, as xDeepServe's EPLB does; each rank rotates an expert's tokens over its
replicas (``collectives.layout.route``), so replicas share the load without any extra
communication.

Shape legend: L logical experts, R max replicas of one expert, P physical slots (= N * S).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np


class ExpertMapError(ValueError):
    """The slot table cannot serve the experts (missing expert, bad sizes)."""


@dataclass(frozen=True)
class ExpertMap:
    """Which logical expert each physical slot holds.

    Attributes:
      slot_expert_P: ``[P]`` logical expert id of every physical slot, -1 for an empty slot
        (e.g. attention ranks of a union mesh; never routed to).
      num_devices: ranks of the expert-parallel axis (N).
      slots_per_device: S; ``P == N * S``.
      num_experts: L.
    """

    slot_expert_P: np.ndarray
    num_devices: int
    slots_per_device: int
    num_experts: int

    def __post_init__(self) -> None:
        p = self.num_devices * self.slots_per_device
        if self.slot_expert_P.shape != (p,):
            raise ExpertMapError(
                f"slot table has shape {self.slot_expert_P.shape}, expected ({p},) "
                f"= num_devices {self.num_devices} x slots_per_device {self.slots_per_device}"
            )
        held = np.unique(self.slot_expert_P[self.slot_expert_P >= 0])
        if len(held) and (held.max() >= self.num_experts or self.slot_expert_P.min() < -1):
            raise ExpertMapError(f"slot table names experts outside 0..{self.num_experts - 1}")
        if len(held) != self.num_experts:
            missing = sorted(set(range(self.num_experts)) - set(held.tolist()))
            raise ExpertMapError(f"experts {missing[:8]} have no slot")

    @property
    def num_slots(self) -> int:
        return self.num_devices * self.slots_per_device

    @property
    def num_redundant(self) -> int:
        return int(np.sum(self.slot_expert_P >= 0)) - self.num_experts

    def replica_counts(self) -> np.ndarray:
        """``[L]`` how many slots hold each expert."""
        held = self.slot_expert_P[self.slot_expert_P >= 0]
        return np.bincount(held, minlength=self.num_experts).astype(np.int32)

    def replica_table(self, width: int | None = None) -> np.ndarray:
        """``[L, R]`` slot ids of each expert's replicas, padded by repeating the first;
        ``width`` fixes R (so maps of one layer share a compiled program)."""
        counts = self.replica_counts()
        r = int(counts.max()) if width is None else width
        if r < counts.max():
            raise ExpertMapError(f"an expert has {int(counts.max())} replicas, more than the "
                                 f"table width {r}")
        table = np.zeros((self.num_experts, r), dtype=np.int32)
        for e in range(self.num_experts):
            slots = np.flatnonzero(self.slot_expert_P == e)
            table[e, : len(slots)] = slots
            table[e, len(slots) :] = slots[0]
        return table

    def device_arrays(self, width: int | None = None) -> tuple[jnp.ndarray, jnp.ndarray]:
        """``(replicas_LR, num_replicas_L)`` as int32 device arrays (replicated data)."""
        return jnp.asarray(self.replica_table(width)), jnp.asarray(self.replica_counts())

    def physical_weights(self, experts: dict) -> dict:
        """Gather logical expert weights ``[L, ...]`` into slot order ``[P, ...]`` (host)."""
        idx = np.maximum(self.slot_expert_P, 0)
        out = {}
        for k, v in experts.items():
            v = np.asarray(v)
            held = (self.slot_expert_P >= 0).reshape((-1,) + (1,) * (v.ndim - 1))
            out[k] = np.where(held, v[idx], np.zeros((), v.dtype))
        return out

    def without_device(self, device: int) -> ExpertMap:
        """The placement on the other ``N - 1`` devices after losing ``device`` (vertical
        scale-down): its slots are gone, every other slot keeps its expert. Raises
        ``ExpertMapError`` naming the experts that would be left without a replica."""
        if not 0 <= device < self.num_devices:
            raise ExpertMapError(f"expert device {device} does not exist ({self.num_devices} "
                                 "devices)")
        s = self.slots_per_device
        table = np.delete(self.slot_expert_P, np.s_[device * s:(device + 1) * s])
        lost = sorted(set(range(self.num_experts)) - set(table[table >= 0].tolist()))
        if lost:
            raise ExpertMapError(
                f"losing expert device {device} would leave experts {lost[:8]} with no "
                f"replica ({len(lost)} in all; {self.num_redundant} redundant slots)")
        return ExpertMap(table, self.num_devices - 1, s, self.num_experts)

    def with_empty_ranks(self, before: int, after: int = 0) -> ExpertMap:
        """The same placement on a wider axis whose extra ranks hold no experts."""
        empty = np.full(self.slots_per_device, -1, np.int32)
        table = np.concatenate([np.tile(empty, before), self.slot_expert_P, np.tile(empty, after)])
        return ExpertMap(table, self.num_devices + before + after, self.slots_per_device,
                         self.num_experts)


def build_expert_map(
    num_experts: int,
    num_devices: int,
    slots_per_device: int,
    expert_load: np.ndarray | None = None,
) -> ExpertMap:
    """Place expert ``e`` on slot ``e`` and fill the spare slots with replicas.

    Spare slots go to the experts with the highest ``expert_load`` per replica (greedy),
    or round-robin from expert 0 when no load is given.
    """
    num_slots = num_devices * slots_per_device
    if num_slots < num_experts:
        raise ExpertMapError(
            f"{num_slots} expert slots ({num_devices} devices x {slots_per_device}) are fewer "
            f"than the {num_experts} experts"
        )
    slots = list(range(num_experts))
    if expert_load is None:
        slots += [i % num_experts for i in range(num_slots - num_experts)]
    else:
        load = np.asarray(expert_load, dtype=np.float64)
        reps = np.ones(num_experts)
        for _ in range(num_slots - num_experts):
            e = int(np.argmax(load / reps))
            reps[e] += 1
            slots.append(e)
    return ExpertMap(np.asarray(slots, dtype=np.int32), num_devices, slots_per_device, num_experts)
