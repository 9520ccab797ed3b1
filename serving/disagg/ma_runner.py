"""One MA attention domain: its ranks' KV pages, stage programs and padded micro-batches.

A domain is ``dp`` attention ranks (TP = 1) on a 1-axis ``("dp",)`` mesh. Every stage is one
SPMD program over the domain (``jax.shard_map``, per-rank semantics): parameters (all but the
routed experts) are replicated, activations and inputs are rank-major and sharded on ``dp``,
and each layer's KV pages are one global array sharded on the page axis, so a rank's local
block ids index its own shard. Ranks' rows are padded to a common bucket (rows, tokens per
row, block-table width); padding tokens have position -1 (they write no KV) and expert id -1
(they take no expert capacity).

Shape legend: A ranks in the domain, B rows per rank, S tokens per row, N blocks per row,
T = B * S tokens per rank, D hidden, K experts per token, V vocabulary, P pages per rank.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from serving.core.step_rows import RowBatch, build_rows, table_blocks
from sharding.rules import program_spec
from xds_jax.generate import bucket
from xds_jax.memory_maps import ProgramShapes
from xds_jax.model import stages
from xds_jax.model.attention import new_layer_cache
from xds_jax.model.config import ModelConfig
from xds_jax.model.mtp import draft_argmax, mtp_input
from xds_jax.model.params import model_dtype
from xds_jax.model.reference import last_token_logits
from xds_jax.multihost import zeros_tree

log = logging.getLogger(__name__)



def _without_experts(layer: dict) -> dict:
    return {k: ({n: w for n, w in v.items() if n != "experts"} if k == "moe" else v)
            for k, v in layer.items()}


def attention_params(params: dict, mtp: bool = False) -> dict:
    """Everything but the routed experts: what attention ranks hold. With ``mtp``, the first
    MTP block too (as ``"mtp"``, its routed experts also on the expert slice)."""
    layers = [_without_experts(layer) for layer in params["layers"]]
    rest = {k: v for k, v in params.items() if k not in ("layers", "mtp")}
    if mtp:
        block = params["mtp"][0]
        rest["mtp"] = block | {"layer": _without_experts(block["layer"])}
    return rest | {"layers": layers}


def from_host(x, sharding: NamedSharding) -> jax.Array:
    """A global array from host data, built device by device (no slicing program)."""
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx],
                                        dtype=host.dtype)


@dataclasses.dataclass
class MicroBatch:
    """One micro-batch of one domain: inputs on the domain mesh, rows rank-major."""

    domain: int
    index: int
    rows: int  # B, rows per rank
    width: int  # S, tokens per row
    tokens_BS: jax.Array  # [A * B, S]
    positions_BS: jax.Array
    tables_BN: jax.Array  # [A * B, N]
    last_B: jax.Array  # [A * B]
    seqs: list  # A * B entries: the Sequence sampled from that row, or None
    items: list = dataclasses.field(default_factory=list)  # A * B: scheduled item, or None

    @property
    def shape_key(self) -> tuple[int, int, int]:
        return (self.rows, self.width, self.tables_BN.shape[1])


def _rank_rows(part: list, rows: int, width: int, blocks: int, block_size: int) -> RowBatch:
    """One rank's rows padded to the domain's common bucket."""
    if not part:
        return RowBatch(np.zeros((rows, width), np.int32), np.full((rows, width), -1, np.int32),
                        np.zeros((rows, blocks), np.int32), np.zeros((rows,), np.int32),
                        [None] * rows)
    rb = build_rows(part, rows, width, block_size)
    tables = np.pad(rb.tables_BN, ((0, 0), (0, blocks - rb.tables_BN.shape[1])))
    return dataclasses.replace(rb, tables_BN=tables)


def split_micro_batches(per_rank: list[list], micro_batches: int) -> list[list[list]]:
    """Split every rank's scheduled rows into at most ``micro_batches`` contiguous parts
    (fewer when no rank has that many rows): ``[micro_batch][rank] -> rows``."""
    m = max(1, min(micro_batches, max(len(rows) for rows in per_rank)))
    return [[rows[i * len(rows) // m:(i + 1) * len(rows) // m] for rows in per_rank]
            for i in range(m)]


def _embed(params, tokens_BS):
    return stages.embed(params, tokens_BS)


def _attention(layer, x_BSD, positions_BS, cache, tables_BN, *, cfg, index):
    return stages.attention(layer, cfg, x_BSD, positions_BS, cache, tables_BN, index)


def _gate(layer, x_BSD, positions_BS, load_1E, *, cfg, shared):
    """Flatten to tokens, route, count each expert's tokens into the rank's load row, and
    the shared expert unless it runs elsewhere; padding tokens route nowhere."""
    x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
    h_TD, ids_TK, w_TK, _ = stages.moe_gate(layer, cfg, x_TD)
    valid_T = positions_BS.reshape(-1) >= 0
    ids_TK = jnp.where(valid_T[:, None], ids_TK, -1)
    w_TK = jnp.where(valid_T[:, None], w_TK, 0)
    load_1E = load_1E.at[0, jnp.maximum(ids_TK, 0).reshape(-1)].add(
        (ids_TK >= 0).reshape(-1).astype(load_1E.dtype))
    if not shared:
        return x_TD, h_TD, ids_TK, w_TK, load_1E
    return x_TD, h_TD, ids_TK, w_TK, load_1E, stages.moe_shared(layer, cfg, h_TD)


def _combine(x_TD, routed_TD, shared_TD, *, shape):
    return stages.moe_combine(x_TD, routed_TD, shared_TD).reshape(shape)


def _ffn(layer, x_BSD, *, cfg):
    return stages.ffn(layer, cfg, x_BSD)


def _head(params, x_BSD, last_B, *, cfg):
    return last_token_logits(params, cfg, x_BSD, last_B)


def _head_all(params, x_BSD, *, cfg):
    return stages.head(params, cfg, x_BSD)


def _take_last(x_BSD, last_B):
    return jnp.take_along_axis(x_BSD, last_B[:, None, None], axis=1)[:, 0]


def _mtp_input(params, tokens_BS, hidden_BSD, *, cfg):
    return mtp_input(params["mtp"], params, cfg, tokens_BS, hidden_BSD)


def _mtp_next(params, draft_B, g_BD, *, cfg):
    return mtp_input(params["mtp"], params, cfg, draft_B[:, None], g_BD[:, None])


def _mtp_draft(params, x_BSD, last_B, *, cfg):
    """The MTP output at ``last_B`` and its greedy draft ``(g [B, D], token [B])``."""
    g_BD = _take_last(x_BSD, last_B)
    return g_BD, draft_argmax(params["mtp"], params, cfg, g_BD)


def _verify_tokens(tokens_BS, drafts):
    return jnp.stack([tokens_BS[:, 0], *drafts], axis=1)


@functools.cache
def _domain_program(mesh: Mesh, fn, in_specs, out_specs, donate: tuple, static: tuple):
    """A domain's stage program running ``fn``: one per process for each mesh and
    configuration, so that domains rebuilt on the same devices (a restarted engine, another
    engine) reuse what compiled before."""
    body = functools.partial(fn, **dict(static)) if static else fn
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs),
                   donate_argnums=donate)


class Domain:
    """Stage programs, replicated parameters and KV pages of one attention domain."""

    def __init__(self, index: int, mesh: Mesh, params: dict, cfg: ModelConfig,
                 num_blocks: int, block_size: int, first_rank: int = 0, mtp: bool = False):
        self.index = index
        self.mesh = mesh
        self.cfg = cfg
        self.first_rank = first_rank  # global DP-group index of rank 0
        self.devices = list(mesh.devices.flat)
        self.block_size = block_size
        self.num_blocks = num_blocks
        # micro-batch rows, KV pages and load counters: one block per rank; weights: whole
        self._rank = program_spec(mesh, "decode_attention", "batch")
        self._whole = program_spec(mesh, "decode_attention")
        self.rank_sharding = NamedSharding(mesh, self._rank)
        repl = NamedSharding(mesh, self._whole)
        self.params = jax.tree.map(lambda a: from_host(a, repl), attention_params(params, mtp))
        self.dtype = model_dtype(params)
        a = len(self.devices)
        one = jax.eval_shape(lambda: new_layer_cache(cfg, num_blocks, block_size, self.dtype))
        pages = {k: jax.ShapeDtypeStruct((a * num_blocks,) + s.shape[1:], s.dtype)
                 for k, s in one.items()}
        # the target's layers, then (MTP) the MTP block's ("layer" num_layers); made on device
        # (host zeros could alias numpy memory, which donation cannot reuse), in one program
        self.caches = zeros_tree([pages] * (cfg.num_layers + mtp), self.rank_sharding)
        experts = cfg.moe.num_experts if cfg.moe is not None else 0
        self.zero_load = jax.make_array_from_callback(
            (a, experts), self.rank_sharding, lambda idx: np.zeros((1, experts), np.int32),
            dtype=np.int32)  # a process holding none of the ranks still needs the dtype
        self._shapes_seen = ProgramShapes()
        self.compile_count = 0

    @property
    def num_ranks(self) -> int:
        return len(self.devices)

    # -- programs -----------------------------------------------------------------------------
    def _program(self, fn, in_specs, out_specs, donate=(), **static):
        return _domain_program(self.mesh, fn, in_specs, out_specs, donate,
                               tuple(sorted(static.items())))

    def embed(self, mb: MicroBatch) -> jax.Array:
        prog = self._program(_embed, (self._whole, self._rank), self._rank)
        return prog(self.params, mb.tokens_BS)

    def layer_params(self, layer: int) -> dict:
        """Layer ``layer``'s weights; ``cfg.num_layers`` is the MTP block's decoder layer."""
        if layer == self.cfg.num_layers:
            return self.params["mtp"]["layer"]
        return self.params["layers"][layer]

    def attention(self, layer: int, x_BSD: jax.Array, mb: MicroBatch) -> jax.Array:
        """Layer ``layer``'s attention for a micro-batch; its KV pages are donated and
        replaced."""
        rank = self._rank
        prog = self._program(_attention, (self._whole, rank, rank, rank, rank),
                             (rank, rank), donate=(3,), cfg=self.cfg,
                             index=self.cfg.attention_kind_layer(layer))
        p = self.layer_params(layer)
        # Only the attention weights go in, so dense and MoE layers share one program.
        x_BSD, self.caches[layer] = prog({"input_norm": p["input_norm"], "attn": p["attn"]},
                                         x_BSD, mb.positions_BS, self.caches[layer],
                                         mb.tables_BN)
        return x_BSD

    def gate(self, layer: int, x_BSD: jax.Array, mb: MicroBatch, shared: bool = True,
             load_AE: jax.Array | None = None) -> tuple[jax.Array, ...]:
        """``(x_TD, h_TD, ids_TK, w_TK, load_AE[, shared_TD])``, rank-major on the domain
        mesh: ``load_AE`` (default ``zero_load``) plus each rank's tokens per logical expert
        (``[A, E]`` int32, stays on device); the shared-expert output only with ``shared``."""
        prog = self._program(_gate, (self._whole, self._rank, self._rank, self._rank),
                             (self._rank,) * (5 + shared), cfg=self.cfg, shared=shared)
        load_AE = self.zero_load if load_AE is None else load_AE
        return prog(self.layer_params(layer), x_BSD, mb.positions_BS, load_AE)

    def combine(self, x_TD, routed_TD, shared_TD, mb: MicroBatch) -> jax.Array:
        shape = (mb.rows, mb.width, self.cfg.hidden_size)
        prog = self._program(_combine, (self._rank,) * 3, self._rank, shape=shape)
        return prog(x_TD, routed_TD, shared_TD)

    def ffn(self, layer: int, x_BSD: jax.Array) -> jax.Array:
        prog = self._program(_ffn, (self._whole, self._rank), self._rank, cfg=self.cfg)
        return prog(self.layer_params(layer), x_BSD)

    def head(self, x_BSD: jax.Array, mb: MicroBatch) -> jax.Array:
        prog = self._program(_head, (self._whole, self._rank, self._rank), self._rank,
                             cfg=self.cfg)
        return prog(self.params, x_BSD, mb.last_B)

    def head_all(self, x_BSD: jax.Array) -> jax.Array:
        """Target logits at every position ``[A * B, S, V]`` (verification)."""
        prog = self._program(_head_all, (self._whole, self._rank), self._rank,
                             cfg=self.cfg)
        return prog(self.params, x_BSD)

    def take_last(self, x_BSD: jax.Array, last_B: jax.Array) -> jax.Array:
        prog = self._program(_take_last, (self._rank, self._rank), self._rank)
        return prog(x_BSD, last_B)

    # -- the MTP block (speculative decoding) ---------------------------------------------------
    def mtp_input(self, tokens_BS: jax.Array, hidden_BSD: jax.Array) -> jax.Array:
        """The MTP block's decoder input from (next token, target hidden) pairs."""
        prog = self._program(_mtp_input, (self._whole, self._rank, self._rank),
                             self._rank, cfg=self.cfg)
        return prog(self.params, tokens_BS, hidden_BSD)

    def mtp_next(self, draft_B: jax.Array, g_BD: jax.Array) -> jax.Array:
        """The decoder input ``[A * B, 1, D]`` of the next draft: the last draft and the MTP
        block's own output hidden."""
        prog = self._program(_mtp_next, (self._whole, self._rank, self._rank),
                             self._rank, cfg=self.cfg)
        return prog(self.params, draft_B, g_BD)

    def mtp_draft(self, x_BSD: jax.Array, last_B: jax.Array) -> tuple[jax.Array, jax.Array]:
        prog = self._program(_mtp_draft, (self._whole, self._rank, self._rank),
                             (self._rank, self._rank), cfg=self.cfg)
        return prog(self.params, x_BSD, last_B)

    def verify_tokens(self, tokens_BS: jax.Array, drafts: tuple) -> jax.Array:
        """``[t[n - 1], d_1 .. d_k]`` per row ``[A * B, k + 1]`` from a decode micro-batch's
        tokens ``[A * B, 1]`` and the drafts (``[A * B]`` each)."""
        prog = self._program(_verify_tokens, (self._rank, self._rank),
                             self._rank)
        return prog(tokens_BS, tuple(drafts))

    def place(self, index: int, rows: int, width: int, arrays: dict, seqs: list,
              items: list, kind: str) -> MicroBatch:
        """A micro-batch from rank-major inputs (host arrays are placed, device arrays kept):
        ``tokens_BS``, ``positions_BS``, ``tables_BN``, ``last_B``."""
        placed = [a if isinstance(a, jax.Array) else from_host(a, self.rank_sharding)
                  for a in (arrays[n] for n in ("tokens_BS", "positions_BS", "tables_BN",
                                                "last_B"))]
        mb = MicroBatch(self.index, index, rows, width, *placed, seqs, items)
        key = (kind,) + mb.shape_key
        if self._shapes_seen.first_launch(key, "MA stages"):
            self.compile_count += 1
            log.info("domain %d: compiling %s stages for rows x tokens x blocks %s",
                     self.index, kind, mb.shape_key)
        return mb

    # -- inputs -------------------------------------------------------------------------------
    def micro_batches(self, per_rank: list[list], micro_batches: int, rows_min: int,
                      width_min: int, kind: str) -> list[MicroBatch]:
        """Pad each micro-batch's per-rank rows to a common bucket and place them."""
        out = []
        for i, parts in enumerate(split_micro_batches(per_rank, micro_batches)):
            live = [s for part in parts for s in part]
            rows = bucket(max(len(p) for p in parts), rows_min)
            width = bucket(max(s.num_tokens for s in live), width_min)
            blocks = table_blocks(max(len(s.block_table) for s in live), self.block_size)
            batches = [_rank_rows(p, rows, width, blocks, self.block_size) for p in parts]
            arrays = {name: np.concatenate([getattr(b, name) for b in batches])
                      for name in ("tokens_BS", "positions_BS", "tables_BN", "last_B")}
            items = [s for p in parts for s in p + [None] * (rows - len(p))]
            out.append(self.place(i, rows, width, arrays,
                                  [s for b in batches for s in b.sampling_seqs], items, kind))
        return out

    # -- one rank's pages ---------------------------------------------------------------------
    def rank_pages(self, rank: int) -> list[dict]:
        """Rank ``rank``'s own per-layer pages ``[P, page, K, D]``: the shards themselves,
        valid until the next step donates the domain's pages."""
        dev = self.devices[rank]
        return [{k: next(s.data for s in v.addressable_shards if s.device == dev)
                 for k, v in layer.items()} for layer in self.caches]

    def set_rank_pages(self, rank: int, pages: list[dict]) -> None:
        """Replace rank ``rank``'s pages (e.g. KV pulled from prefill), keeping the others';
        a process that does not hold the rank's device has nothing to replace."""
        dev = self.devices[rank]
        if dev.process_index != jax.process_index():
            return
        for layer, new in zip(self.caches, pages, strict=True):
            for k, v in layer.items():
                shards = {s.device: s.data for s in v.addressable_shards}
                shards[dev] = jax.device_put(new[k], dev)
                layer[k] = jax.make_array_from_single_device_arrays(
                    v.shape, v.sharding, [shards[d] for d in self.devices if d in shards])

