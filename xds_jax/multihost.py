"""Arrays across ``jax.distributed`` processes: host data in, host data out, slice to slice.

In one process these are ``jax.device_put`` and ``jax.device_get``. With several processes
(multi-controller JAX) a group's devices may lie on another process, or span several, and every
process runs the same calls in the same order (``serving.distributed``), so:

- ``place`` builds a global array from a host value that is identical on every process
  (``jax.make_array_from_callback``: each process fills only its own shards, none for a slice
  it holds no device of);
- ``fetch`` brings arrays to host memory on *every* process, identical everywhere, through one
  JAX collective over one device per process (each process contributes the shards it holds;
  each byte comes from the first process that holds it), so host decisions that follow (sampled
  tokens, overflow flags) agree across processes;
- ``move`` takes arrays from one slice to another (KV pages from prefill to decode), device to
  device: when the two slices lie on different processes, one ``shard_map`` program over
  the union of the source and destination devices ``ppermute``s each destination device its
  shard (``_copy_across``); the bytes never pass through host memory.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding


def multi_process() -> bool:
    """True when this program runs as several ``jax.distributed`` processes."""
    return jax.process_count() > 1


def _sharding(target) -> jax.sharding.Sharding:
    return SingleDeviceSharding(target) if isinstance(target, jax.Device) else target


def is_local(target) -> bool:
    """Whether this process holds every device of ``target`` (a device or a sharding)."""
    return _sharding(target).is_fully_addressable


def place(x, target) -> jax.Array:
    """A host value (the same on every process) as a global array on ``target`` (a device or a
    sharding)."""
    if not multi_process():
        return jax.device_put(x, target)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, _sharding(target), lambda idx: host[idx],
                                        dtype=host.dtype)


def place_tree(tree, targets):
    """``place`` over a pytree; ``targets`` one device/sharding, or a matching tree of them."""
    if isinstance(targets, jax.Device | jax.sharding.Sharding):
        return jax.tree.map(lambda a: place(a, targets), tree)
    return jax.tree.map(place, tree, targets)


def zeros(shape: tuple, dtype, target) -> jax.Array:
    """A zero array on ``target``, made by a program on its devices (every process runs it).

    Not from host zeros: on CPU ``device_put`` may alias an aligned numpy buffer, which XLA
    cannot donate, so a KV pool made that way would be copied by every step instead of
    updated in place."""
    return zeros_tree(jax.ShapeDtypeStruct(tuple(shape), dtype), target)


def zeros_tree(shapes, targets):
    """Zero arrays shaped like ``shapes`` (``jax.ShapeDtypeStruct`` leaves) on ``targets`` (one
    device/sharding, or a matching tree), made by one program per set of devices (a KV pool
    of 60 layer arrays compiled 60 programs when each leaf had its own: most of a PD engine's
    start-up)."""
    leaves, treedef = jax.tree.flatten(shapes)
    if isinstance(targets, jax.Device | jax.sharding.Sharding):
        shardings = [_sharding(targets)] * len(leaves)
    else:
        shardings = [_sharding(t) for t in treedef.flatten_up_to(targets)]
    groups: dict[tuple, list[int]] = {}
    for i, sh in enumerate(shardings):
        groups.setdefault(tuple(sorted(d.id for d in sh.device_set)), []).append(i)
    out = [None] * len(leaves)
    for idx in groups.values():
        made = _zeros_program(tuple((tuple(leaves[i].shape), jnp.dtype(leaves[i].dtype))
                                    for i in idx), tuple(shardings[i] for i in idx))()
        for i, a in zip(idx, made, strict=True):
            out[i] = a
    return treedef.unflatten(out)


@functools.lru_cache(maxsize=64)
def _zeros_program(specs: tuple, shardings: tuple):
    """A compiled program making zero arrays of ``specs`` ((shape, dtype) pairs) laid out as
    ``shardings`` (all over one set of devices), kept for the next runner of the same shape."""
    return jax.jit(lambda: tuple(jnp.zeros(shape, dtype) for shape, dtype in specs),
                   out_shardings=shardings)


def host_get(tree):
    """``jax.device_get`` in one process, without its asynchronous host copies where they buy
    nothing: for one array, or arrays on CPU, it reads each directly. Started on a CPU array
    still being computed, ``copy_to_host_async`` cost ~0.3 ms of the host thread's CPU, 3-4x
    the read itself; on an accelerator several arrays' copies still overlap."""
    leaves = jax.tree.leaves(tree)
    arrays = [a for a in leaves if isinstance(a, jax.Array)]
    if len(arrays) > 1 and any(_off_cpu(a) for a in arrays):
        return jax.device_get(tree)
    return jax.tree.map(lambda a: np.asarray(a) if isinstance(a, jax.Array) else a, tree)


