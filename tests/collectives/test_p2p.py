"""KV transfer through bounded rings, and ppermute helpers, on 8 devices."""

import functools
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from collectives.p2p import KVChannel, KVTransferHub, TransferError, exchange_pairs, shift


def pages_on(device, num_blocks, seed):
    """Two page arrays (k, v) with a block axis first, distinct data per block."""
    rng = np.random.default_rng(seed)
    mk = lambda: jax.device_put(rng.normal(size=(num_blocks, 4, 2, 8)).astype(np.float32),  # noqa: E731
                                device)
    return {"k": mk(), "v": mk()}


def test_blocks_arrive_bit_identical_in_order_through_a_small_ring():
    src_dev, dst_dev = jax.devices()[0], jax.devices()[5]
    src = pages_on(src_dev, 32, 0)
    dst = jax.tree.map(jnp.zeros_like, pages_on(dst_dev, 24, 1))
    ch = KVChannel(dst_dev, num_slots=2, chunk_blocks=3)
    src_blocks, dst_blocks = [5, 9, 1, 30, 2, 7, 8, 11, 12, 3, 4], list(range(11, 0, -1))
    ch.offer(7, src, src_blocks)
    assert ch.ready(7) and ch.push() == 0  # nothing pulled yet: nothing moves
    ch.pull(7, dst_blocks)
    assert ch.push() == 2 and ch.push() == 0  # 4 chunks, ring of 2: backpressure
    assert ch.counters.ring_full >= 1 and ch.in_flight() == 2
    finished = []
    while not finished:
        dst, finished = ch.drain(dst)
        ch.push()
    assert finished == [7] and ch.completed() == [7]
    assert ch.counters.arrival_order == [(7, c) for c in range(4)]
    for name in ("k", "v"):
        got = np.asarray(dst[name])[dst_blocks]
        np.testing.assert_array_equal(got, np.asarray(src[name])[src_blocks])
    untouched = np.setdiff1d(np.arange(24), dst_blocks)
    assert not np.asarray(dst["k"])[untouched].any()
    assert next(iter(dst["k"].devices())) == dst_dev


def test_a_pull_given_up_part_way_is_pulled_again_whole_or_cancelled():
    """After 2 of 4 chunks landed the receiver gives up (``unpull``): the chunk still in the
    ring is dropped, the offer is as before, and a second pull (other blocks, a cached
    prefix skipped) moves every block again; a pull given up on can also be cancelled."""
    src_dev, dst_dev = jax.devices()[0], jax.devices()[3]
    src = pages_on(src_dev, 16, 0)
    dst = jax.tree.map(jnp.zeros_like, pages_on(dst_dev, 24, 1))
    ch = KVChannel(dst_dev, num_slots=3, chunk_blocks=2)
    src_blocks = [3, 4, 5, 6, 7, 8, 9]
    ch.offer(1, src, src_blocks)
    ch.pull(1, [10, 11, 12, 13, 14, 15, 16])
    ch.push()
    dst, _ = ch.drain(dst, max_chunks=2)
    assert ch.in_flight() == 1
    ch.unpull(1)
    assert ch.in_flight() == 0 and ch.ready(1) and ch.completed() == [] and ch.arrived() == []
    with pytest.raises(TransferError, match="not being pulled"):
        ch.unpull(1)
    ch.pull(1, [20, 21, 22, 23, 0, 1], skip=1)
    finished = []
    while not finished:
        ch.push()
        dst, finished = ch.drain(dst)
    assert finished == [1] and ch.completed() == [1]
    for name in ("k", "v"):
        np.testing.assert_array_equal(np.asarray(dst[name])[[20, 21, 22, 23, 0, 1]],
                                      np.asarray(src[name])[src_blocks[1:]])
    ch.offer(2, src, [1, 2, 3])
    ch.pull(2, [5, 6, 7])
    ch.push()
    ch.drain(dst, max_chunks=1)
    ch.unpull(2)
    assert ch.cancel(2) and ch.completed() == [2] and ch.in_flight() == 0


def test_protocol_errors_are_named():
    ch = KVChannel(jax.devices()[1], num_slots=1, chunk_blocks=2)
    with pytest.raises(TransferError, match="not offered"):
        ch.pull(1, [0])
    ch.offer(1, pages_on(jax.devices()[0], 4, 0), [0, 1])
    with pytest.raises(TransferError, match="twice"):
        ch.offer(1, {}, [0])
    with pytest.raises(TransferError, match="destination blocks"):
        ch.pull(1, [0])


def test_concurrent_pairs_with_sender_and_receiver_threads():
    devs = jax.devices()
    hub = KVTransferHub(num_slots=2, chunk_blocks=2)
    prefill = {p: pages_on(devs[p], 16, p) for p in (0, 1)}
    decode = {d: jax.tree.map(jnp.zeros_like, pages_on(devs[d], 40, d)) for d in (4, 6)}
    plan = {}  # (p, d) -> list of (event, src_blocks, dst_blocks)
    rng = np.random.default_rng(0)
    free = {4: list(range(40)), 6: list(range(40))}
    event = 0
    for p in (0, 1):
        for d in (4, 6):
            jobs = []
            for _ in range(2):
                n = int(rng.integers(3, 8))
                src = rng.choice(16, n, replace=False)
                dst = [free[d].pop() for _ in range(n)]
                jobs.append((event, src, dst))
                event += 1
            plan[(p, d)] = jobs
    chans = {pd: hub.channel(*pd, devs[pd[1]]) for pd in plan}
    for pd, jobs in plan.items():
        for ev, src, dst in jobs:
            chans[pd].offer(ev, prefill[pd[0]], src)
            chans[pd].pull(ev, dst)
    errors = []

    def sender(pd):
        try:
            chans[pd].push(block=True, timeout=60)
        except Exception as e:  # pragma: no cover - surfaced below
            errors.append(e)

    def receiver(d):
        try:
            want = {ev for pd, jobs in plan.items() if pd[1] == d for ev, _, _ in jobs}
            got = set()
            while got != want:
                for pd in plan:
                    if pd[1] == d:
                        decode[d], done = chans[pd].drain(decode[d])
                        got |= set(done)
        except Exception as e:  # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=sender, args=(pd,)) for pd in plan]
    threads += [threading.Thread(target=receiver, args=(d,)) for d in decode]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    for (p, d), jobs in plan.items():
        for _, src, dst in jobs:
            np.testing.assert_array_equal(np.asarray(decode[d]["v"])[dst],
                                          np.asarray(prefill[p]["v"])[src])
        order = chans[(p, d)].counters.arrival_order
        assert order == sorted(order)  # events and chunks in order per pair
    assert sum(c.counters.ring_full for c in chans.values()) > 0
    assert hub.stats.summary()["kv_send"]["calls"] == sum(
        c.counters.chunks_sent for c in chans.values())


def test_shift_and_pair_exchange_match_numpy():
    mesh = Mesh(np.array(jax.devices()), ("x",))
    x = jnp.arange(8 * 3, dtype=jnp.float32).reshape(8, 3)
    run = lambda f: jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("x"), out_specs=P("x")))  # noqa: E731
    sharded = jax.device_put(x, NamedSharding(mesh, P("x")))
    np.testing.assert_array_equal(run(functools.partial(shift, axis="x", offset=3))(sharded),
                                  np.roll(np.asarray(x), 3, axis=0))
    swapped = np.asarray(x).reshape(4, 2, 3)[:, ::-1].reshape(8, 3)
    np.testing.assert_array_equal(run(functools.partial(exchange_pairs, axis="x"))(sharded),
                                  swapped)
