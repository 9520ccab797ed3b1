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
- ``move`` takes arrays from one slice to another (KV pages from prefill to decode) when the
  two lie on different processes: ``fetch`` then ``place``.
"""

from __future__ import annotations

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
    make = jax.jit(functools.partial(jnp.zeros, tuple(shape), dtype),
                   out_shardings=_sharding(target))
    return make()


def zeros_tree(shapes, targets):
    """Zero arrays shaped like ``shapes`` (``jax.ShapeDtypeStruct`` leaves) on ``targets`` (one
    device/sharding, or a matching tree)."""
    if isinstance(targets, jax.Device | jax.sharding.Sharding):
        return jax.tree.map(lambda s: zeros(s.shape, s.dtype, targets), shapes)
    return jax.tree.map(lambda s, t: zeros(s.shape, s.dtype, t), shapes, targets)


def fetch(tree):
    """The arrays of ``tree`` as numpy, identical on every process (``jax.device_get`` in one
    process). Every process must call it at the same point: with several it is a collective."""
    if not multi_process():
        return jax.device_get(tree)
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
    """Arrays of ``tree`` onto ``target`` (device or sharding), across processes if need be.
    Every process must call it at the same point when several run."""
    if not multi_process():
        return jax.device_put(tree, target)
    return jax.tree.map(lambda a: place(a, target), fetch(tree))


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
