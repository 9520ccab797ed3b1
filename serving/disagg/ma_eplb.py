"""EPLB while serving an MA deployment: load counters on the device, windows read back at
their boundaries, and the swap of a rebalanced expert map (xDeepServe §4.5).

``ExpertLoadCounter``: every gate program adds each attention rank's tokens per logical expert
into a ``[A, E]`` int32 row per (domain, MoE layer) (``Domain.gate``); a pass's rows are added
into the window's accumulators on the device once the pass is final (a re-run pass is not
counted twice). At a window boundary the accumulators are read back (the only host sync),
summed over ranks and domains, and become the last window (``stats()["expert_load"]``) and one
time slice of the selection.

``ExpertRebalancer``: per MoE layer a map from ``collectives.eplb.rebalance``. A swap runs
between steps in three phases, like the paper's: (1) **map off**: the layer routes with the
old map minus the slots about to be rewritten; (2) **weights move**: each device whose slots
change gets a new slot shard built from the host copy of the experts with ``device_put``
(asynchronous; the old buffers keep serving); (3) **map on**: at the first step boundary after
the new shards are ready, the new weights and the new map are switched in together.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque

import jax
import numpy as np

from collectives.eplb import moved_slots, rebalance, switch_off_map
from collectives.expert_map import ExpertMap

log = logging.getLogger(__name__)


@jax.jit
def _add_rows(pairs: dict) -> dict:
    return {k: a + b for k, (a, b) in pairs.items()}


class ExpertLoadCounter:
    """Tokens per (MoE layer, logical expert), accumulated on device, read per window."""

    def __init__(self, layers: list[int], num_experts: int, window_size: int,
                 history: int = 1) -> None:
        self.layers = layers
        self.num_experts = num_experts
        self.window_size = window_size
        self._acc: dict[tuple[int, int], jax.Array] = {}  # (domain, layer) -> [A, E]
        self.steps_in_window = 0
        self.windows = 0
        self.last_window: dict[int, np.ndarray] = {}
        self.slices: deque[dict[int, np.ndarray]] = deque(maxlen=max(1, history))

    def add(self, load: dict[tuple[int, int], jax.Array]) -> None:
        """A final pass's rows: one device add per domain, no host sync."""
        for domain in sorted({d for d, _ in load}):
            mine = {k: v for k, v in load.items() if k[0] == domain}
            pairs = {k: (self._acc[k], v) for k, v in mine.items() if k in self._acc}
            self._acc.update({k: v for k, v in mine.items() if k not in self._acc})
            if pairs:
                self._acc.update(_add_rows(pairs))

    def step(self) -> bool:
        """Count a step; at a window boundary read the window back. True at a boundary."""
        self.steps_in_window += 1
        if self.steps_in_window < self.window_size:
            return False
        window = {layer: np.zeros(self.num_experts, np.int64) for layer in self.layers}
        for (_, layer), rows in self._acc.items():
            window[layer] += np.asarray(rows).sum(axis=0)
        self._acc = {}
        self.steps_in_window = 0
        self.windows += 1
        self.last_window = window
        self.slices.append(window)
        return True

    def time_slices(self, count: int) -> dict[int, np.ndarray]:
        """``{layer: counts [T, E]}`` of the last ``count`` windows (at most those kept)."""
        recent = list(self.slices)[-max(1, count):]
        return {layer: np.stack([w[layer] for w in recent]) for layer in self.layers}


@dataclasses.dataclass
class _Swap:
    """A swap between phases 2 and 3: new maps and weights, moving."""

    maps: dict[int, ExpertMap]
    weights: list[tuple[dict, int, dict]]  # (placed dict, layer, new tree), filled by _move
    started: float
    slots: int
    bytes: int
    ready: threading.Event = dataclasses.field(default_factory=threading.Event)
    ready_at: float = 0.0
    failed: bool = False


