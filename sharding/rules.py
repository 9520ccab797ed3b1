"""Logical axes to mesh axes, per role: the one table of partition rules.

Arrays carry logical axis names (``sharding.logical``). Each role has one rules table in
Flax's format, ``(logical axis, mesh axes)`` pairs, resolved by
``flax.linen.logical_to_mesh_axes`` as in MaxText (a mesh axis splits at most one dim of an
array). Every table lists every logical axis, so it reads as the whole picture of the role:

=============  ==================  ==================  ==================  ==================
logical        prefill             decode              decode_attention    decode_experts
=============  ==================  ==================  ==================  ==================
batch          dp                  dp                  (domain, dp)        ep
kv_pages       dp                  dp                  (domain, dp)        -
heads          tp                  tp                  -                   -
kv_heads       tp                  tp                  -                   -
mlp            tp                  tp                  -                   -
expert_slots   -                   dp (with ``ep``)    -                   ep
anything else  -                   -                   -                   -
=============  ==================  ==================  ==================  ==================

A fifth table, ``transfer``, is for the union mesh of an attention domain and another slice
that the MA hops run on (axis ``u``): ``batch`` -> ``u``, one block of rows per device.

What that means for the engine: a prefill group (one ``dp`` row) splits attention heads and
MLP / shared / routed expert widths over its ``tp`` devices and holds every expert, the
whole vocabulary and its own KV pages; a decode group (TP = 1) holds the whole model, every
expert included, and its own pages; in a decode role with ``ep: N`` each device is a DP rank
holding every weight but the routed experts, its own pages, and ``slots_per_device`` of the
physical expert slots, split over the role's devices on the ``dp`` axis (the engine's
``("ep",)`` mesh of the same devices); an attention rank holds every weight but the routed
experts, and its own pages; the expert slice spreads physical expert slots over its routed
devices.

Programs run on a slice of the role mesh (a prefill group's ``("tp",)`` row, an attention
domain's ``("dp",)`` row): mesh axes the slice lacks have size 1 there and are dropped. A
dim whose units (heads for a heads dim, else its size) the mesh axes do not divide is
replicated, e.g. 2 KV heads under TP = 4 keep a full copy on every TP rank.
"""

from __future__ import annotations

import math

import jax
from flax.linen import logical_to_mesh_axes
from jax.sharding import NamedSharding, PartitionSpec

from sharding.logical import LOGICAL_AXES

MeshAxes = str | tuple[str, ...] | None
UNION_AXIS = "u"  # the mesh axis of an attention domain joined with another slice


def _table(**split: MeshAxes) -> tuple[tuple[str, MeshAxes], ...]:
    """Every logical axis, ``None`` unless ``split`` names its mesh axes."""
    unknown = set(split) - set(LOGICAL_AXES)
    assert not unknown, unknown
    return tuple((name, split.get(name)) for name in LOGICAL_AXES)


_TP = _table(batch="dp", kv_pages="dp", heads="tp", kv_heads="tp", mlp="tp")

RULES: dict[str, tuple[tuple[str, MeshAxes], ...]] = {
    "prefill": _TP,
    # expert_slots only ever split in an EP decode role (a group alone holds logical experts)
    "decode": _table(batch="dp", kv_pages="dp", heads="tp", kv_heads="tp", mlp="tp",
                     expert_slots="dp"),
    "decode_attention": _table(batch=("domain", "dp"), kv_pages=("domain", "dp")),
    "decode_experts": _table(batch="ep", expert_slots="ep"),
    "transfer": _table(batch=UNION_AXIS),
}


class ShardingRuleError(KeyError):
    """Unknown role or logical axis."""


def rules_for(role: str) -> tuple[tuple[str, MeshAxes], ...]:
    if role not in RULES:
        raise ShardingRuleError(f"no partition rules for role {role!r}; roles: {sorted(RULES)}")
    return RULES[role]


def _names(axes: MeshAxes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_spec(role: str, logical: tuple[str | None, ...], shape=None,
                    mesh_shape: dict | None = None, units: dict | None = None) -> PartitionSpec:
    """PartitionSpec for an array with these logical axes on (a slice of) ``role``'s mesh.

    With ``mesh_shape``, mesh axes it lacks (or of size 1) are dropped; with ``shape`` too,
    a dim the remaining axes do not divide is replicated (``units`` gives a logical axis's
    count in whole units, e.g. heads, when that is not the dim's size).
    """
    for name in logical:
        if name is not None and name not in LOGICAL_AXES:
            raise ShardingRuleError(f"unknown logical axis {name!r}; axes: {LOGICAL_AXES}")
    spec = logical_to_mesh_axes(logical, rules_for(role))
    out = []
    for i, (name, axes) in enumerate(zip(logical, spec, strict=True)):
        names = _names(axes)
        if mesh_shape is not None:
            names = tuple(a for a in names if mesh_shape.get(a, 1) > 1)
            if names and shape is not None:
                count = (units or {}).get(name, shape[i])
                if count % math.prod(mesh_shape[a] for a in names):
                    names = ()
        out.append(None if not names else names[0] if len(names) == 1 else names)
    return PartitionSpec(*out)


def program_spec(mesh, role: str, *logical: str | None) -> PartitionSpec:
    """Spec of a program argument or result on ``mesh`` (a role's mesh or a slice of it):
    the role's rules, keeping the mesh axes ``mesh`` has, size 1 included, so a
    ``shard_map`` sees one block per device (``program_spec(mesh, role)`` is replicated).
    Micro-batch rows, hop payloads and service inputs get their specs here."""
    for name in logical:
        if name is not None and name not in LOGICAL_AXES:
            raise ShardingRuleError(f"unknown logical axis {name!r}; axes: {LOGICAL_AXES}")
    have = set(mesh.axis_names)
    out = []
    for axes in logical_to_mesh_axes(logical, rules_for(role)):
        names = tuple(a for a in _names(axes) if a in have)
        out.append(None if not names else names[0] if len(names) == 1 else names)
    return PartitionSpec(*out)


def named_sharding(mesh, role: str, logical: tuple[str | None, ...], shape=None,
                   units: dict | None = None) -> NamedSharding:
    """``NamedSharding`` on ``mesh`` (the role's mesh, a slice of it, or an
    ``AbstractMesh``) for the given logical axes."""
    return NamedSharding(mesh, logical_to_spec(role, logical, shape, dict(mesh.shape), units))


def tree_shardings(mesh, role: str, logical_tree, arrays, units: dict | None = None):
    """A ``NamedSharding`` per leaf of ``arrays`` (arrays or ``ShapeDtypeStruct``s), from the
    matching leaf of ``logical_tree`` (tuples of logical axes)."""
    return jax.tree.map(lambda axes, a: named_sharding(mesh, role, axes, a.shape, units),
                        logical_tree, arrays, is_leaf=lambda x: isinstance(x, tuple))