def _off_cpu(a: jax.Array) -> bool:
    return any(d.platform != "cpu" for d in a.sharding.device_set)


def fetch(tree):
    """The arrays of ``tree`` as numpy, identical on every process (``jax.device_get`` in one
    process, as ``host_get`` reads it). Every process must call it at the same point: with
    several it is a collective."""
    if not multi_process():
        return host_get(tree)
    leaves, treedef = jax.tree.flatten(tree)
    arrays = [i for i, a in enumerate(leaves) if isinstance(a, jax.Array)]
    if not arrays:
        return tree
    bufs, masks = [], []
    for i in arrays:
        a = leaves[i]
        buf = np.zeros(a.shape, a.dtype)
        have = np.zeros(a.shape, np.uint8)
        for shard in a.addressable_shards:
            buf[shard.index] = np.asarray(shard.data)
            have[shard.index] = 1
        bufs.append(buf.reshape(-1).view(np.uint8))
        masks.append(np.repeat(have.reshape(-1), buf.dtype.itemsize))
    merged = _gather_first(np.concatenate(bufs), np.concatenate(masks))
    out, start = list(leaves), 0
    for i in arrays:
        a = leaves[i]
        size = math.prod(a.shape) * np.dtype(a.dtype).itemsize
        out[i] = merged[start:start + size].view(a.dtype).reshape(a.shape).copy()
        start += size
    return jax.tree.unflatten(treedef, out)


def move(tree, target):
    """Arrays of ``tree`` onto ``target`` (device or sharding), across processes if need be,
    device to device. Every process must call it at the same point when several run."""
    if not multi_process():
        return jax.device_put(tree, target)
    dst = _sharding(target)
    return jax.tree.map(lambda a: _move_one(a, dst), tree)


def _move_one(a: jax.Array, dst: jax.sharding.Sharding) -> jax.Array:
    if not a.ndim:  # a scalar: through the host (fetch is a collective of every process)
        return place(fetch(a), dst)
    me = jax.process_index()
    owners = {d.process_index for d in a.sharding.device_set | dst.device_set}
    if owners == {me}:
        return jax.device_put(a, dst)
    if me not in owners:  # nothing of it here: no shard to make
        return _no_shards(a, dst)
    return _copy_across(a, dst)


def _no_shards(a: jax.Array, dst: jax.sharding.Sharding) -> jax.Array:
    return jax.make_array_from_single_device_arrays(a.shape, dst, [], dtype=a.dtype)


# -- device to device across processes (move) -------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CopyPlan:
    """Who sends which destination shard to whom: destination device ``j`` receives its
    shard from ``sources[j]`` (itself when it holds the source; else a source device on its
    own process if there is one) in round ``rounds[j]`` (a source serves one destination per
    round: each round is one ``ppermute``)."""

    union: tuple  # source devices that send, then destination devices not among them
    destinations: tuple
    sources: tuple
    rounds: tuple
    starts: tuple  # per destination, where its shard starts in the array

    @classmethod
    def of(cls, shape: tuple, src: jax.sharding.Sharding, dst: jax.sharding.Sharding):
        holders = sorted(src.device_set, key=lambda d: d.id)
        index = dst.devices_indices_map(shape)
        destinations = tuple(sorted(dst.device_set, key=lambda d: d.id))
        sources, rounds, served = [], [], {}
        for j, d in enumerate(destinations):
            near = [h for h in holders if h.process_index == d.process_index] or holders
            s = d if d in src.device_set else near[j % len(near)]
            sources.append(s)
            rounds.append(served.get(s, 0))
            served[s] = rounds[-1] + 1
        senders = sorted(set(sources), key=lambda d: d.id)
        union = tuple(senders + [d for d in destinations if d not in senders])
        starts = tuple(tuple(sl.indices(n)[0] for sl, n in zip(index[d], shape, strict=True))
                       for d in destinations)
        return cls(union, destinations, tuple(sources), tuple(rounds), starts)

    def pairs(self, r: int) -> tuple:
        """``(sender, receiver)`` union ranks of round ``r``."""
        rank = {d: i for i, d in enumerate(self.union)}
        return tuple((rank[s], rank[d]) for s, d, k in
                     zip(self.sources, self.destinations, self.rounds, strict=True) if k == r)