class ExpertRebalancer:
    """Per-layer expert maps of one expert slice and their swaps.

    Args:
      services: every domain's routed-expert ``A2E`` (each gets every layer's map).
      placed: ``(service, {layer: slot weight tree})`` per distinct placement (domains on one
        expert mesh share one), mutated in place so every service sees a swap.
      host_experts: ``{layer: {name: [E, ...]}}`` the logical expert weights in host memory
        (the paper's prefetched copy) that moved slots are built from.
      initial: the deployment's map (every layer starts with it).
      num_redundant: replicas beyond one per expert that each layer's map gets.
    """

    def __init__(self, services: list, placed: list[tuple[object, dict]],
                 host_experts: dict[int, dict], initial: ExpertMap, num_redundant: int) -> None:
        self.services = services
        self.placed = placed
        self.host_experts = host_experts
        self.num_redundant = num_redundant
        self.maps = {layer: initial for layer in host_experts}
        self.pending: _Swap | None = None
        self.rebalances = 0
        self.moved_slots = 0
        self.moved_bytes = 0
        self.last_swap_ms = 0.0
        self.last_plan_ms = 0.0  # what the stepping thread spent in ``start`` (its stall)

    def start(self, counts: dict[int, np.ndarray]) -> bool:
        """Phases 1 and 2 for the layers whose balanced map differs; False if none does
        (or a swap is still moving)."""
        if self.pending is not None:
            return False
        started = time.perf_counter()
        new = {layer: rebalance(c, self.maps[layer], self.num_redundant)
               for layer, c in counts.items()}
        new = {layer: m for layer, m in new.items()
               if len(moved_slots(self.maps[layer], m))}
        if not new:
            return False
        for layer, emap in new.items():  # phase 1: moved slots leave the map
            off = switch_off_map(self.maps[layer], emap)
            for svc in self.services:
                svc.set_map(layer, off)
        jobs = [(svc, by_layer, layer, self.maps[layer], emap, self.host_experts[layer])
                for svc, by_layer in self.placed for layer, emap in new.items()]
        swap = _Swap(new, [], started,
                     sum(len(moved_slots(self.maps[k], m)) for k, m in new.items()), 0)
        # phase 2 off the stepping thread: host -> device copies, then wait for them
        threading.Thread(target=_move, args=(swap, jobs), daemon=True,
                         name="eplb-swap").start()
        self.pending = swap
        self.last_plan_ms = (time.perf_counter() - started) * 1e3
        log.info("EPLB: rebalancing layers %s (%d slots)", sorted(new), swap.slots)
        return True

    def poll(self) -> bool:
        """Phase 3 once the new shards are ready (never waits). True when switched."""
        swap = self.pending
        if swap is None or not swap.ready.is_set():
            return False
        self.pending = None
        if swap.failed:
            for layer in swap.maps:
                for svc in self.services:
                    svc.set_map(layer, self.maps[layer])
            return False
        for by_layer, layer, tree in swap.weights:
            by_layer[layer] = tree
        for layer, emap in swap.maps.items():
            for svc in self.services:
                svc.set_map(layer, emap)
            self.maps[layer] = emap
        self.rebalances += 1
        self.moved_slots += swap.slots
        self.moved_bytes += swap.bytes
        self.last_swap_ms = (swap.ready_at - swap.started) * 1e3
        return True

    def wait(self) -> bool:
        """Phase 3 after waiting for the weights (tests and benchmarks)."""
        if self.pending is not None:
            self.pending.ready.wait()
        return self.poll()


def _move(swap: _Swap, jobs: list) -> None:
    """Phase 2: build every changed shard (``device_put`` from the host copy), wait until
    they are on their devices, and mark the swap ready."""
    try:
        for svc, by_layer, layer, old, new, host in jobs:
            tree, moved = _rewrite(svc, by_layer[layer], old, new, host)
            swap.weights.append((by_layer, layer, tree))
            swap.bytes += moved
        jax.block_until_ready([tree for _, _, tree in swap.weights])
    except Exception:  # the old weights and maps stay; poll switches the old maps back on
        log.exception("EPLB: moving expert weights failed; keeping the current placement")
        swap.failed = True
    swap.ready_at = time.perf_counter()
    swap.ready.set()


def _rewrite(svc, tree: dict, old: ExpertMap, new: ExpertMap, host: dict) -> tuple[dict, int]:
    """The slot weights of ``new``: devices whose slots change get a shard built from the host
    experts (``device_put``); the others keep theirs. Returns the tree and bytes moved."""
    s, offset = new.slots_per_device, svc.slot_offset
    devices = svc.run_devices
    changed = sorted({(int(p) + offset) // s for p in moved_slots(old, new)})
    table = np.concatenate([np.full(offset, -1, np.int32), new.slot_expert_P])
    out, nbytes = {}, 0
    for name, leaf in tree.items():
        shards = {sh.device: sh.data for sh in leaf.addressable_shards}
        experts = host[name]
        for j in changed:
            held = table[j * s:(j + 1) * s]
            rows = experts[np.maximum(held, 0)]
            rows = np.where((held >= 0).reshape((-1,) + (1,) * (rows.ndim - 1)), rows,
                            np.zeros((), rows.dtype))
            shards[devices[j]] = jax.device_put(rows, devices[j])
            nbytes += rows.nbytes
        out[name] = jax.make_array_from_single_device_arrays(
            leaf.shape, leaf.sharding, [shards[d] for d in devices])
    return out, nbytes
