"""Send to another slice, compute there, bring the result back: the transport under A2E/E2A
(routed experts), the dense-FFN slice and the shared experts of MA decode.

An attention *domain* holds A ranks on a ``("dp",)`` mesh, its arrays rank-major (T rows per
rank). The *other slice* is N devices on a ``("ep",)`` mesh. A ``TrampolineMap`` sends rank i
to one target device: with A <= N the targets are spread evenly (xDeepServe's trampolines);
with A > N, G = ceil(A / N) ranks share a target and travel in G rounds.

``Transport`` (trampolines): each hop is one ``shard_map`` program per round over the
*union* mesh (domain ranks, then the other slice; axis ``u``) holding exactly one
``ppermute``. A2E packs the arrays of a hop into one byte payload so that a round is one
collective (on XLA:CPU a program with a single collective runs inline on each device's
launching thread at any mesh size, while several collectives in one program take threads of a
pool capped at 256: see ``collectives.exchange``); targets stack their rounds into G * T rows.
Rows nobody sent decode to each array's fill (0, or -1 for expert ids: no expert). E2A
mirrors it. Between the union mesh and the two slices' meshes arrays are re-labelled shard
by shard (``make_array_from_single_device_arrays``: no copy), because a jitted function
cannot take arguments committed to two meshes.

``DirectTransport``: the computation itself runs over the union (attention ranks hold empty
rows), so there is no hop: every attention rank writes into every expert rank.

``ColocatedTransport``: the other slice is the domain itself (EP decode, where each DP rank
also holds expert slots): hops only re-label arrays between the two meshes of the same
devices.

``SliceService`` is what MA's pipeline calls: ``send`` (A2E), ``launch`` (compute on the other
slice at a fixed capacity, returning an overflow flag or None), ``receive`` (E2A).

Shape legend: A domain ranks, N other-slice devices, U = A + N, T rows per rank, G rounds.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sharding.rules import UNION_AXIS, program_spec


class TransportError(ValueError):
    """The two slices cannot be connected the way asked."""


@dataclasses.dataclass(frozen=True)
class TrampolineMap:
    """Which device of the other slice each attention rank talks to, and in which round."""

    num_ranks: int  # A
    num_targets: int  # N
    target_of: tuple[int, ...]  # [A] index into the other slice
    round_of: tuple[int, ...]  # [A] hop round, 0 .. G - 1

    @classmethod
    def spread(cls, num_ranks: int, num_targets: int) -> TrampolineMap:
        if num_ranks < 1 or num_targets < 1:
            raise TransportError(f"need ranks and targets, got {num_ranks} -> {num_targets}")
        if num_ranks <= num_targets:
            targets = tuple(i * num_targets // num_ranks for i in range(num_ranks))
            return cls(num_ranks, num_targets, targets, (0,) * num_ranks)
        g = math.ceil(num_ranks / num_targets)
        return cls(num_ranks, num_targets, tuple(i // g for i in range(num_ranks)),
                   tuple(i % g for i in range(num_ranks)))

    @property
    def rounds(self) -> int:
        return max(self.round_of) + 1

    @property
    def targets(self) -> tuple[int, ...]:
        """The other slice's devices that receive (the trampolines), in order."""
        return tuple(sorted(set(self.target_of)))

    def pairs(self, round_index: int) -> list[tuple[int, int]]:
        """``(rank, A + target)`` union-axis pairs of one round."""
        a = self.num_ranks
        return [(i, a + t) for i, (t, r) in enumerate(zip(self.target_of, self.round_of,
                                                          strict=True)) if r == round_index]


def trampoline_devices(other_devices: list, num_ranks: int) -> list:
    """The device each of ``num_ranks`` attention ranks sends to (repeats when A > N)."""
    tmap = TrampolineMap.spread(num_ranks, len(other_devices))
    return [other_devices[t] for t in tmap.target_of]


# -- byte payloads: one collective per hop round ----------------------------------------------
def _to_bytes(a: jax.Array, fill) -> jax.Array:
    """``[T, ...]`` -> ``[T, bytes]``; integers stored relative to ``fill`` so zero bytes
    (what a rank that received nothing holds) decode to ``fill``."""
    if fill and jnp.issubdtype(a.dtype, jnp.integer):
        a = a - jnp.asarray(fill, a.dtype)
    return jax.lax.bitcast_convert_type(a, jnp.uint8).reshape(a.shape[0], -1)


