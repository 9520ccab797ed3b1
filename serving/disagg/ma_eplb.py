"""EPLB while serving an MA deployment: load counters on the device, windows read back at
their boundaries, and the swap of a rebalanced expert map (xDeepServe §4.5).

``ExpertLoadCounter``: every gate program adds each attention rank's tokens per logical expert
into a ``[A, E]`` int32 row per (domain, MoE layer) (``Domain.gate``), and every routed launch
leaves the rows each expert rank received per local slot (``A2E.last_slot_rows``); a pass's
counts are added into the window's accumulators on the device once the pass is final (a
re-run pass is not counted twice). At a window boundary the accumulators are read back (the
only host sync): attention counts summed over ranks and domains become the last window
(``stats()["expert_load"]``) and one time slice of the selection; expert-rank counts, tokens
per expert device (``stats()["expert_device_load"]``), what the devices really served. The
MTP block's routed experts (speculative decoding, ``serving.disagg.ma_spec``) are one more
layer, ``cfg.num_layers``, counted and rebalanced like a target layer.

``ExpertRebalancer``: per MoE layer a map from ``collectives.eplb.rebalance``, computed on a
background thread. A swap has the paper's three phases: (1) **map off**: the layer routes
with the old map minus the slots about to be rewritten; (2) **weights move**: each device
whose slots change gets a new slot shard built from the host copy of the experts with
``device_put`` (the old buffers keep serving); (3) **map on**: at the first step boundary
after the new shards are ready, the new weights and the new map are switched in together.
The stepping thread only assigns prepared arrays (``last_stall_ms``).
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


@jax.jit
def _sum_rows(parts: dict) -> dict:
    return {k: sum(rows[1:], rows[0]) for k, rows in parts.items()}


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
        # (domain, layer, expert devices) -> [ranks, S] rows received per slot
        self._slot_acc: dict[tuple[int, int, int], jax.Array] = {}
        self._expert_devices = 0  # of the latest launches (the slice may shrink)
        self.last_device_window: dict[int, np.ndarray] = {}  # layer -> [N] tokens per device

    def add(self, load: dict[tuple[int, int], jax.Array]) -> None:
        """A final pass's rows: one device add per domain, no host sync."""
        for domain in sorted({d for d, _ in load}):
            mine = {k: v for k, v in load.items() if k[0] == domain}
            pairs = {k: (self._acc[k], v) for k, v in mine.items() if k in self._acc}
            self._acc.update({k: v for k, v in mine.items() if k not in self._acc})
            if pairs:
                self._acc.update(_add_rows(pairs))

    def add_slots(self, slot_rows: dict[tuple[int, int], list], expert_devices: int) -> None:
        """A final pass's expert-rank counts (``PassResult.slot_rows``) from launches over
        ``expert_devices`` expert ranks (the last ones of each launch's rows): one device
        program per domain, no host sync."""
        self._expert_devices = expert_devices
        for domain in sorted({d for d, _ in slot_rows}):
            parts = {(d, layer, expert_devices): ([self._slot_acc[d, layer, expert_devices]]
                                                  if (d, layer, expert_devices) in self._slot_acc
                                                  else []) + rows
                     for (d, layer), rows in slot_rows.items() if d == domain}
            self._slot_acc.update(_sum_rows(parts))

    def step(self) -> bool:
        """Count a step; at a window boundary read the window back. True at a boundary."""
        self.steps_in_window += 1
        if self.steps_in_window < self.window_size:
            return False
        window = {layer: np.zeros(self.num_experts, np.int64) for layer in self.layers}
        for (_, layer), rows in self._acc.items():
            window[layer] += np.asarray(rows).sum(axis=0)
        self._acc = {}
        n = self._expert_devices
        devices = {layer: np.zeros(n, np.int64) for layer in self.layers} if n else {}
        for (_, layer, k), rows in self._slot_acc.items():
            # counts from before a scale-down of the slice are dropped
            if k == n and layer in devices:
                devices[layer] += np.asarray(rows)[-n:].sum(axis=1)
        self._slot_acc = {}
        self.last_device_window = devices
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
    """One rebalance, prepared on its own thread and applied by ``poll``."""

    counts: dict[int, np.ndarray]  # time slices per layer
    current: dict[int, ExpertMap]  # the maps it starts from
    started: float
    maps: dict[int, ExpertMap] = dataclasses.field(default_factory=dict)  # layers that change
    off: list = dataclasses.field(default_factory=list)  # (service, layer, map arrays)
    on: list = dataclasses.field(default_factory=list)
    weights: list = dataclasses.field(default_factory=list)  # (placed dict, layer, new tree)
    slots: int = 0
    bytes: int = 0
    planned: threading.Event = dataclasses.field(default_factory=threading.Event)
    ready: threading.Event = dataclasses.field(default_factory=threading.Event)
    ready_at: float = 0.0
    off_applied: bool = False
    failed: bool = False