def _copy_across(a: jax.Array, dst: jax.sharding.Sharding) -> jax.Array:
    """``a`` on ``dst`` by one ppermute program over the devices of both (``CopyPlan``); the
    source is first replicated over its own devices (a no-op for a replicated one)."""
    if not a.sharding.is_fully_replicated:
        mesh = Mesh(np.array(sorted(a.sharding.device_set, key=lambda d: d.id)), ("src",))
        a = jax.jit(lambda x: x, out_shardings=NamedSharding(mesh, PartitionSpec()))(a)
    plan = CopyPlan.of(a.shape, a.sharding, dst)
    me = jax.process_index()
    if all(d.process_index != me for d in plan.union):  # a source holder that sends nothing
        return _no_shards(a, dst)
    have = {s.device: s.data for s in a.addressable_shards}
    full = [have[d] if d in have else _placeholder(a.shape, np.dtype(a.dtype), d)
            for d in plan.union if d.process_index == me]
    union = Mesh(np.array(plan.union), ("u",))
    rows = NamedSharding(union, PartitionSpec("u"))
    n = len(plan.union)
    x = jax.make_array_from_single_device_arrays((n * a.shape[0],) + a.shape[1:], rows, full,
                                                 dtype=a.dtype)
    out = _copy_program(plan, union, dst.shard_shape(a.shape))(x)
    by_device = {s.device: s.data for s in out.addressable_shards}
    mine = [by_device[d] for d in plan.destinations if d.process_index == me]
    return jax.make_array_from_single_device_arrays(a.shape, dst, mine, dtype=a.dtype)


@functools.cache
def _placeholder(shape: tuple, dtype: np.dtype, device) -> jax.Array:
    """What a destination-only device feeds the copy program (never read; cached)."""
    return jax.device_put(np.zeros(shape, dtype), device)


@functools.cache
def _copy_program(plan: CopyPlan, union: Mesh, shard_shape: tuple):
    """Per union rank: each round, slice the destination shard a receiver needs out of the
    full value (senders) and ``ppermute`` it; receivers keep their round's arrival."""
    rank = {d: i for i, d in enumerate(plan.union)}
    num_rounds = max(plan.rounds) + 1
    starts_RUD = np.zeros((num_rounds, len(plan.union), len(shard_shape)), np.int32)
    receives_RU = np.zeros((num_rounds, len(plan.union)), bool)
    for s, d, r, start in zip(plan.sources, plan.destinations, plan.rounds, plan.starts,
                              strict=True):
        starts_RUD[r, rank[s]] = start
        receives_RU[r, rank[d]] = True

    def copy(full):
        i = jax.lax.axis_index("u")
        out = jnp.zeros(shard_shape, full.dtype)
        for r in range(num_rounds):
            send = jax.lax.dynamic_slice(full, tuple(jnp.asarray(starts_RUD)[r, i]), shard_shape)
            got = jax.lax.ppermute(send, "u", plan.pairs(r))
            out = jnp.where(jnp.asarray(receives_RU)[r, i], got, out)
        return out

    spec = PartitionSpec("u")
    return jax.jit(jax.shard_map(copy, mesh=union, in_specs=spec, out_specs=spec))


# -- the collective behind fetch --------------------------------------------------------------
@functools.cache
def _process_mesh() -> Mesh:
    """One device per process, in process order."""
    firsts = [min((d for d in jax.devices() if d.process_index == p), key=lambda d: d.id)
              for p in range(jax.process_count())]
    return Mesh(np.array(firsts), ("process",))


@functools.cache
def _pick_first():
    mesh = _process_mesh()

    def pick(bytes_PL, have_PL):
        first_L = jnp.argmax(have_PL, axis=0)
        return jnp.take_along_axis(bytes_PL, first_L[None], axis=0)[0]

    return jax.jit(pick, out_shardings=NamedSharding(mesh, PartitionSpec()))


def _gather_first(bytes_L: np.ndarray, have_L: np.ndarray) -> np.ndarray:
    """Every process's ``bytes_L``, merged: each byte from the first process whose ``have_L``
    is set there. Returned on every process."""
    mesh = _process_mesh()
    sharding = NamedSharding(mesh, PartitionSpec("process"))
    mine = next(d for d in mesh.devices.flat if d.process_index == jax.process_index())
    n = mesh.devices.size
    glob = [jax.make_array_from_single_device_arrays(
        (n, a.shape[0]), sharding, [jax.device_put(a[None], mine)]) for a in (bytes_L, have_L)]
    return np.asarray(_pick_first()(*glob).addressable_data(0))
