"""Checkpoint tensors to the parameter tree, through a declarative key map per architecture.

A ``TensorSource`` hands out named host arrays (safetensors shards or a GGUF file); a
``KeyMap`` names, for each leaf of ``params.param_shapes``, the checkpoint tensor(s) it comes
from. ``assemble`` checks every shape and reports missing or mis-shaped tensors by name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np

from xds_jax.errors import WeightLoadError
from xds_jax.model.config import ModelConfig
from xds_jax.model.params import param_shapes


class TensorSource(Protocol):
    def names(self) -> Iterable[str]: ...

    def get(self, name: str) -> np.ndarray: ...


@dataclasses.dataclass(frozen=True)
class Leaf:
    """Where one parameter comes from: ``names`` (stacked when several) and a transform."""

    names: tuple[str, ...]
    transform: Callable[[np.ndarray], np.ndarray] = lambda a: a
    optional: bool = False


def transpose(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a.T)


def transpose_last2(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.swapaxes(a, -1, -2))


def expand_blocks(scale: np.ndarray, block: tuple[int, int], rows: int,
                  cols: int) -> np.ndarray:
    """One value per ``block`` of the last two dimensions, repeated over its block's
    ``[rows, cols]`` elements; edge blocks are cut short (DeepSeek's FP8 blocks,
    compressed-tensors' ``block`` strategy)."""
    full = np.repeat(np.repeat(scale, block[0], axis=-2)[..., :rows, :], block[1], axis=-1)
    return full[..., :cols]


def first_present(src_names: set[str], *candidates: str) -> str:
    """The first candidate the checkpoint has (or the first, to be reported missing)."""
    for name in candidates:
        if name in src_names:
            return name
    return candidates[0]


def _load_leaf(src: TensorSource, leaf: Leaf, shape: tuple, path: str) -> np.ndarray:
    arrays = [src.get(n) for n in leaf.names]
    raw = arrays[0] if len(arrays) == 1 else np.stack(arrays)
    out = leaf.transform(raw)
    if tuple(out.shape) != tuple(shape):
        raise WeightLoadError(
            f"tensor {leaf.names[0]!r} (for {path}) has shape {tuple(raw.shape)}, "
            f"expected {tuple(shape)} after layout conversion"
        )
    return out


def assemble(cfg: ModelConfig, src: TensorSource, keymap: dict, dtype, with_mtp: bool,
             progress: Callable[[int], None] | None = None) -> dict:
    """Build the parameter tree, converting each tensor once to ``dtype`` on the host.

    Args:
      keymap: a tree with the structure of ``param_shapes`` whose leaves are ``Leaf``.
    """
    shapes = param_shapes(cfg, with_mtp=with_mtp)
    shape_leaves, treedef = jax.tree_util.tree_flatten_with_path(
        shapes, is_leaf=lambda x: isinstance(x, tuple)
    )
    map_leaves = treedef.flatten_up_to(keymap)
    available = set(src.names())
    missing = [n for leaf in map_leaves for n in leaf.names if n not in available]
    if missing:
        shown = ", ".join(repr(n) for n in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise WeightLoadError(f"checkpoint is missing tensor(s) {shown}{more}")
    out = []
    np_dtype = jnp.dtype(dtype)
    for (path, shape), leaf in zip(shape_leaves, map_leaves, strict=True):
        arr = _load_leaf(src, leaf, shape, jax.tree_util.keystr(path))
        out.append(jnp.asarray(arr.astype(np.float32).astype(np_dtype)))
        if progress is not None:
            progress(1)
    return jax.tree_util.tree_unflatten(treedef, out)