def _from_bytes(b: jax.Array, shape: tuple, dtype, fill) -> jax.Array:
    item = np.dtype(dtype).itemsize
    b = b.reshape((b.shape[0],) + shape + ((item,) if item > 1 else ()))
    a = jax.lax.bitcast_convert_type(b, dtype)
    if fill and jnp.issubdtype(dtype, jnp.integer):
        a = a + jnp.asarray(fill, dtype)
    return a


def _a2e_round(*args, pairs, fills, round_index, rounds):
    """One A2E round per union rank: pack, ppermute, unpack into rows ``[j * T, (j+1) * T)``."""
    n = len(fills)
    arrays, acc = args[:n], args[n:]
    t = arrays[0].shape[0]
    payload = jnp.concatenate([_to_bytes(a, f) for a, f in zip(arrays, fills, strict=True)],
                              axis=1)
    got = jax.lax.ppermute(payload, UNION_AXIS, pairs)
    out, start = [], 0
    for i, (a, f) in enumerate(zip(arrays, fills, strict=True)):
        width = math.prod(a.shape[1:]) * a.dtype.itemsize
        recv = _from_bytes(got[:, start:start + width], a.shape[1:], a.dtype, f)
        start += width
        if rounds == 1:
            out.append(recv)
            continue
        base = acc[i] if acc else jnp.full((rounds * t,) + a.shape[1:], f, a.dtype)
        out.append(jax.lax.dynamic_update_slice_in_dim(base, recv, round_index * t, 0))
    return tuple(out)


def _e2a_round(y, *acc, pairs, rows, round_index, receivers):
    """One E2A round per union rank: rows ``[j * T, (j+1) * T)`` back to their ranks."""
    got = jax.lax.ppermute(y[round_index * rows:(round_index + 1) * rows], UNION_AXIS, pairs)
    if not acc:
        return got
    mine = jnp.asarray(receivers)[jax.lax.axis_index(UNION_AXIS)]
    return jnp.where(mine, got, acc[0])


@functools.cache
def _filled(shape: tuple, dtype: np.dtype, fill, device) -> jax.Array:
    """A placeholder buffer (cached: it is only ever read)."""
    return jax.device_put(np.full(shape, fill, dtype), device)


def _by_device(x: jax.Array) -> dict:
    return {s.device: s.data for s in x.addressable_shards}


def relabel(x: jax.Array, sharding: NamedSharding, devices: list, fill=0) -> jax.Array:
    """``x``'s per-device buffers as an array over ``devices`` (sharded on the first axis);
    devices ``x`` has no buffer on get a ``fill`` placeholder. No data moves."""
    have = _by_device(x)
    local = x.sharding.shard_shape(x.shape)
    me = jax.process_index()  # each process supplies the buffers of its own devices
    bufs = [have[d] if d in have else _filled(local, np.dtype(x.dtype), fill, d)
            for d in devices if d.process_index == me]
    return jax.make_array_from_single_device_arrays((local[0] * len(devices),) + local[1:],
                                                    sharding, bufs, dtype=x.dtype)