class ExpertRebalancer:
    """Per-layer expert maps of one expert slice and their swaps.

    ``start`` hands a rebalance to a thread that computes the maps, builds the switch-off map
    arrays (then ``planned``), moves the weights and builds the new map arrays (then
    ``ready``); ``poll``, between steps, applies phase 1 once planned and phase 3 once ready,
    so the stepping thread only assigns prepared arrays.

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
        self.last_stall_ms = 0.0  # what the stepping thread spent on the last swap

    def start(self, counts: dict[int, np.ndarray]) -> bool:
        """Hand a rebalance for ``counts`` (``{layer: [T, E]}``) to its thread; False while
        one is under way."""
        if self.pending is not None:
            return False
        self.pending = _Swap(counts, dict(self.maps), time.perf_counter())
        self.last_stall_ms = 0.0
        # Not a daemon: the thread waits inside jaxlib calls, and a daemon thread there when
        # the interpreter finalizes is unwound through C++ frames (SIGABRT at exit). A swap
        # is bounded work, so exit waits for it.
        threading.Thread(target=self._prepare, args=(self.pending,), daemon=False,
                         name="eplb-swap").start()
        return True

    def _prepare(self, swap: _Swap) -> None:
        """On the swap's thread: maps, switch-off arrays, weights (``device_put`` of the
        changed devices' shards), new map arrays, and a wait until all are on device."""
        try:
            for layer, c in swap.counts.items():
                new = rebalance(c, swap.current[layer], self.num_redundant)
                if len(moved_slots(swap.current[layer], new)):
                    swap.maps[layer] = new
                    swap.slots += len(moved_slots(swap.current[layer], new))
            swap.off = [(svc, layer, svc.map_arrays(switch_off_map(swap.current[layer], m)))
                        for layer, m in swap.maps.items() for svc in self.services]
            swap.planned.set()
            for svc, by_layer in self.placed:
                for layer, emap in swap.maps.items():
                    tree, moved = _rewrite(svc, by_layer[layer], swap.current[layer], emap,
                                           self.host_experts[layer])
                    swap.weights.append((by_layer, layer, tree))
                    swap.bytes += moved
            swap.on = [(svc, layer, svc.map_arrays(m))
                       for layer, m in swap.maps.items() for svc in self.services]
            jax.block_until_ready([[t for *_, t in swap.weights], [a for *_, a in swap.on]])
        except Exception:  # the current weights and maps stay
            log.exception("EPLB: preparing the swap failed; keeping the current placement")
            swap.failed = True
        swap.ready_at = time.perf_counter()
        swap.planned.set()
        swap.ready.set()

    def poll(self) -> bool:
        """Between steps, never waiting: phase 1 (map off) once planned, phase 3 (new
        weights and map on) once ready. True when a new placement was switched on."""
        swap = self.pending
        if swap is None or not swap.planned.is_set():
            return False
        began = time.perf_counter()
        try:
            if not swap.off_applied and not swap.failed:
                for svc, layer, arrays in swap.off:
                    svc.set_map_arrays(layer, arrays)
                swap.off_applied = True
            if not swap.ready.is_set():
                return False
            self.pending = None
            if swap.failed:
                for layer in swap.maps if swap.off_applied else ():
                    for svc in self.services:
                        svc.set_map(layer, self.maps[layer])
                return False
            if not swap.maps:
                return False
            for by_layer, layer, tree in swap.weights:
                by_layer[layer] = tree
            for svc, layer, arrays in swap.on:
                svc.set_map_arrays(layer, arrays)
            self.maps.update(swap.maps)
        finally:
            self.last_stall_ms += (time.perf_counter() - began) * 1e3
        self.rebalances += 1
        self.moved_slots += swap.slots
        self.moved_bytes += swap.bytes
        self.last_swap_ms = (swap.ready_at - swap.started) * 1e3
        log.info("EPLB: layers %s rebalanced (%d slots, %.1f MiB, %.1f ms)", sorted(swap.maps),
                 swap.slots, swap.bytes / 2**20, self.last_swap_ms)
        return True

    def scale_down(self, services: list, placed: list[tuple[object, dict]],
                   device: int) -> None:
        """The expert slice lost its device ``device`` (``MAPool.scale_down``): every layer's
        map goes on without its slots, later rebalances place replicas on the devices left
        (as many redundant ones as still fit), and a swap under way is dropped (it was built
        for the old slice; its thread's results are never applied)."""
        self.pending = None
        self.services, self.placed = services, placed
        self.maps = {layer: m.without_device(device) for layer, m in self.maps.items()}
        some = next(iter(self.maps.values()), None)
        if some is not None:
            self.num_redundant = min(self.num_redundant, some.num_slots - some.num_experts)

    def wait(self) -> bool:
        """Phases 1 and 3 after waiting for the thread (tests and benchmarks)."""
        if self.pending is not None:
            self.pending.ready.wait()
        return self.poll()


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
