"""Expert-parallel load balancing (xDeepServe §4.5): which experts get the redundant slots,
where every replica goes, and the maps of a swap. Pure numpy, no JAX.

Inputs are token counts per time slice and logical expert, ``counts_TE`` (T slices, E
experts: tokens routed to the expert in the slice, summed over every rank of one MoE layer).

1. **Selection** (``select_replicas``): with a budget of R extra replicas, greedily add the
   replica that most lowers the summed load of the hottest expert over the time slices,
   ``L = sum_t max_e counts[t, e] / replicas[e]``; candidates are the experts that are the
   hottest of some slice under the current split.
2. **Placement** (``place_replicas``): every replica carries ``load[e] / replicas[e]`` (load
   summed over the slices); sorted by that, heaviest first, each goes to the least-loaded
   device that still has a free slot (and does not hold the expert yet, when one can). Within
   a device a replica keeps the slot its expert already had there, so a swap moves only what
   changed.
3. **Swap** (``switch_off_map``, ``moved_slots``): the map used while weights move leaves out
   the slots being rewritten (an expert whose every slot moves keeps its old one).

Shape legend: T time slices, E logical experts, P physical slots (= N devices x S slots).
"""

from __future__ import annotations

import numpy as np

from collectives.expert_map import ExpertMap, ExpertMapError


def max_replicas(num_experts: int, num_devices: int, slots_per_device: int) -> int:
    """Most replicas one expert can get: one per device, and no more than the spare slots
    allow."""
    return max(1, min(num_devices, 1 + num_devices * slots_per_device - num_experts))


def hottest_load(counts_TE: np.ndarray, replicas_E: np.ndarray) -> float:
    """``sum_t max_e counts[t, e] / replicas[e]``: the paper's per-layer load ``L``."""
    return float(np.sum(np.max(counts_TE / replicas_E, axis=1)))


def select_replicas(counts_TE: np.ndarray, budget: int, *, max_per_expert: int | None = None,
                    ) -> np.ndarray:
    """``[E]`` replica counts (>= 1) after greedily spending ``budget`` extra replicas.

    Each round tries one more replica for every expert that is the hottest of some slice
    (under the current split; among experts below ``max_per_expert``) and keeps the one
    with the lowest ``hottest_load`` (ties: the larger total load, then the lower id).
    """
    counts_TE = np.atleast_2d(np.asarray(counts_TE, dtype=np.float64))
    e = counts_TE.shape[1]
    cap = max_per_expert if max_per_expert is not None else budget + 1
    replicas_E = np.ones(e, dtype=np.int64)
    total_E = counts_TE.sum(axis=0)
    for _ in range(budget):
        open_E = replicas_E < cap
        if not open_E.any():
            break
        split_TE = np.where(open_E, counts_TE / replicas_E, -1.0)
        candidates = np.unique(np.argmax(split_TE, axis=1))
        best, best_key = None, None
        for c in candidates:
            trial = replicas_E.copy()
            trial[c] += 1
            key = (hottest_load(counts_TE, trial), -total_E[c], c)
            if best_key is None or key < best_key:
                best, best_key = c, key
        replicas_E[best] += 1
    return replicas_E


