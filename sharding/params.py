"""Where a group's weights and KV pages go: the logical axes (``sharding.logical``) through
the role's rules (``sharding.rules``), on the group's mesh.

With the prefill / decode rules on a ``("tp",)`` group mesh: attention projections split by
heads, MLP and expert matrices by their hidden width, the rest (embeddings, LM head, norms,
routers, MLA's latent projections) replicated; KV pages split by KV heads when TP divides
them. XLA's SPMD partitioner inserts the collectives (all-reduce after the output and down
projections), so the stage functions run unchanged under any sharding.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sharding.logical import axis_units, kv_page_axes, param_logical_axes
from sharding.rules import tree_shardings
from xds_jax.model.config import ModelConfig


def param_shardings(params, cfg: ModelConfig, mesh, role: str = "prefill"):
    """A ``NamedSharding`` for every leaf of ``params`` (arrays or ``ShapeDtypeStruct``s)."""
    return tree_shardings(mesh, role, param_logical_axes(params), params, axis_units(cfg))


def kv_page_shardings(caches, cfg: ModelConfig, mesh, role: str = "prefill"):
    """A ``NamedSharding`` for every layer's KV page arrays ``[P, page, K, D]`` in
    ``caches`` (a list of dicts, as ``xds_jax.model.reference.new_caches`` makes)."""
    axes = kv_page_axes(cfg)
    logical = jax.tree.map(lambda _: axes, caches)
    return jax.tree.map(_without_trailing_nones,
                        tree_shardings(mesh, role, logical, caches, axis_units(cfg)))


def _without_trailing_nones(sharding: NamedSharding) -> NamedSharding:
    """``P(None, None, 'tp')`` for ``P(None, None, 'tp', None)``: the spelling a step program
    gives the (donated) pages it returns. Called with the other spelling, the same program
    is another one to JAX, compiled again at the first step after any compiled ahead."""
    spec = list(sharding.spec)
    while spec and spec[-1] is None:
        spec.pop()
    return NamedSharding(sharding.mesh, PartitionSpec(*spec))


def tp_mesh(devices: list) -> Mesh:
    """A one-axis ``tp`` mesh over a group's devices (one ``dp`` row of the role mesh)."""
    return Mesh(np.array(devices), ("tp",))
