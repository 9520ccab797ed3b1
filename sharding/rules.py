"""Logical axes to mesh axes, per role: the one table of partition rules.

Arrays are annotated with logical axis names (``batch``, ``vocab``, ``embed``, ``heads``,
``kv_heads``, ``mlp``, ``experts``; ``None`` for an unsharded dim). The rules say which
mesh axes of a role's mesh split each logical axis. ``experts`` means physical expert
slots (``collectives.expert_map``), so expert parallelism always divides evenly.
"""

from __future__ import annotations

from jax.sharding import NamedSharding, PartitionSpec

LOGICAL_AXES = ("batch", "vocab", "embed", "heads", "kv_heads", "mlp", "experts")

_TP = {"batch": "dp", "vocab": "tp", "embed": None, "heads": "tp", "kv_heads": "tp",
       "mlp": "tp", "experts": ("dp", "tp")}

RULES: dict[str, dict[str, str | tuple[str, ...] | None]] = {
    # Prefill and colocated decode: DP groups of TP; experts parallel over the whole role.
    "prefill": _TP,
    "decode": _TP,
    # Attention ranks hold full replicas of the dense weights (TP = 1); batch over all.
    "decode_attention": {"batch": ("domain", "dp"), "vocab": None, "embed": None,
                         "heads": None, "kv_heads": None, "mlp": None, "experts": None},
    # The expert slice holds slots; tokens arrive through A2E, not as a sharded batch.
    "decode_experts": {"batch": None, "vocab": None, "embed": None, "heads": None,
                       "kv_heads": None, "mlp": None, "experts": "ep"},
}


class ShardingRuleError(KeyError):
    """Unknown role or logical axis."""


def mesh_axes_for(role: str, logical: str | None):
    if logical is None:
        return None
    if role not in RULES:
        raise ShardingRuleError(f"no partition rules for role {role!r}; roles: {sorted(RULES)}")
    if logical not in RULES[role]:
        raise ShardingRuleError(f"unknown logical axis {logical!r}; axes: {LOGICAL_AXES}")
    return RULES[role][logical]


def _size(mesh_shape: dict, axes) -> int:
    names = (axes,) if isinstance(axes, str) else axes
    size = 1
    for a in names:
        size *= mesh_shape[a]
    return size


def logical_to_spec(role: str, logical: tuple[str | None, ...], shape=None,
                    mesh_shape: dict | None = None) -> PartitionSpec:
    """PartitionSpec for an array with these logical axes on ``role``'s mesh.

    With ``shape`` and ``mesh_shape`` a dim the mesh axes do not divide is replicated
    (e.g. 2 KV heads under TP = 4 keep a full copy on every TP rank).
    """
    out = []
    for i, name in enumerate(logical):
        axes = mesh_axes_for(role, name)
        if axes is not None and shape is not None and mesh_shape is not None:
            if shape[i] % _size(mesh_shape, axes):
                axes = None
        out.append(axes)
    return PartitionSpec(*out)


def named_sharding(mesh, role: str, logical: tuple[str | None, ...], shape=None) -> NamedSharding:
    """``NamedSharding`` on ``mesh`` (the role's mesh) for the given logical axes."""
    return NamedSharding(mesh, logical_to_spec(role, logical, shape, dict(mesh.shape)))
