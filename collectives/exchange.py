"""The all-to-all exchange under the dispatch, and the XLA:CPU limit it works around.

``all_to_all`` (the default) is one collective inside the caller's program: what runs on
TPU/GPU and on CPU meshes of up to 256 devices.

XLA:CPU runs the collectives of a multi-thunk program on its intra-op thread pool, which
is capped at 256 threads; a collective needs every participant blocked in a rendezvous at
once, so a program with a collective over more than 256 virtual devices deadlocks. A
program holding *only* a collective is executed inline by each device's launching thread
and works at any size. ``gather`` is that shape: an ``all_gather`` of the whole send
buffer then each rank keeps its own column. It moves N times the bytes of an all-to-all,
so it is only used to *simulate* meshes beyond 256 CPU devices (the "staged" mode of
``EpMoe``, one program per exchange); byte counts in the stats stay those of the
all-to-all the hardware would run.
"""

from __future__ import annotations

import jax

XLA_CPU_MAX_COLLECTIVE_DEVICES = 256


def all_to_all_exchange(x_N: jax.Array, axis: str) -> jax.Array:
    """Rank ``i`` sends ``x_N[j]`` to rank ``j``; the result is indexed by source rank."""
    return jax.lax.all_to_all(x_N, axis, 0, 0, tiled=True)


def gather_exchange(x_N: jax.Array, axis: str) -> jax.Array:
    """Same result as ``all_to_all_exchange`` through an all-gather (N times the bytes)."""
    everything = jax.lax.all_gather(x_N, axis)  # [N_src, N_dst, ...]
    return everything[:, jax.lax.axis_index(axis)]


EXCHANGES = {"all_to_all": all_to_all_exchange, "gather": gather_exchange}


def needs_staging(mesh: jax.sharding.Mesh, axis: str) -> bool:
    """True where one program with an all-to-all over ``axis`` would deadlock (XLA:CPU)."""
    size = mesh.shape[axis]
    platform = mesh.devices.flat[0].platform
    return platform == "cpu" and size > XLA_CPU_MAX_COLLECTIVE_DEVICES
