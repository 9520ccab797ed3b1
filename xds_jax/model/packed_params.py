"""A model's parameters as one device's step program takes them: its matrices as they are, its
vectors (norm weights, biases, int8 scales) packed into one buffer per dtype.

A jitted call pays for each argument leaf as it dispatches (flattening, signature checks,
buffer holds: ~2.4 us a leaf on the CPUs here), and decode launches a step every few
milliseconds. SmolLM2 has 182 parameter leaves (61 vectors), and 303 with int8 weights (182:
each matrix's scales), so an int8 batch-32 step spent ~1.5 ms dispatching, 3% of the step and
nearly all of the host's time per step; packed, 123 leaves dispatch in ~0.75 ms
(docs/performance.md). Inside the program the vectors are static slices of their buffer, which
fuse into their consumers (a kernel's operand is a copy of a few KB).

``pack`` builds it once (``serving.core.runner.ModelRunner`` on one device; a tensor-parallel
group keeps the tree, whose vectors are sharded differently); ``model_step`` takes either form
(``as_tree``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where each leaf of the tree ``treedef`` is: ``("matrix", index)`` into ``matrices``, or
    ``("vector", buffer, offset, shape)``: ``size(shape)`` values at ``offset`` of buffer
    ``buffer`` (an index into ``vectors``). Static: hashed with the program."""

    treedef: Any
    leaves: tuple


@functools.partial(jax.tree_util.register_dataclass, data_fields=["matrices", "vectors"],
                   meta_fields=["layout"])
@dataclasses.dataclass(frozen=True)
class PackedParams:
    matrices: tuple
    vectors: tuple
    layout: Layout


def _is_vector(leaf: Any) -> bool:
    return isinstance(leaf, jax.Array) and leaf.ndim <= 1


def pack(params: dict, put: Callable[[np.ndarray], jax.Array] = jnp.asarray,
         host: dict | None = None) -> PackedParams:
    """``params`` (every leaf on one device) with its vectors packed, one buffer per dtype:
    joined on the host from ``host`` (the same tree as host values; default ``params``) and
    placed by ``put`` (beside the matrices: on another process's device the arrays cannot be
    read here)."""
    leaves, treedef = jax.tree.flatten(params)
    values = leaves if host is None else treedef.flatten_up_to(host)
    dtypes = sorted({str(leaf.dtype) for leaf in leaves if _is_vector(leaf)})
    offsets = dict.fromkeys(dtypes, 0)
    parts: dict[str, list] = {d: [] for d in dtypes}
    matrices, where = [], []
    for leaf, value in zip(leaves, values, strict=True):
        if not _is_vector(leaf):
            where.append(("matrix", len(matrices)))
            matrices.append(leaf)
            continue
        dtype = str(leaf.dtype)
        where.append(("vector", dtypes.index(dtype), offsets[dtype], tuple(leaf.shape)))
        offsets[dtype] += leaf.size
        parts[dtype].append(np.asarray(value, dtype=leaf.dtype).reshape(-1))
    vectors = tuple(put(np.concatenate(parts[d])) for d in dtypes)
    return PackedParams(tuple(matrices), vectors, Layout(treedef, tuple(where)))


def unpack(packed: PackedParams) -> dict:
    """The parameter tree again (inside a program: the vectors as slices of their buffers)."""
    leaves = []
    for place in packed.layout.leaves:
        if place[0] == "matrix":
            leaves.append(packed.matrices[place[1]])
            continue
        _, buffer, offset, shape = place
        size = int(np.prod(shape, dtype=np.int64))
        leaves.append(packed.vectors[buffer][offset:offset + size].reshape(shape))
    return jax.tree.unflatten(packed.layout.treedef, leaves)


def as_tree(params: dict | PackedParams) -> dict:
    """``params`` as a tree, whichever form it comes in."""
    return unpack(params) if isinstance(params, PackedParams) else params
