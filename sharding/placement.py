"""What each role's devices hold, in bytes: the engine's placement over abstract arrays.

The parameter tree and KV pages are ``jax.eval_shape``d (nothing is allocated), given their
logical axes (``sharding.logical``) and their role's rules (``sharding.rules``) on the mesh
one program of the role runs on, an ``AbstractMesh`` (no devices needed):

=================  ==================  ===================================================
role               program mesh        holds
=================  ==================  ===================================================
prefill, decode    a group: ``(tp,)``  the whole tree (MTP blocks too when loaded), its
                                       own KV pool
decode, ``ep: N``  a rank: ``(tp,)``,  every weight but the routed experts and MTP blocks,
                   slots: ``(dp,)``    its own KV pool, and its ``slots_per_device`` of the
                                       N x S expert slots (``serving.disagg.ep_decode``)
decode_attention   a domain: ``(dp,)`` every weight but the routed experts and MTP blocks,
                                       its own KV pool; with ``shared_devices`` also a
                                       copy of the shared experts (the shared-expert
                                       program's replica over attention + shared devices)
decode_experts     routed: ``(ep,)``   routed experts in slots ``[P, ...]`` split over the
                                       routed devices (one copy for all domains); shared
                                       devices: one shared-expert copy per domain; a dense
                                       model: one MLP replica per domain on each of its
                                       trampolines (``collectives.a2e.trampoline_devices``)
=================  ==================  ===================================================

With MTP drafting (``drafting``, ``serving.core.spec_decode``, ``serving.disagg.ma_spec``)
every role but ``decode_experts`` has one more layer of KV pages (the MTP block's, indexed by
the same block tables); an MA attention rank and an EP rank also hold the first MTP block
but its routed experts, which are one more layer of slots on the expert slice.

The MA and EP decode rows mirror ``serving/disagg/ma.py``, ``ma_runner.py`` and ``ma_slices.py``,
whose specs are still written by hand; ``tests/sharding/test_engine_bytes.py`` checks every
row against the bytes the engine puts on each device.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh

from sharding.deployment import DeploymentSpec, RoleSpec
from sharding.logical import axis_units, expert_slot_axes, kv_page_axes, param_logical_axes
from sharding.rules import logical_to_spec, tree_shardings
from xds_jax.model.config import ModelConfig
from xds_jax.model.fused import fuse_projections
from xds_jax.model.out_major import out_major, prefers_out_major
from xds_jax.model.params import param_shapes
from xds_jax.model.quant import quantized_shapes
from xds_jax.model.reference import new_caches


def abstract_params(cfg: ModelConfig, dtype, with_mtp: bool = False,
                    quantization: str | None = None,
                    output_major: bool | None = None) -> dict:
    """The parameter tree a loader produces (projections fused; with ``quantization``,
    ``"int8"``: its int8 weights and scales; with ``output_major``, default on CPU, the
    layers' projections stored ``[out, in]``, ``xds_jax.model.out_major``), as
    ``ShapeDtypeStruct``s."""
    shapes = param_shapes(cfg, with_mtp=with_mtp)
    if output_major is None:
        output_major = prefers_out_major()
    layout = out_major if output_major else (lambda tree, cfg: tree)
    tree = jax.eval_shape(lambda: layout(fuse_projections(jax.tree.map(
        lambda s: jnp.zeros(s, dtype), shapes, is_leaf=lambda x: isinstance(x, tuple)), cfg),
        cfg))
    return quantized_shapes(tree, quantization)


def abstract_draft_head(path, cfg: ModelConfig, dtype) -> dict:
    """A shipped draft head's MTP block as ``load_head`` puts it in ``params["mtp"]`` (its
    block cast to ``dtype``, ``vocab_ids [N]`` and the target's head rows ``[N, D]``)."""
    from xds_jax.loading.draft_heads import head_layout, read_head

    tree, vocab_ids, _ = read_head(path)
    block = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, dtype), tree)
    block = jax.eval_shape(lambda b: head_layout(b, cfg), block)
    return block | {"vocab_ids": jax.ShapeDtypeStruct(vocab_ids.shape, jnp.int32),
                    "head": jax.ShapeDtypeStruct((len(vocab_ids), cfg.hidden_size), dtype)}


def abstract_caches(cfg: ModelConfig, num_pages: int, page_size: int, dtype,
                    drafting: bool = False) -> list[dict]:
    """Every layer's KV pages ``[num_pages, page_size, K, D]`` (with ``drafting``, the MTP
    block's after them), as ``ShapeDtypeStruct``s."""
    caches = jax.eval_shape(lambda: new_caches(cfg, num_pages, page_size, dtype))
    return caches + caches[-1:] if drafting else caches


def program_mesh(role: RoleSpec) -> AbstractMesh:
    """The mesh one program of ``role`` runs on (see the module table)."""
    if role.name in ("prefill", "decode"):
        return AbstractMesh((role.tp,), ("tp",))
    if role.name == "decode_attention":
        return AbstractMesh((role.dp,), ("dp",))
    return AbstractMesh((role.routed_devices,), ("ep",))


def device_bytes(tree, shardings) -> int:
    """Bytes one device holds of ``tree`` (rules split evenly, so every device alike)."""
    return sum(math.prod(s.shard_shape(a.shape)) * jnp.dtype(a.dtype).itemsize
               for a, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True))


