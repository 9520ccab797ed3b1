"""Where every weight and KV page goes on a tensor-parallel group's mesh.

Each parameter gets logical axes (``sharding.rules``) from its place in the tree: attention
projections split by heads, MLP and expert matrices by their hidden ``mlp`` dimension, the
rest (embeddings, norms, routers, MLA's latent projections) replicated. A dimension splits
only when the head count (not just the flattened size) divides by the TP degree, so a head
never straddles two devices; otherwise it stays whole. XLA's SPMD partitioner inserts the
collectives (all-reduce after the output and down projections), so the stage functions run
unchanged under any sharding.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sharding.rules import logical_to_spec
from xds_jax.model.config import ModelConfig

_ATTN_OUT = {"q", "q_b", "kv_b"}  # [in, heads * dh]: split the output by query heads
_KV_OUT = {"k", "v"}  # [in, kv_heads * dh]
_IN_UP = {"gate", "up"}  # [.., D, F]
_DOWN = {"down"}  # [.., F, D]


def _name(entry) -> str:
    return str(getattr(entry, "key", getattr(entry, "idx", entry)))


def param_logical_axes(path: tuple, ndim: int, cfg: ModelConfig, tp: int) -> tuple:
    """Logical axes of one weight, from its path in the parameter tree."""
    names = [_name(p) for p in path]
    leaf = names[-1]
    none = (None,) * ndim
    heads_ok = cfg.num_heads % tp == 0
    kv_ok = cfg.num_kv_heads % tp == 0 and cfg.mla is None
    if "attn" in names:
        if leaf in _ATTN_OUT and heads_ok:
            return none[:-1] + ("heads",)
        if leaf in ("q_bias",) and heads_ok:
            return ("heads",)
        if leaf in _KV_OUT and kv_ok:
            return none[:-1] + ("kv_heads",)
        if leaf in ("k_bias", "v_bias") and kv_ok:
            return ("kv_heads",)
        if leaf == "o" and heads_ok:
            return ("heads",) + none[1:]
        return none
    if "mlp" in names or "shared" in names or "experts" in names:
        if leaf in _IN_UP:
            return none[:-1] + ("mlp",)
        if leaf in _DOWN:
            return none[:-2] + ("mlp", None)
        if leaf in ("gate_bias", "up_bias"):
            return ("mlp",)
    return none


def param_shardings(params: dict, cfg: ModelConfig, mesh: Mesh, role: str = "prefill") -> dict:
    """A ``NamedSharding`` for every leaf of ``params`` on ``mesh`` (axes ``tp``, maybe ``dp``)."""
    tp = dict(mesh.shape).get("tp", 1)
    mesh_shape = dict(mesh.shape)

    def one(path, leaf):
        logical = param_logical_axes(path, leaf.ndim, cfg, tp)
        return NamedSharding(mesh, logical_to_spec(role, logical, leaf.shape, mesh_shape))

    return jax.tree_util.tree_map_with_path(one, params)


def kv_page_sharding(cfg: ModelConfig, mesh: Mesh) -> NamedSharding:
    """KV pages ``[P, page, K, D]``: split by KV heads when TP divides them (GQA); MLA's
    single latent head is replicated on every TP rank."""
    tp = dict(mesh.shape).get("tp", 1)
    heads, _ = cfg.kv_cache_dims()
    split = "tp" if tp > 1 and cfg.mla is None and heads % tp == 0 else None
    return NamedSharding(mesh, PartitionSpec(None, None, split, None))


def tp_mesh(devices: list) -> Mesh:
    """A one-axis ``tp`` mesh over a group's devices."""
    return Mesh(np.array(devices), ("tp",))
