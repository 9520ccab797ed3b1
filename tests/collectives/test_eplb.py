"""EPLB's algorithm on hand-worked examples (selection over time slices, sorted least-loaded
placement, the swap's maps), and a property test: any map with at least one replica per
expert gives the dense MoE's output through the dispatch (8 devices)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh

from collectives.ep_moe import EpMoe
from collectives.eplb import (
    device_loads,
    hottest_load,
    max_over_mean,
    max_replicas,
    moved_slots,
    place_replicas,
    rebalance,
    select_replicas,
    switch_off_map,
)
from collectives.expert_map import ExpertMap, ExpertMapError, build_expert_map
from tests.collectives.cases import make_experts, make_routing, need_devices
from xds_jax.model.moe import moe_dense_reference


def test_hottest_load_sums_each_slices_peak():
    counts = np.array([[10, 2, 1, 1], [3, 9, 1, 1]])
    assert hottest_load(counts, np.ones(4)) == 19  # 10 + 9
    assert hottest_load(counts, np.array([2, 1, 1, 1])) == 14  # max(5, 2) + 9


def test_selection_lowers_the_peak_of_every_slice_not_the_total():
    # Expert 2 has the largest total (10) but is never a slice's hottest; splitting expert 0
    # lowers L from 6 + 6 = 12 to max(3, 5) + 6 = 11 (expert 1 ties: 6 + 5; the lower id).
    counts = np.array([[6, 0, 5], [0, 6, 5]])
    assert select_replicas(counts, 1).tolist() == [2, 1, 1]
    # Second round: candidates are expert 2 (slice 0's hottest at 5) and expert 1 (slice 1):
    # splitting 2 gives max(3, 2.5) + 6 = 9, splitting 1 gives 5 + 5 = 10.
    assert select_replicas(counts, 2).tolist() == [2, 1, 2]


def test_selection_two_slices_two_hot_experts():
    # L = 19; e0 x2 -> 5 + 9 = 14, e1 x2 -> 10 + 4.5 = 14.5: e0. Then e0 x3 -> 3.3 + 9,
    # e1 x2 -> 5 + 4.5 = 9.5: e1.
    counts = np.array([[10, 2, 1, 1], [3, 9, 1, 1]])
    assert select_replicas(counts, 2).tolist() == [2, 2, 1, 1]


def test_selection_respects_the_per_expert_cap():
    counts = np.array([[100, 1, 1]])
    assert select_replicas(counts, 2, max_per_expert=2).tolist() == [2, 2, 1]


def test_placement_sorted_least_loaded_device_with_a_free_slot():
    # Replicas carry 6, 6 (e0 split), 6 (e1), 4 (e2), 2 (e3) onto 3 devices x 2 slots:
    # d0 <- e0 (6), d1 <- e0 (not d0: it holds e0), d2 <- e1, d0 <- e2 (tie, lowest),
    # d1 <- e3: device loads 10, 8, 6.
    table = place_replicas(np.array([12, 6, 4, 2]), np.array([2, 1, 1, 1]), 3, 2)
    assert table.tolist() == [0, 2, 0, 3, 1, -1]
    # An expert already on its device keeps its slot there.
    kept = place_replicas(np.array([12, 6, 4, 2]), np.array([2, 1, 1, 1]), 3, 2,
                          previous_P=np.array([2, 0, 1, 3, 1, 0]))
    assert kept.tolist() == [2, 0, 0, 3, 1, -1]
    with pytest.raises(ExpertMapError, match="do not fit"):
        place_replicas(np.ones(4), np.array([2, 2, 2, 1]), 3, 2)


def test_rebalance_of_a_skewed_layer_balances_devices():
    current = build_expert_map(8, 4, 3)  # 12 slots: 8 experts + 4 replicas of 0..3
    counts = np.array([[40, 1, 1, 1, 1, 1, 1, 1], [30, 10, 1, 1, 1, 1, 1, 1]])
    new = rebalance(counts, current, num_redundant=4)
    assert new.replica_counts().tolist()[0] == 4  # one per device: 70 / 4 each
    assert new.num_redundant == 4
    load = counts.sum(0)
    assert max_over_mean(device_loads(new, load)) < max_over_mean(device_loads(current, load))
    with pytest.raises(ExpertMapError, match="do not fit"):
        rebalance(counts, current, num_redundant=5)


def test_fewer_redundant_replicas_leave_slots_empty():
    new = rebalance(np.array([[9, 1, 1, 1]]), build_expert_map(4, 2, 3), num_redundant=1)
    assert new.num_redundant == 1 and int(np.sum(new.slot_expert_P < 0)) == 1


def test_device_loads_split_an_expert_over_its_replicas():
    emap = ExpertMap(np.array([0, 1, 2, 0], np.int32), 2, 2, 3)
    loads = device_loads(emap, np.array([8, 2, 4]))
    assert loads.tolist() == [6.0, 8.0]  # 4 + 2, 4 + 4
    assert max_over_mean(loads) == pytest.approx(8 / 7)
    assert max_replicas(3, 2, 2) == 2 and max_replicas(256, 96, 3) == 33


def test_switch_off_map_drops_moving_slots_but_keeps_every_expert():
    old = ExpertMap(np.array([0, 1, 2, 3, 0, 1], np.int32), 3, 2, 4)
    new = ExpertMap(np.array([0, 1, 2, 3, 2, 3], np.int32), 3, 2, 4)
    assert moved_slots(old, new).tolist() == [4, 5]
    assert switch_off_map(old, new).slot_expert_P.tolist() == [0, 1, 2, 3, -1, -1]
    swapped = ExpertMap(np.array([1, 0, 2, 3], np.int32), 2, 2, 4)
    off = switch_off_map(ExpertMap(np.array([0, 1, 2, 3], np.int32), 2, 2, 4), swapped)
    assert off.slot_expert_P.tolist() == [0, 1, 2, 3]  # nothing else serves experts 0 and 1


@st.composite
def maps(draw):
    """A random slot table over 8 devices with >= 1 replica of each of E experts."""
    e = draw(st.integers(4, 12))
    s = draw(st.integers(max(1, -(-e // 8)), 3))
    extra = draw(st.lists(st.integers(-1, e - 1), min_size=8 * s - e, max_size=8 * s - e))
    order = draw(st.permutations(list(range(e)) + extra))
    return ExpertMap(np.array(order, np.int32), 8, s, e), draw(st.integers(0, 99))


@settings(max_examples=12, deadline=None)
@given(maps())
def test_any_map_with_every_expert_gives_the_dense_output(case):
    need_devices(8)
    emap, seed = case
    rng = np.random.default_rng(seed)
    w = make_experts(rng, emap.num_experts, 16, 8)
    x = jnp.asarray(rng.normal(size=(8 * 4, 16)).astype(np.float32))
    ids, gates = make_routing(rng, 8 * 4, emap.num_experts, 2)
    moe = EpMoe(Mesh(np.array(jax.devices()), ("ep",)), build_expert_map(
        emap.num_experts, 8, emap.slots_per_device), capacity=8,
        replica_width=1 + emap.num_slots - emap.num_experts)
    phys = jax.tree.map(moe.shard, emap.physical_weights(w))
    out = moe(phys, moe.shard(x), moe.shard(ids), moe.shard(gates), expert_map=emap)
    ref = moe_dense_reference(w, x, ids, gates)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)
