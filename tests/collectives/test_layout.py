"""Property tests of the dispatch layout: every assignment gets exactly one row."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from collectives.expert_map import build_expert_map
from collectives.layout import received_slots, rounds_needed, route, send_index

# Fixed array shapes (T = 6 tokens, K = 2, expert map padded to 8 x 8) keep the number of
# compiled programs small; the values cover every layout case.
T, K, PAD = 6, 2, 8
_route_jit = jax.jit(route, static_argnames=("num_devices", "slots_per_device"))
_send_index = jax.jit(send_index, static_argnums=(1,))
_received_slots = jax.jit(received_slots, static_argnums=(1,))


@st.composite
def problems(draw):
    n = draw(st.integers(1, 4))
    s = draw(st.integers(1, 2))
    num_experts = draw(st.integers(1, n * s))
    ids = draw(st.lists(st.lists(st.integers(-1, num_experts - 1), min_size=K, max_size=K),
                        min_size=T, max_size=T))
    rank = draw(st.integers(0, n - 1))
    cap = draw(st.sampled_from([1, 2, 5, T * K]))
    return n, s, num_experts, np.array(ids, np.int32), rank, cap


def _route(n, s, num_experts, ids, rank):
    emap = build_expert_map(num_experts, n, s)
    table, counts = emap.replica_table(), emap.replica_counts()
    rep = np.zeros((PAD, PAD), np.int32)
    rep[: table.shape[0], : table.shape[1]] = table
    nrep = np.ones(PAD, np.int32)
    nrep[: len(counts)] = counts
    return emap, rank, _route_jit(jnp.asarray(ids), jnp.int32(rank), jnp.asarray(rep),
                                 jnp.asarray(nrep), num_devices=n, slots_per_device=s)


@settings(max_examples=40, deadline=None)
@given(problems())
def test_rows_are_a_dense_numbering_per_destination(p):
    n, s, num_experts, ids, rank, _ = p
    emap, pos, r = _route(n, s, num_experts, ids, rank)
    dest, row, counts = (np.asarray(a) for a in r)
    valid = ids.reshape(-1) >= 0
    assert np.all(dest[~valid] == n) and np.all(row[~valid] == -1)
    for d in range(n):
        rows = np.sort(row[dest == d])
        np.testing.assert_array_equal(rows, np.arange(counts[d].sum()))
    assert counts.sum() == valid.sum()


@settings(max_examples=40, deadline=None)
@given(problems())
def test_slot_is_the_rotated_replica_and_rows_are_slot_ordered(p):
    n, s, num_experts, ids, rank, _ = p
    emap, _, r = _route(n, s, num_experts, ids, rank)
    dest, row, counts = (np.asarray(a) for a in r)
    table, nrep = emap.replica_table(), emap.replica_counts()
    seen = np.zeros(num_experts, int)  # the rank's earlier assignments of each expert
    for a in range(T * K):
        e = ids.reshape(-1)[a]
        if e < 0:
            continue
        slot = table[e, (seen[e] + rank + e) % nrep[e]]
        seen[e] += 1
        assert emap.slot_expert_P[slot] == e
        assert dest[a] == slot // s
        # the row lies in its slot's block of the destination stream
        start = counts[dest[a], : slot % s].sum()
        assert start <= row[a] < start + counts[dest[a], slot % s]
    # a rank splits each expert's tokens over its replicas evenly (within one)
    per_slot = counts.reshape(-1)
    for e in range(num_experts):
        shares = per_slot[np.flatnonzero(emap.slot_expert_P == e)]
        assert shares.max() - shares.min() <= 1


@settings(max_examples=40, deadline=None)
@given(problems())
def test_rounds_cover_every_row_once_and_receiver_finds_its_slot(p):
    n, s, num_experts, ids, rank, cap = p
    _, _, r = _route(n, s, num_experts, ids, rank)
    counts = np.asarray(r.counts_NS)
    rounds = int(np.ceil(counts.sum(1).max() / cap))
    assert rounds == int(rounds_needed(r.counts_NS, cap))
    seen = []
    for rnd in range(max(rounds, 1)):
        dest, c = (np.asarray(a) for a in _send_index(r, cap, rnd))
        sent = np.flatnonzero(c < cap)
        seen += list(sent)
        coords = set(zip(dest[sent], c[sent], strict=True))
        assert len(coords) == len(sent)  # no two rows share a buffer cell
        # a receiver seeing this rank's counts recovers the slot of each row
        recv_counts = np.zeros((n, s), np.int32)
        recv_counts[0] = counts[0]
        slot_nc = np.asarray(_received_slots(jnp.asarray(recv_counts), cap, rnd))
        for a in sent:
            if dest[a] == 0:
                q = rnd * cap + c[a]
                assert slot_nc[0, c[a]] == np.searchsorted(np.cumsum(counts[0]), q, "right")
    assert sorted(seen) == sorted(np.flatnonzero(ids.reshape(-1) >= 0))
