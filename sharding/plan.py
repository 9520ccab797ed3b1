"""``xds plan``: bytes per device and the largest batch and context a deployment fits.

Per role: parameter bytes per device under the partition rules (TP splits heads, MLP and
vocab; experts are spread over slots), KV bytes per token per device, the fixed dispatch
buffers (send + receive, dispatch + combine, first capacity bucket; decode steps carry one
token per sequence, prefill steps a ``PREFILL_CHUNK``-token chunk), and from the memory
left the largest batch at the model's full context and the longest context at batch 1.
Activations are covered by a flat reserve (``RESERVE_FRACTION`` of device memory).

Usage: ``xds plan --model M --deployment D`` or ``python -m sharding.plan ...``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass

from sharding.deployment import DeploymentError, DeploymentSpec, RoleSpec, read_deployment

RESERVE_FRACTION = 0.1
PREFILL_CHUNK = 2048  # tokens per prefill DP group per step, for the dispatch buffers
_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
GIB = 1 << 30


@dataclass(frozen=True)
class RolePlan:
    role: str
    devices: str  # "start..stop-1"
    mesh: dict
    param_bytes: int
    kv_bytes_per_token: int
    dispatch_bytes: int
    free_bytes: int
    max_batch: int  # sequences per device at the model's full context
    max_context: int  # tokens of one sequence per device (capped at the model's maximum)
    note: str = ""


@dataclass(frozen=True)
class Plan:
    model: str
    deployment: str
    dtype: str
    memory_per_device: int
    roles: tuple[RolePlan, ...]


def param_groups(cfg) -> dict[str, int]:
    """Parameter counts by how they shard: attention, dense MLP, vocab, replicated, experts."""
    d, h = cfg.hidden_size, cfg.num_heads
    if cfg.mla is not None:
        m = cfg.mla
        qk = m.qk_nope_head_dim + m.qk_rope_head_dim
        q = (d * m.q_lora_rank + m.q_lora_rank * h * qk + m.q_lora_rank) if m.q_lora_rank \
            else d * h * qk
        attn = (q + d * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank
                + m.kv_lora_rank * h * (m.qk_nope_head_dim + m.v_head_dim) + h * m.v_head_dim * d)
    else:
        attn = d * h * cfg.head_dim + 2 * d * cfg.num_kv_heads * cfg.head_dim \
            + h * cfg.head_dim * d
    moe_layers = [i for i in range(cfg.num_layers) if cfg.is_moe_layer(i)]
    dense_layers = cfg.num_layers - len(moe_layers)
    groups = {
        "attention": attn * cfg.num_layers,
        "dense_mlp": 3 * d * cfg.intermediate_size * dense_layers,
        "vocab": cfg.vocab_size * d * (1 if cfg.tie_word_embeddings else 2),
        "replicated": 2 * d * cfg.num_layers + d,
        "expert": 0,  # one routed expert, all MoE layers
        "shared_experts": 0,
    }
    if cfg.moe is not None:
        e = cfg.moe
        groups["replicated"] += (d * e.num_experts + e.num_experts) * len(moe_layers)
        groups["expert"] = 3 * d * e.moe_intermediate_size * len(moe_layers)
        groups["shared_experts"] = 3 * d * e.shared_intermediate_size * len(moe_layers)
    return groups


def _kv_per_token(cfg, tp: int, item: int) -> int:
    if cfg.mla is not None:
        return cfg.kv_bytes_per_token(item)  # one latent head: replicated over TP
    heads = cfg.num_kv_heads // tp if cfg.num_kv_heads % tp == 0 else 1
    return 2 * heads * cfg.head_dim * cfg.num_layers * item


def _dispatch_bytes(tokens: int, top_k: int, ranks: int, hidden: int, item: int) -> int:
    from collectives.ep_moe import capacity_buckets

    cap = capacity_buckets(max(tokens, 1), top_k, ranks)[0]
    return 4 * ranks * cap * hidden * item  # send + recv, dispatch + combine


def _fit(mem: int, params: int, kv_token: int, max_pos: int, dispatch_for) -> tuple:
    """(max_batch, max_context, dispatch_bytes, free) with dispatch sized for that batch."""
    batch, disp = 1, dispatch_for(1)
    for _ in range(8):  # dispatch buffers grow with the batch they carry
        free = int(mem * (1 - RESERVE_FRACTION)) - params - disp
        new_batch = max(free // (kv_token * max_pos), 0) if kv_token else 0
        if new_batch == batch:
            break
        batch, disp = new_batch, dispatch_for(max(new_batch, 1))
    free = int(mem * (1 - RESERVE_FRACTION)) - params - disp
    context = min(max_pos, max(free // kv_token, 0)) if kv_token else 0
    return batch, context, disp, free


def _role_plan(cfg, spec: DeploymentSpec, role: RoleSpec, item: int, mem: int) -> RolePlan:
    g = param_groups(cfg)
    moe = cfg.moe
    k = moe.num_experts_per_tok if moe else 0
    n = role.devices.count
    rng = f"{role.devices.start}..{role.devices.stop - 1}"
    mesh = dict(zip(role.mesh_axes, role.mesh_shape, strict=True))
    experts_role = spec.roles.get("decode_experts")
    if role.name in ("prefill", "decode"):
        tp = role.tp
        slots = math.ceil(moe.num_experts / n) if moe else 0
        params = ((g["attention"] + g["dense_mlp"] + g["vocab"] + g["shared_experts"]) // tp
                  + g["replicated"] + slots * g["expert"])
        kv = _kv_per_token(cfg, tp, item)
        # Tokens per rank per step: decode carries one per sequence; a prefill step carries a
        # chunk of PREFILL_CHUNK tokens per DP group, split over its TP ranks.
        prefill_rank = math.ceil(PREFILL_CHUNK / tp)
        per_rank = (lambda b: prefill_rank) if role.name == "prefill" else (lambda b: b)
        disp = (lambda b: _dispatch_bytes(per_rank(b), k, n, cfg.hidden_size, item)) if moe \
            else (lambda b: 0)
        note = f"EP over {n} devices, {slots} expert(s) per device" if moe else ""
    elif role.name == "decode_attention":
        shared_here = experts_role is None or experts_role.shared_devices == 0
        params = (g["attention"] + g["dense_mlp"] + g["vocab"] + g["replicated"]
                  + (g["shared_experts"] if shared_here else 0))
        kv = _kv_per_token(cfg, 1, item)
        disp = lambda b: 0  # noqa: E731 - A2E hop buffers are the batch itself
        note = f"{role.domains} domains x {role.dp} DP" + (", shared experts here"
                                                            if shared_here and moe else "")
    else:
        slots = role.resolved_slots_per_device(moe.num_experts) if moe else 0
        routed = slots * g["expert"]
        params = max(routed, g["shared_experts"] if role.shared_devices else 0)
        attn = spec.roles["decode_attention"]
        attn_plan = _role_plan(cfg, spec, attn, item, mem)
        disp_b = _dispatch_bytes(max(attn_plan.max_batch, 1), k, n, cfg.hidden_size, item)
        free = int(mem * (1 - RESERVE_FRACTION)) - params - disp_b
        note = (f"{role.routed_devices} x {slots} slots = {role.routed_devices * slots} for "
                f"{moe.num_experts if moe else 0} experts"
                + (f", {role.shared_devices} shared-expert devices" if role.shared_devices
                   else "") + f"; buffers for {attn_plan.max_batch} tokens per trampoline")
        return RolePlan(role.name, rng, mesh, params * item, 0, disp_b, free, 0, 0, note)
    batch, context, disp_b, free = _fit(mem, params * item, kv, cfg.max_position_embeddings,
                                        disp)
    return RolePlan(role.name, rng, mesh, params * item, kv, disp_b, free, batch, context, note)


def plan_deployment(model_cfg, deployment, *, model_name: str = "model",
                    memory_gib: float | None = None) -> Plan:
    """Plan a ``DeploymentSpec`` (or ``Deployment``) for a ``ModelConfig``."""
    spec = getattr(deployment, "spec", deployment)
    spec.check_model(model_cfg)
    item = _ITEMSIZE.get(model_cfg.dtype, 2)
    mem = int((memory_gib or spec.memory_per_device_gib) * GIB)
    roles = tuple(_role_plan(model_cfg, spec, r, item, mem)
                  for r in sorted(spec.roles.values(), key=lambda r: r.devices.start))
    return Plan(model_name, spec.name, model_cfg.dtype, mem, roles)


def _b(n: int) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def format_plan(plan: Plan) -> str:
    """A table a person reads: one row per role, then notes."""
    head = (f"{plan.deployment} for {plan.model} ({plan.dtype}, "
            f"{_b(plan.memory_per_device)} per device, {RESERVE_FRACTION:.0%} reserved)")
    cols = ("role", "devices", "mesh", "params/dev", "KV/token/dev", "dispatch/dev",
            "free/dev", "max batch", "max context")
    rows = [cols]
    for r in plan.roles:
        mesh = " x ".join(f"{a}={s}" for a, s in r.mesh.items())
        kv = _b(r.kv_bytes_per_token) if r.kv_bytes_per_token else "-"
        batch = str(r.max_batch) if r.kv_bytes_per_token else "-"
        ctx = str(r.max_context) if r.kv_bytes_per_token else "-"
        rows.append((r.role, r.devices, mesh, _b(r.param_bytes), kv, _b(r.dispatch_bytes),
                     _b(r.free_bytes), batch, ctx))
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    lines = [head, ""] + ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                          for row in rows]
    lines += [""] + [f"{r.role}: {r.note}" for r in plan.roles if r.note]
    lines.append("max batch: sequences per device (each DP rank holds its own) at the "
                 "model's full context; max context: one sequence per device")
    return "\n".join(lines)


def _load_model(name: str):
    from xds_jax.model.config_hf import load_model_config

    try:
        from xds_jax.loading.loader import resolve

        path = resolve(name)
    except ImportError:
        path = name
    return load_model_config(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xds plan", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="config.json (or its directory)")
    parser.add_argument("--deployment", required=True, help="deployment YAML")
    parser.add_argument("--memory-gib", type=float, help="override memory per device")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = parser.parse_args(argv)
    try:
        cfg = _load_model(args.model)
        spec = read_deployment(args.deployment)
        plan = plan_deployment(cfg, spec, model_name=args.model, memory_gib=args.memory_gib)
    except (DeploymentError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(asdict(plan), indent=1) if args.json else format_plan(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