def place_replicas(load_E: np.ndarray, replicas_E: np.ndarray, num_devices: int,
                   slots_per_device: int, previous_P: np.ndarray | None = None,
                   keep_within: float = 0.0) -> np.ndarray:
    """``[P]`` slot table: sorted least-loaded placement of every replica.

    Args:
      load_E: tokens per expert (summed over the slices).
      replicas_E: replicas per expert (``select_replicas``); their sum must fit in P.
      previous_P: the current slot table; a replica placed on a device that already held
        its expert in some slot keeps that slot.
      keep_within: a replica goes back to a device that held its expert before when that
        device's load is within ``keep_within`` x the mean device load of the least-loaded
        one (fewer weights to move for a slightly less even placement; 0: strict).
    Returns:
      slot -> logical expert, -1 for a slot left empty.
    """
    load_E = np.asarray(load_E, dtype=np.float64)
    replicas_E = np.asarray(replicas_E, dtype=np.int64)
    n, s = num_devices, slots_per_device
    if replicas_E.min() < 1 or replicas_E.sum() > n * s:
        raise ExpertMapError(f"{int(replicas_E.sum())} replicas do not fit {n} x {s} slots "
                             "(or an expert has none)")
    units = [(load_E[e] / replicas_E[e], e) for e in range(len(load_E))
             for _ in range(replicas_E[e])]
    units.sort(key=lambda u: (-u[0], u[1]))  # heaviest first, stable by expert id
    device_load = np.zeros(n)
    free = np.full(n, s)
    held: list[list[int]] = [[] for _ in range(n)]
    has_NE = np.zeros((n, len(load_E)), bool)  # device d already holds expert e
    before_NE = np.zeros_like(has_NE)  # device d held expert e in ``previous_P``
    if previous_P is not None:
        slots_P = np.flatnonzero(previous_P >= 0)
        before_NE[slots_P // s, previous_P[slots_P]] = True
    slack = keep_within * load_E.sum() / n
    for share, e in units:
        fits = free > 0
        fresh = fits & ~has_NE[:, e]
        pool = np.flatnonzero(fresh if fresh.any() else fits)
        d = int(pool[np.argmin(device_load[pool])])
        if slack > 0:
            home = pool[before_NE[pool, e] & (device_load[pool] <= device_load[d] + slack)]
            if len(home):
                d = int(home[np.argmin(device_load[home])])
        held[d].append(e)
        has_NE[d, e] = True
        device_load[d] += share
        free[d] -= 1
    return _assign_slots(held, s, previous_P)


def _assign_slots(held: list[list[int]], s: int, previous_P: np.ndarray | None) -> np.ndarray:
    """Slot table from each device's experts: keep an expert's old slot on its device."""
    out = np.full(len(held) * s, -1, dtype=np.int32)
    for d, experts in enumerate(held):
        old = (previous_P[d * s:(d + 1) * s].tolist() if previous_P is not None
               else [-1] * s)
        taken = [False] * s
        rest = []
        for e in experts:
            keep = next((j for j in range(s) if old[j] == e and not taken[j]), None)
            if keep is None:
                rest.append(e)
            else:
                taken[keep] = True
                out[d * s + keep] = e
        free = [j for j in range(s) if not taken[j]]
        for e, j in zip(rest, free, strict=False):
            out[d * s + j] = e
    return out


def rebalance(counts_TE: np.ndarray, current: ExpertMap, num_redundant: int,
              keep_within: float = 0.05) -> ExpertMap:
    """The balanced map of one layer for ``counts_TE``: ``num_redundant`` replicas chosen by
    ``select_replicas``, every replica placed by ``place_replicas`` (keeping slots, and
    devices within ``keep_within`` of the least loaded)."""
    counts_TE = np.atleast_2d(np.asarray(counts_TE, dtype=np.float64))
    n, s, e = current.num_devices, current.slots_per_device, current.num_experts
    if counts_TE.shape[1] != e:
        raise ExpertMapError(f"load has {counts_TE.shape[1]} experts, the map {e}")
    if e + num_redundant > n * s:
        raise ExpertMapError(f"{num_redundant} redundant replicas do not fit: {n * s} slots "
                             f"hold {e} experts and {n * s - e} spare")
    replicas_E = select_replicas(counts_TE, num_redundant,
                                 max_per_expert=max_replicas(e, n, s))
    table = place_replicas(counts_TE.sum(axis=0), replicas_E, n, s, current.slot_expert_P,
                           keep_within)
    return ExpertMap(table, n, s, e)


def device_loads(emap: ExpertMap, load_E: np.ndarray) -> np.ndarray:
    """``[N]`` tokens each device serves when an expert's tokens split evenly over its
    replicas (what the per-rank rotation over replicas does, up to one token per rank)."""
    load_E = np.asarray(load_E, dtype=np.float64)
    reps_E = np.maximum(emap.replica_counts(), 1)
    table = emap.slot_expert_P
    per_slot = np.where(table >= 0, load_E[np.maximum(table, 0)] / reps_E[np.maximum(table, 0)],
                        0.0)
    return per_slot.reshape(emap.num_devices, emap.slots_per_device).sum(axis=1)


def max_over_mean(x: np.ndarray) -> float:
    """Imbalance: the largest entry over the mean (1.0 is perfectly even)."""
    x = np.asarray(x, dtype=np.float64)
    mean = x.mean()
    return float(x.max() / mean) if mean > 0 else 1.0


def moved_slots(old: ExpertMap, new: ExpertMap) -> np.ndarray:
    """Slots whose expert changes (their weights must be rewritten)."""
    return np.flatnonzero(old.slot_expert_P != new.slot_expert_P)


def switch_off_map(old: ExpertMap, new: ExpertMap) -> ExpertMap:
    """The old map without the slots that ``new`` rewrites, used while their weights move;
    an expert whose every slot is rewritten keeps its first old slot (its old weights stay
    readable until the new map is switched on)."""
    table = old.slot_expert_P.copy()
    moving = old.slot_expert_P != new.slot_expert_P
    table[moving] = -1
    for e in range(old.num_experts):
        if not np.any(table == e):
            first = int(np.flatnonzero(old.slot_expert_P == e)[0])
            table[first] = e
    return ExpertMap(table, old.num_devices, old.slots_per_device, old.num_experts)