class Transport:
    """Trampoline hops between an attention domain and another slice (module docstring).

    Args:
      attn_mesh: the domain's mesh (one axis, ``attn_axis``).
      other_devices: the other slice, in order; its mesh is ``other_mesh`` (axis
        ``other_axis``), where the service computes.
    """

    moves_data = True

    def __init__(self, attn_mesh: Mesh, other_devices: list, *, attn_axis: str = "dp",
                 other_axis: str = "ep") -> None:
        self.attn_devices, self.other_devices = _disjoint_slices(attn_mesh, other_devices)
        self.map = TrampolineMap.spread(len(self.attn_devices), len(self.other_devices))
        self.trampolines = [self.other_devices[t] for t in self.map.target_of]
        self.union_devices = self.attn_devices + self.other_devices
        union = Mesh(np.array(self.union_devices), (UNION_AXIS,))
        self.union_sharding = _rows(union, "transfer")
        self.attn_sharding = _rows(attn_mesh, "decode_attention")
        self.other_mesh = Mesh(np.array(self.other_devices), (other_axis,))
        self.other_sharding = _rows(self.other_mesh, "decode_experts")
        # E2A: which union ranks get their rows back in each round
        self._receivers = np.zeros((self.map.rounds, len(self.union_devices)), bool)
        for i, r in enumerate(self.map.round_of):
            self._receivers[r, i] = True

    @property
    def rounds(self) -> int:
        return self.map.rounds

    def rows_per_target(self, rows: int) -> int:
        """Rows each other-slice device holds after ``send`` of ``rows`` per rank."""
        return rows * self.rounds

    def _program(self, fn, n_in: int, n_out: int | None, **static):
        return _union_program(self.union_sharding.mesh, fn, n_in, n_out,
                              tuple(sorted(static.items())))

    def send(self, *arrays: jax.Array, fills: tuple = ()) -> tuple[jax.Array, ...]:
        """A2E: rank-major arrays on the domain mesh -> ``[N * G * T, ...]`` on ``other_mesh``
        (each target's rows in round order; unfilled rows hold the array's fill)."""
        fills = tuple(fills) or (0,) * len(arrays)
        on_union = [relabel(a, self.union_sharding, self.union_devices, f)
                    for a, f in zip(arrays, fills, strict=True)]
        acc: tuple = ()
        for j in range(self.rounds):
            prog = self._program(_a2e_round, len(arrays) + len(acc), len(arrays),
                                 pairs=tuple(self.map.pairs(j)), fills=fills, round_index=j,
                                 rounds=self.rounds)
            acc = prog(*on_union, *acc)
        return tuple(relabel(x, self.other_sharding, self.other_devices) for x in acc)

    def receive(self, y: jax.Array) -> jax.Array:
        """E2A: ``[N * G * T, ...]`` on ``other_mesh`` -> ``[A * T, ...]`` on the domain."""
        on_union = relabel(y, self.union_sharding, self.union_devices)
        rows = y.shape[0] // (len(self.other_devices) * self.rounds)
        acc: tuple = ()
        for j in range(self.rounds):
            back = [(b, a) for a, b in self.map.pairs(j)]
            prog = self._program(_e2a_round, 1 + len(acc), None, pairs=tuple(back), rows=rows,
                                 round_index=j, receivers=tuple(self._receivers[j].tolist()))
            acc = (prog(on_union, *acc),)
        return relabel(acc[0], self.attn_sharding, self.attn_devices)

    def hop_bytes(self, arrays) -> int:
        """Bytes a hop moves between the slices (every rank's rows once)."""
        return sum(a.size * a.dtype.itemsize for a in arrays)


@functools.cache
def _union_program(mesh: Mesh, fn, n_in: int, n_out: int | None, static: tuple):
    """``fn`` per union rank; ``n_out`` outputs as a tuple, or one array when None."""
    spec = _rows(mesh, "transfer").spec
    out = spec if n_out is None else (spec,) * n_out
    return jax.jit(jax.shard_map(functools.partial(fn, **dict(static)), mesh=mesh,
                                 in_specs=(spec,) * n_in, out_specs=out))


class DirectTransport:
    """No hop: the service computes over the union of both slices (attention ranks first,
    holding only empty rows), so every attention rank writes into every other rank."""

    moves_data = False
    rounds = 1

    def __init__(self, attn_mesh: Mesh, other_devices: list, *, attn_axis: str = "dp",
                 other_axis: str = "ep") -> None:
        self.attn_devices, self.other_devices = _disjoint_slices(attn_mesh, other_devices)
        self.trampolines: list = []
        self.union_devices = self.attn_devices + self.other_devices
        self.attn_sharding = _rows(attn_mesh, "decode_attention")
        self.other_mesh = Mesh(np.array(self.union_devices), (other_axis,))
        self.other_sharding = _rows(self.other_mesh, "decode_experts")

    def rows_per_target(self, rows: int) -> int:
        return rows

    def send(self, *arrays: jax.Array, fills: tuple = ()) -> tuple[jax.Array, ...]:
        fills = tuple(fills) or (0,) * len(arrays)
        return tuple(relabel(a, self.other_sharding, self.union_devices, f)
                     for a, f in zip(arrays, fills, strict=True))

    def receive(self, y: jax.Array) -> jax.Array:
        return relabel(y, self.attn_sharding, self.attn_devices)

    def hop_bytes(self, arrays) -> int:
        return 0


