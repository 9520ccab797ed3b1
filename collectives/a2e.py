"""A2E / E2A: a decode-attention domain's tokens to the routed experts and back.

The routed-expert ``SliceService`` over ``collectives.transport``; checked against the dense
MoE in two shapes:

``trampoline`` (xDeepServe's design): hop 1 is a ``ppermute`` program over the union of the
domain and the expert slice that puts each attention rank's tokens (hidden rows, expert ids,
gates, packed as one payload) on its trampoline; hop 2 is the dispatch all-to-all inside the
expert mesh, then experts and combine (``collectives.ep_moe``); E2A is the mirror ``ppermute``
from the trampolines back. Each attention rank talks to exactly one expert rank; with more
attention ranks than expert ranks a trampoline serves several, in rounds.

``direct``: one program over the union of both slices; attention ranks own no expert slots
and every attention rank writes into every expert rank (the high fan-out trampolines
avoid). Works for any A and E.

``colocated`` (EP decode): the expert mesh is the domain's own devices; the dispatch
all-to-all inside it is the only exchange (``collectives.transport.ColocatedTransport``).

Shape legend: A attention ranks, E expert ranks, T tokens per attention rank, K choices,
D hidden.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from collectives.dispatch import quantize_int8
from collectives.ep_moe import EpMoe
from collectives.eplb import max_replicas
from collectives.expert_map import ExpertMap
from collectives.stats import CollectiveRecord, CollectiveStats
from collectives.transport import SliceService, TransportError, make_transport, trampoline_devices

A2EError = TransportError

__all__ = ["A2E", "A2EError", "trampoline_devices"]


class A2E(SliceService):
    """Attention-to-expert transport plus the expert step, for one attention domain.

    ``__call__(experts_P, x_TD, topk_ids_TK, topk_w_TK)`` takes tokens on the attention mesh
    (rank-major over ``attn_axis``) and expert slot weights on the expert mesh, and returns
    the gate-weighted expert output on the attention mesh (re-running on overflow). The
    pipeline uses ``send`` / ``launch`` / ``receive`` with weights given by ``use_weights``.

    With ``int8`` the hidden rows travel as INT8 with one float32 scale per row: quantized on
    the attention ranks before the A2E hop (trampoline mode), dequantized on the trampolines,
    and quantized again (losslessly: same scale) by the expert mesh's dispatch; combine and
    E2A stay in the activations' dtype.
    """

    fills = (0, -1, 0)  # hidden rows, expert ids (-1: no expert), gates

    def __init__(self, attn_mesh: Mesh, expert_mesh: Mesh, expert_map: ExpertMap, *,
                 attn_axis: str = "dp", expert_axis: str = "ep", mode: str = "trampoline",
                 stats: CollectiveStats | None = None, int8: bool = False,
                 **moe_kwargs) -> None:
        super().__init__(make_transport(mode, attn_mesh, list(expert_mesh.devices.flat),
                                        attn_axis=attn_axis, other_axis=expert_axis))
        self.mode = mode
        self.int8 = int8
        self.int8_hop = int8 and self.transport.moves_data
        if int8:
            moe_kwargs["int8_dispatch"] = True
        self.attn_devices = self.transport.attn_devices
        self.expert_devices = self.transport.other_devices
        self.trampolines = self.transport.trampolines
        self.stats = stats if stats is not None else CollectiveStats()
        self.expert_map = expert_map
        width = max_replicas(expert_map.num_experts, expert_map.num_devices,
                             expert_map.slots_per_device)
        self.moe = EpMoe(self.transport.other_mesh, self._on_run_mesh(expert_map),
                         axis=expert_axis, stats=self.stats, replica_width=width, **moe_kwargs)
        self.run_devices = list(self.transport.other_mesh.devices.flat)
        self.weights: dict[int, dict] = {}
        self.dtype = jnp.float32  # activations' dtype, from the last send
        self.maps: dict[int, tuple] = {}  # per-layer map arrays (EPLB); default: expert_map
        self.last_slot_rows = None  # [ranks, S] rows each run-mesh rank got per slot, last launch

    def _on_run_mesh(self, emap: ExpertMap) -> ExpertMap:
        """Direct mode computes over the union: attention ranks hold empty slots in front."""
        if self.mode != "direct":
            return emap
        return emap.with_empty_ranks(before=len(self.attn_devices))

    @property
    def slot_offset(self) -> int:
        """Index, in the placed slot weights, of the expert map's slot 0."""
        return self.moe.expert_map.num_slots - self.expert_map.num_slots

    def map_arrays(self, expert_map: ExpertMap) -> tuple[jax.Array, jax.Array]:
        """The program inputs of ``expert_map`` on this service's run mesh."""
        return self.moe.map_arrays(self._on_run_mesh(expert_map))

    def set_map(self, layer: int, expert_map: ExpertMap) -> None:
        """Route ``layer`` with ``expert_map`` from the next launch: map arrays are program
        inputs, so nothing recompiles. Its slots must hold what ``use_weights`` placed."""
        self.set_map_arrays(layer, self.map_arrays(expert_map))

    def set_map_arrays(self, layer: int, arrays: tuple[jax.Array, jax.Array]) -> None:
        """``set_map`` with arrays made by ``map_arrays`` (e.g. on another thread)."""
        self.maps[layer] = arrays

    def place_experts(self, experts_L: dict, expert_map: ExpertMap | None = None) -> dict:
        """Slot weights for ``compute``, from logical expert weights ``[L, ...]`` (in the slots
        of ``expert_map``, default the constructor's)."""
        emap = self._on_run_mesh(expert_map) if expert_map is not None else self.moe.expert_map
        return jax.tree.map(self.moe.shard, emap.physical_weights(experts_L))

    def use_weights(self, by_layer: dict[int, dict]) -> None:
        """Placed slot weights per MoE layer, for ``launch``."""
        self.weights = by_layer

    def send(self, x_TD, topk_ids_TK, topk_w_TK) -> tuple[jax.Array, ...]:
        """A2E of the rows, ids and gates (INT8 rows + scales with ``int8`` hops)."""
        self.dtype = x_TD.dtype  # the activations', for dequantizing and byte counts
        if not self.int8_hop:
            return super().send(x_TD, topk_ids_TK, topk_w_TK)
        q_TD, scale_T = _quantize(x_TD)
        return self.transport.send(q_TD, scale_T, topk_ids_TK, topk_w_TK,
                                   fills=(0, 0, -1, 0))

    def _expert_inputs(self, sent: tuple) -> tuple:
        """``(x_TD, ids, gates)`` on the expert mesh from what ``send`` delivered."""
        if len(sent) == 3:
            return sent
        q_TD, scale_T, ids_TK, w_TK = sent
        return _dequantize(q_TD, scale_T, jnp.dtype(self.dtype)), ids_TK, w_TK

    def tokens_per_rank(self, tokens: int) -> int:
        """Rows per expert rank when every attention rank sends ``tokens``."""
        return self.transport.rows_per_target(tokens)

    def compute(self, experts_P: dict, inputs: tuple[jax.Array, ...]) -> jax.Array:
        """Hop 2 (dispatch inside the expert mesh), experts, combine; re-runs on overflow."""
        return self.moe(experts_P, *self._expert_inputs(inputs))

    def launch(self, layer: int, sent: tuple, capacity: int | None = None):
        """Hop 2, experts and combine of ``layer`` at a fixed capacity, without waiting:
        ``(out, overflow [E])``; the caller checks the overflow and re-runs. The rows each
        rank received per local slot stay on device as ``last_slot_rows`` (the expert ranks'
        load counters)."""
        out, stats = self.moe.launch(capacity, self.weights[layer], *self._expert_inputs(sent),
                                     replicas=self.maps.get(layer))
        self.last_slot_rows = stats.slot_tokens_S
        return out, stats.overflow

    def launch_bytes(self, sent: tuple, capacity: int | None) -> int:
        """Dispatch + combine buffers inside the expert mesh: every rank sends C rows to
        every rank each way (INT8 dispatch rows: D bytes + a float32 scale)."""
        d, n = sent[0].shape[-1], self.moe.n
        item = jnp.dtype(self.dtype).itemsize
        row_in = d + 4 if self.int8 else d * item
        return n * n * (capacity or 0) * (row_in + d * item)

    def hop_bytes(self, x_TD, topk_ids_TK) -> tuple[int, int]:
        """Bytes of hop 1 (A2E: rows, ids and gates) and of the E2A hop back, all ranks;
        zero in direct mode (no copy between slices)."""
        if not self.transport.moves_data:
            return 0, 0
        row = x_TD.shape[-1] * np.dtype(x_TD.dtype).itemsize
        sent = x_TD.shape[-1] + 4 if self.int8_hop else row
        tokens = x_TD.shape[0]
        return tokens * (sent + topk_ids_TK.shape[-1] * 8), tokens * row

    def send_bytes(self, arrays) -> int:
        return self.hop_bytes(arrays[0], arrays[1])[0]

    def __call__(self, experts_P: dict, x_TD, topk_ids_TK, topk_w_TK) -> jax.Array:
        start = time.perf_counter()
        inputs = jax.block_until_ready(self.send(x_TD, topk_ids_TK, topk_w_TK))
        sent = time.perf_counter()
        out_TD = self.compute(experts_P, inputs)
        computed = time.perf_counter()
        out = jax.block_until_ready(self.receive(out_TD))
        self._record(x_TD, topk_ids_TK, sent - start, time.perf_counter() - computed)
        return out

    def _record(self, x_TD, topk_ids_TK, send_s: float, recv_s: float) -> None:
        """Bytes of the hops between slices (the expert-mesh exchanges are in the
        ``dispatch`` / ``combine`` records of the same stats)."""
        a = len(self.attn_devices)
        hop, back = self.hop_bytes(x_TD, topk_ids_TK)  # ids int32 + gates float32 per choice
        extra = {"mode": self.mode, "attention": a, "experts": len(self.expert_devices),
                 "rounds": self.transport.rounds}
        self.stats.record(CollectiveRecord("a2e_hop", hop, send_s, a, 0, extra))
        self.stats.record(CollectiveRecord("e2a_hop", back, recv_s, a, 0, extra))


@jax.jit
def _quantize(x_TD):
    return quantize_int8(x_TD)


@functools.partial(jax.jit, static_argnums=2)
def _dequantize(q_TD, scale_T, dtype):
    return (q_TD.astype(jnp.float32) * scale_T[:, None]).astype(dtype)