def _params_bytes(tree, cfg: ModelConfig, role: str, mesh) -> int:
    logical = param_logical_axes(tree)
    return device_bytes(tree, tree_shardings(mesh, role, logical, tree, axis_units(cfg)))


def _without_experts(layer: dict) -> dict:
    return {k: ({n: w for n, w in v.items() if n != "experts"} if k == "moe" else v)
            for k, v in layer.items()}


def attention_rank_params(params: dict, drafting: bool = False) -> dict:
    """What an MA attention rank holds: everything but routed experts and MTP blocks (with
    ``drafting``, the first MTP block but its routed experts)."""
    layers = [_without_experts(layer) for layer in params["layers"]]
    out = {k: v for k, v in params.items() if k not in ("layers", "mtp")} | {"layers": layers}
    if drafting:
        block = params["mtp"][0]
        out["mtp"] = [block | {"layer": _without_experts(block["layer"])}]
    return out


def _shared_experts(params: dict) -> list[dict]:
    return [{k: layer["moe"][k] for k in ("shared", "shared_gate") if k in layer["moe"]}
            for layer in params["layers"] if "moe" in layer and "shared" in layer["moe"]]


def _expert_slots(params: dict, num_slots: int, drafting: bool = False) -> list[dict]:
    """The expert slice's slot weights ``[P, ...]`` per MoE layer (with ``drafting``, the
    first MTP block's too when it is MoE: one more layer on the slice)."""
    layers = params["layers"] + ([params["mtp"][0]["layer"]] if drafting else [])
    return [{k: jax.ShapeDtypeStruct((num_slots,) + w.shape[1:], w.dtype)
             for k, w in layer["moe"]["experts"].items()}
            for layer in layers if "moe" in layer]


def _slot_bytes(cfg: ModelConfig, role: RoleSpec, params: dict, mesh,
                drafting: bool = False) -> int:
    """Routed-expert slot bytes on each device of ``role`` (split over ``mesh``)."""
    slots = role.resolved_slots_per_device(cfg.moe.num_experts)
    tree = _expert_slots(params, role.routed_devices * slots, drafting)
    logical = [{k: expert_slot_axes(k) for k in layer} for layer in tree]
    return device_bytes(tree, tree_shardings(mesh, role.name, logical, tree))


def weight_bytes_by_device(cfg: ModelConfig, spec: DeploymentSpec, role: RoleSpec,
                           params: dict, drafting: bool = False) -> tuple[int, ...]:
    """Weight bytes on each device of ``role`` (in device order), for the abstract tree
    ``params`` (``abstract_params``, or ``jax.eval_shape`` of a loaded tree); ``drafting``:
    MTP speculative decoding is on (``params`` then has an ``"mtp"`` block)."""
    mesh = program_mesh(role)
    n = role.devices.count
    if role.expert_parallel and cfg.moe is not None:
        per = _params_bytes(attention_rank_params(params, drafting), cfg, role.name, mesh)
        slots = _slot_bytes(cfg, role, params, AbstractMesh((n,), ("dp",)), drafting)
        return (per + slots,) * n
    if role.name in ("prefill", "decode"):
        return (_params_bytes(params, cfg, role.name, mesh),) * n
    experts = spec.roles.get("decode_experts")
    shared = _shared_experts(params)
    shared_apart = bool(experts and experts.shared_devices and cfg.moe and shared)
    one = AbstractMesh((1,), ("ep",))
    if role.name == "decode_attention":
        per = _params_bytes(attention_rank_params(params, drafting), cfg, role.name, mesh)
        if shared_apart:
            per += _params_bytes(shared, cfg, role.name, one)
        return (per,) * n
    attn = spec.roles["decode_attention"]
    out = [0] * n
    if cfg.moe is None:  # dense FFN replicas on each domain's trampolines
        from collectives.a2e import trampoline_devices

        ffn = [{"post_norm": layer["post_norm"], "mlp": layer["mlp"]}
               for layer in params["layers"]]
        per = _params_bytes(ffn, cfg, role.name, one)
        for i in trampoline_devices(list(range(n)), attn.dp):
            out[i] += attn.domains * per
        return tuple(out)
    routed = _slot_bytes(cfg, role, params, mesh, drafting)
    out[: role.routed_devices] = [routed] * role.routed_devices
    if shared_apart:
        per = _params_bytes(shared, cfg, role.name, one)
        out[role.routed_devices:] = [attn.domains * per] * role.shared_devices
    return tuple(out)


def kv_bytes_per_device(cfg: ModelConfig, role: RoleSpec, num_pages: int, page_size: int,
                        dtype, drafting: bool = False) -> int:
    """KV bytes on each device of ``role`` for a pool of ``num_pages`` pages per group (per
    attention rank; with ``drafting``, the MTP block's pages too); 0 for the expert slice."""
    if role.name == "decode_experts":
        return 0
    mesh = program_mesh(role)
    axes = kv_page_axes(cfg)
    owners = logical_to_spec(role.name, axes, mesh_shape=dict(mesh.shape))[0]
    owners = (owners,) if isinstance(owners, str) else owners or ()
    pages = num_pages * math.prod(mesh.shape[a] for a in owners)  # one pool per owner
    caches = abstract_caches(cfg, pages, page_size, dtype, drafting)
    logical = jax.tree.map(lambda _: axes, caches)
    return device_bytes(caches, tree_shardings(mesh, role.name, logical, caches,
                                               axis_units(cfg)))