class ColocatedTransport(DirectTransport):
    """The other slice *is* the domain (EP decode: every DP rank also holds expert slots), so
    a hop re-labels each rank's rows from the ``("dp",)`` mesh to the ``("ep",)`` mesh of the
    same devices: nothing moves, the service's dispatch all-to-all is the only exchange.
    ``DirectTransport``'s hops with a union that is the domain itself (no empty rows)."""

    def __init__(self, attn_mesh: Mesh, other_devices: list, *, attn_axis: str = "dp",
                 other_axis: str = "ep") -> None:
        self.attn_devices, self.other_devices = list(attn_mesh.devices.flat), list(other_devices)
        if self.attn_devices != self.other_devices:
            raise TransportError("colocated mode needs the expert slice to be the attention "
                                 "domain's own devices, in the same order")
        self.trampolines: list = []
        self.union_devices = self.attn_devices
        self.attn_sharding = _rows(attn_mesh, "decode_attention")
        self.other_mesh = Mesh(np.array(self.other_devices), (other_axis,))
        self.other_sharding = _rows(self.other_mesh, "decode_experts")


TRANSPORTS = {"trampoline": Transport, "direct": DirectTransport,
              "colocated": ColocatedTransport}


def make_transport(mode: str, attn_mesh: Mesh, other_devices: list, **axes):
    if mode not in TRANSPORTS:
        raise TransportError(f"unknown A2E mode {mode!r}; use one of {sorted(TRANSPORTS)}")
    return TRANSPORTS[mode](attn_mesh, other_devices, **axes)


class SliceService(abc.ABC):
    """Send a domain's rows to another slice, compute there, bring the result back.

    Subclasses set ``fills`` (one per sent array), the trace names and ``launch``. The
    pipeline calls ``send`` -> ``launch`` -> ``receive``, all asynchronous; a wrapper may
    record each call (``serving.disagg.ma_trace``).
    """

    fills: tuple = (0,)
    # (role, stage, stream) of send, launch and receive in a timeline; formatted with the
    # event's ``layer`` and ``domain``.
    trace = (("a2e", "a2e_l{layer}", "a2e/d{domain}"),
             ("expert", "moe_l{layer}", "expert"),
             ("e2a", "e2a_l{layer}", "e2a/d{domain}"))

    def __init__(self, transport) -> None:
        self.transport = transport

    @property
    def ranks(self) -> int:
        """Devices the computation runs over."""
        return len(self.transport.other_mesh.devices.flat)

    def send(self, *arrays: jax.Array) -> tuple[jax.Array, ...]:
        return self.transport.send(*arrays, fills=self.fills)

    @abc.abstractmethod
    def launch(self, layer: int, sent: tuple, capacity: int | None = None):
        """``(out on the other slice, overflow flags or None)``, without waiting."""

    def receive(self, out: jax.Array) -> jax.Array:
        return self.transport.receive(out)

    def __call__(self, layer: int, *arrays: jax.Array, capacity: int | None = None):
        """The whole round trip: ``(result on the domain, overflow or None)``."""
        out, overflow = self.launch(layer, self.send(*arrays), capacity)
        return self.receive(out), overflow

    def send_bytes(self, arrays) -> int:
        """Bytes A2E moves between the slices."""
        return self.transport.hop_bytes(arrays)

    def receive_bytes(self, result: jax.Array) -> int:
        """Bytes E2A moves back (the result on the domain)."""
        return self.transport.hop_bytes([result])

    def launch_bytes(self, sent: tuple, capacity: int | None) -> int:
        return 0


def _disjoint_slices(attn_mesh: Mesh, other_devices: list) -> tuple[list, list]:
    """The attention domain's devices and the other slice's, refusing any shared device."""
    attn, other = list(attn_mesh.devices.flat), list(other_devices)
    if set(attn) & set(other):
        raise TransportError("attention and expert slices share devices")
    return attn, other


def _rows(mesh: Mesh, role: str) -> NamedSharding:
    """One block of rows per device of ``mesh``, by the ``batch`` rule of ``role``'s table
    (``sharding.rules``); a mesh whose axis the rule does not name is refused."""
    spec = program_spec(mesh, role, "batch")
    if spec == P(None) and mesh.size > 1:
        raise TransportError(f"mesh axes {mesh.axis_names} do not carry the {role} role's "
                             "batch axis (sharding.rules)")
    return NamedSharding(mesh, spec)
