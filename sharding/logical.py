"""Logical axis names of every array that crosses devices: weights, KV pages, expert slots.

Each dimension gets a name saying what it indexes; ``sharding.rules`` maps names to mesh
axes per role. The names:

==============  ===========================================================================
``batch``       rows of a step (tokens of a micro-batch)
``vocab``       the token vocabulary (embedding rows, LM head columns)
``embed``       the model's hidden size D
``heads``       query heads, flattened with their head dim (splits whole heads only)
``kv_heads``    key/value heads (GQA), flattened likewise; a KV page's head axis
``head_dim``    one head's dims (q/k norms, a KV page's last axis)
``latent``      MLA's low-rank dims (``q_lora_rank``, ``kv_lora_rank`` + rope)
``mlp``         the hidden width F of a dense MLP, shared expert or routed expert
``experts``     logical experts (router columns, expert weights ``[E, D, F]``)
``expert_slots`` physical expert slots on the expert slice (``[P, D, F]``, P = devices x S)
``kv_pages``    pages of a KV pool
``page``        token slots within a page
==============  ===========================================================================

A projection stored output-major (``<name>_t``, ``xds_jax.model.out_major``) has its
weight's axes reversed. An int8 weight's per-output-channel scales (``<name>_scale``,
``xds_jax.model.quant``) take the weight's axes less its input axis, so they split exactly as
the columns they scale.

``None`` marks a dim no rule may split (MTP's concatenated ``[2D]`` input, a one-column gate,
MLA's single latent KV head). Parameter axes come from a parameter's path in the tree that
``xds_jax.model.params.param_shapes`` describes, so they fit every loader's output.
"""

from __future__ import annotations

import jax

from xds_jax.model.config import ModelConfig
from xds_jax.model.out_major import OUT_MAJOR_LEAVES
from xds_jax.model.quant import SCALE_SUFFIX, TRANSPOSED_SUFFIX, contract_axis

LOGICAL_AXES = ("batch", "vocab", "embed", "heads", "kv_heads", "head_dim", "latent", "mlp",
                "experts", "expert_slots", "kv_pages", "page")

# Leaf name -> logical axes, for the leaves of the attention, MLP, MoE and top-level dicts.
# Norms not listed here are over the hidden size.
_LEAF_AXES = {
    "embed": ("vocab", "embed"),
    "lm_head": ("embed", "vocab"),
    "q": ("embed", "heads"),
    "k": ("embed", "kv_heads"),
    "v": ("embed", "kv_heads"),
    "kv": ("embed", "kv_heads"),  # fused, grouped by KV head (xds_jax.model.fused)
    "kv_bias": ("kv_heads",),
    # q and kv fused (xds_jax.model.fused.fuse_query): only where a layer stays on one device
    "qkv": ("embed", None),
    "qkv_bias": (None,),
    "o": ("heads", "embed"),
    "q_bias": ("heads",),
    "k_bias": ("kv_heads",),
    "v_bias": ("kv_heads",),
    "o_bias": ("embed",),
    "q_norm": ("head_dim",),
    "k_norm": ("head_dim",),
    "q_a": ("embed", "latent"),
    "q_a_norm": ("latent",),
    "q_b": ("latent", "heads"),
    "kv_a": ("embed", "latent"),
    "kv_a_norm": ("latent",),
    "kv_b": ("latent", "heads"),
    "gate": ("embed", "mlp"),
    "up": ("embed", "mlp"),
    "down": ("mlp", "embed"),
    "gate_up": ("embed", "mlp"),  # fused, gate/up columns interleaved
    "gate_up_bias": ("mlp",),
    "gate_bias": ("mlp",),
    "up_bias": ("mlp",),
    "down_bias": ("embed",),
    "router": ("embed", "experts"),
    "router_bias": ("experts",),
    "shared_gate": ("embed", None),
    "eh_proj": (None, "embed"),
    # a draft head's own vocabulary (xds_jax.model.mtp): its target ids and their head rows
    "vocab_ids": ("vocab",),
    "head": ("vocab", "embed"),
}
_EXPERT_LEAVES = {"gate", "up", "down"}


class UnknownParameterError(KeyError):
    """A parameter path this module gives no logical axes (declare it in ``_LEAF_AXES``)."""


def _names(path: tuple) -> list[str]:
    return [str(getattr(p, "key", getattr(p, "idx", p))) for p in path]


def _drop_input_axis(axes: tuple, weight: str) -> tuple:
    return tuple(a for i, a in enumerate(axes) if i != len(axes) + contract_axis(weight))


def axes_for_path(path: tuple) -> tuple[str | None, ...]:
    """Logical axes of the parameter at ``path`` (a ``jax.tree_util`` key path)."""
    return _axes_for_names(_names(path))


def _axes_for_names(names: list[str]) -> tuple[str | None, ...]:
    leaf = names[-1]
    if leaf.endswith(SCALE_SUFFIX):
        weight = leaf[: -len(SCALE_SUFFIX)]
        return _drop_input_axis(_axes_for_names(names[:-1] + [weight]), weight)
    base = leaf.removesuffix(TRANSPOSED_SUFFIX)
    if base != leaf and base in OUT_MAJOR_LEAVES:  # stored [out, in] (xds_jax.model.out_major)
        return _axes_for_names(names[:-1] + [base])[::-1]
    if len(names) > 1 and names[-2] == "experts" and leaf in _EXPERT_LEAVES:
        return ("experts",) + _LEAF_AXES[leaf]
    if leaf in _LEAF_AXES:
        return _LEAF_AXES[leaf]
    if leaf.endswith("norm"):
        return ("embed",)
    raise UnknownParameterError(f"no logical axes for parameter {'/'.join(names)!r}")


def param_logical_axes(params) -> dict:
    """The tree of ``params`` (arrays, ``ShapeDtypeStruct``s or shape tuples) with each leaf
    replaced by its logical axes; a rank mismatch is an error, not a silent replica."""

    def one(path, leaf):
        axes = axes_for_path(path)
        ndim = len(leaf) if isinstance(leaf, tuple) else leaf.ndim
        if len(axes) != ndim:
            raise UnknownParameterError(f"{'/'.join(_names(path))}: {ndim} dims, logical axes "
                                        f"{axes}")
        return axes

    return jax.tree_util.tree_map_with_path(one, params, is_leaf=lambda x: isinstance(x, tuple))


def kv_page_axes(cfg: ModelConfig) -> tuple[str | None, ...]:
    """Axes of one layer's KV page array ``[P, page, K, D]``: GQA pages split by KV heads,
    MLA's single latent head never."""
    if cfg.mla is not None:
        return ("kv_pages", "page", None, "latent")
    return ("kv_pages", "page", "kv_heads", "head_dim")


def expert_slot_axes(leaf: str) -> tuple[str | None, ...]:
    """Axes of the expert slice's slot weights ``[P, D, F]`` / ``[P, F, D]`` (and of int8
    weights' scales ``[P, F]`` / ``[P, D]``)."""
    if leaf.endswith(SCALE_SUFFIX):
        weight = leaf[: -len(SCALE_SUFFIX)]
        return ("expert_slots",) + _drop_input_axis(_LEAF_AXES[weight], weight)
    return ("expert_slots",) + _LEAF_AXES[leaf]


def axis_units(cfg: ModelConfig) -> dict[str, int]:
    """Logical axes whose dims split only in whole units: a flattened heads dim splits by
    heads (a head never straddles two devices), not by its size."""
    return {"heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads}
