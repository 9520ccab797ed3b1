"""``xds plan``: bytes per device and the largest batch and context a deployment fits.

Per role, from the engine's placement (``sharding.placement``: the partition rules over
``jax.eval_shape`` of the parameter tree and KV pages): weight bytes on each device, KV
bytes per token per device, the fixed dispatch buffers of the expert slice (send + receive,
dispatch + combine, first capacity bucket, for the attention batch), and from the memory
left the largest batch at the model's full context and the longest context at batch 1.
Prefill and decode groups run their MoE layers inside the group (every group holds every
expert), so they have no dispatch buffers; a decode role with ``ep: N`` holds expert slots
on every rank and counts the dispatch buffers of the batch that fits without them.
Activations are covered by a flat reserve (``RESERVE_FRACTION`` of device memory). With
``--speculative-config`` (MTP drafting) the MTP block is counted where the engine puts it and
its KV pages (one more layer) on every role that attends (``sharding.placement``).

Usage: ``xds plan --model M --deployment D`` or ``python -m sharding.plan ...``; with
``--perf`` it prints ``sharding.perf_model``'s time estimates instead.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from itertools import groupby

import jax.numpy as jnp

from sharding.deployment import DeploymentError, DeploymentSpec, RoleSpec, read_deployment
from sharding.placement import (
    abstract_draft_head,
    abstract_params,
    kv_bytes_per_device,
    weight_bytes_by_device,
)
from xds_jax.errors import ConfigError

RESERVE_FRACTION = 0.1
GIB = 1 << 30


@dataclass(frozen=True)
class RolePlan:
    role: str
    devices: str  # "start..stop-1"
    mesh: dict
    param_bytes: int  # on the role's fullest device
    kv_bytes_per_token: int
    dispatch_bytes: int
    free_bytes: int
    max_batch: int  # sequences per device at the model's full context
    max_context: int  # tokens of one sequence per device (capped at the model's maximum)
    note: str = ""
    # (devices, bytes) runs in device order: the weight bytes of every device of the role
    param_bytes_by_device: tuple[tuple[int, int], ...] = ()

    def weight_bytes(self) -> list[int]:
        """Weight bytes of each device of the role, in device order."""
        return [b for count, b in self.param_bytes_by_device for _ in range(count)]


@dataclass(frozen=True)
class Plan:
    model: str
    deployment: str
    dtype: str
    memory_per_device: int
    roles: tuple[RolePlan, ...]


def _dispatch_bytes(tokens: int, top_k: int, ranks: int, hidden: int, item: int) -> int:
    from collectives.ep_moe import capacity_buckets

    cap = capacity_buckets(max(tokens, 1), top_k, ranks)[0]
    return 4 * ranks * cap * hidden * item  # send + recv, dispatch + combine


def _fit(mem: int, params: int, kv_token: int, max_pos: int) -> tuple[int, int, int]:
    """(max_batch, max_context, free bytes)."""
    free = int(mem * (1 - RESERVE_FRACTION)) - params
    if not kv_token:
        return 0, 0, free
    return max(free // (kv_token * max_pos), 0), min(max_pos, max(free // kv_token, 0)), free


def _note(cfg, spec: DeploymentSpec, role: RoleSpec, by_device: list[int]) -> str:
    moe = cfg.moe
    experts = f"all {moe.num_experts} experts, " if moe else ""
    if role.name == "prefill":
        return (f"{role.dp} group(s) x TP={role.tp}: heads and MLP/expert widths split over "
                f"TP; each group holds {experts}the whole vocabulary and its own KV")
    if role.name == "decode" and role.expert_parallel and moe is not None:
        slots = role.resolved_slots_per_device(moe.num_experts)
        return (f"{role.dp} DP ranks (TP = 1) with the routed experts parallel over them "
                f"(EP={role.ep}): each holds every weight but the routed experts, its own KV "
                f"and {slots} of the {role.ep * slots} expert slots for {moe.num_experts} "
                f"experts")
    if role.name == "decode":
        return (f"{role.dp} group(s), each on {role.tp} device(s) holding the whole model: "
                f"{experts}the whole vocabulary and its own KV (no expert parallelism)")
    if role.name == "decode_attention":
        shared = bool(moe and moe.num_shared_experts)
        extra = ("; the shared-expert program on the shared devices keeps a second copy of "
                 "the shared experts here" if shared and spec.roles["decode_experts"]
                 .shared_devices else "")
        return (f"{role.domains} domain(s) x {role.dp} DP ranks (TP = 1), each holding every "
                f"weight but the routed experts{' (shared experts included)' if shared else ''}"
                f" and its own KV{extra}")
    if moe is None:
        used = sum(1 for b in by_device if b)
        return (f"dense FFN of every layer replicated on {used} trampoline device(s), one "
                f"copy per domain; {role.devices.count - used} device(s) idle")
    slots = role.resolved_slots_per_device(moe.num_experts)
    return (f"{role.routed_devices} x {slots} slots = {role.routed_devices * slots} for "
            f"{moe.num_experts} experts" + (f", {role.shared_devices} shared-expert devices "
                                            "(a copy per domain)" if role.shared_devices
                                            else ""))


def _role_plan(cfg, spec: DeploymentSpec, role: RoleSpec, params, dtype, mem: int,
               attn_batch: int, drafting: bool = False) -> RolePlan:
    rng = f"{role.devices.start}..{role.devices.stop - 1}"
    mesh = dict(zip(role.mesh_axes, role.mesh_shape, strict=True))
    by_device = list(weight_bytes_by_device(cfg, spec, role, params, drafting))
    runs = tuple((len(list(g)), b) for b, g in groupby(by_device))
    weights = max(by_device)
    kv = kv_bytes_per_device(cfg, role, 1, 1, dtype, drafting)
    disp = 0
    if role.name == "decode_experts" and cfg.moe is not None:
        disp = _dispatch_bytes(max(attn_batch, 1), cfg.moe.num_experts_per_tok,
                               role.routed_devices, cfg.hidden_size, jnp.dtype(dtype).itemsize)
    if role.expert_parallel and cfg.moe is not None:  # every rank attends and dispatches
        batch = _fit(mem, weights, kv, cfg.max_position_embeddings)[0]
        disp = _dispatch_bytes(max(batch, 1), cfg.moe.num_experts_per_tok, role.ep,
                               cfg.hidden_size, jnp.dtype(dtype).itemsize)
    batch, context, free = _fit(mem, weights + disp, kv, cfg.max_position_embeddings)
    note = _note(cfg, spec, role, by_device)
    if drafting and role.name != "decode_experts":
        note += "; MTP drafting: the MTP block and its KV pages (one more layer)"
    if role.name == "decode_experts" and cfg.moe is not None:
        note += f"; buffers for {attn_batch} tokens per trampoline"
    return RolePlan(role.name, rng, mesh, weights, kv, disp, free, batch, context, note, runs)


def plan_deployment(model_cfg, deployment, *, model_name: str = "model",
                    memory_gib: float | None = None, dtype=None, params=None,
                    quantization: str | None = None, drafting: bool = False,
                    draft_head=None) -> Plan:
    """Plan a ``DeploymentSpec`` (or ``Deployment``) for a ``ModelConfig``.

    ``dtype`` defaults to the model's; ``params`` is the abstract parameter tree (default
    the one a loader makes from the config, without MTP blocks; pass
    ``jax.eval_shape(lambda: params)`` of a loaded tree to plan exactly that);
    ``quantization="int8"`` plans that default tree's int8 weights and scales. ``drafting``
    plans MTP speculative decoding: the default tree gets the config's MTP blocks, or the
    draft head in the directory ``draft_head`` for a model without them.
    """
    spec = getattr(deployment, "spec", deployment)
    spec.check_model(model_cfg)
    dtype = jnp.dtype(dtype or model_cfg.dtype)
    if params is None:
        with_mtp = drafting and draft_head is None
        params = abstract_params(model_cfg, dtype, with_mtp, quantization=quantization)
        if drafting and draft_head is not None:
            params = params | {"mtp": [abstract_draft_head(draft_head, model_cfg, dtype)]}
    if drafting and not params.get("mtp"):
        raise ValueError(f"speculative decoding needs MTP weights: {model_name} has no MTP "
                         "layers (num_nextn_predict_layers) and no draft head is shipped for it")
    mem = int((memory_gib or spec.memory_per_device_gib) * GIB)
    attn = spec.roles.get("decode_attention")
    attn_batch = 0
    if attn is not None:
        attn_batch = _role_plan(model_cfg, spec, attn, params, dtype, mem, 0,
                                drafting).max_batch
    roles = tuple(_role_plan(model_cfg, spec, r, params, dtype, mem, attn_batch, drafting)
                  for r in sorted(spec.roles.values(), key=lambda r: r.devices.start))
    label = dtype.name + (f" + {quantization} weights" if quantization else "")
    label += " + MTP drafting" if drafting else ""
    return Plan(model_name, spec.name, label, mem, roles)


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
        low = min(r.weight_bytes(), default=r.param_bytes)
        weights = _b(r.param_bytes) if low == r.param_bytes else f"{_b(low)}..{_b(r.param_bytes)}"
        rows.append((r.role, r.devices, mesh, weights, kv, _b(r.dispatch_bytes),
                     _b(r.free_bytes), batch, ctx))
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    lines = [head, ""] + ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                          for row in rows]
    lines += [""] + [f"{r.role}: {r.note}" for r in plan.roles if r.note]
    lines += [f"{r.role}: does not fit: {_b(-r.free_bytes)} more per device needed"
              for r in plan.roles if r.free_bytes < 0]
    lines.append("max batch: sequences per device (each DP rank holds its own) at the "
                 "model's full context; max context: one sequence per device")
    return "\n".join(lines)


def _load_model(name: str):
    """Config of every model form ``LLM`` reads: a registered name, an HF directory, a
    ``.gguf`` file or a bare ``config.json``."""
    from xds_jax.loading.loader import load_config

    return load_config(name)


def _speculative(text: str | None) -> bool:
    """Whether ``--speculative-config`` turns MTP drafting on (checked as the engine does)."""
    if text is None:
        return False
    from xds_jax.engine_config import EngineConfig

    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--speculative-config is not valid JSON: {e}") from None
    return EngineConfig(speculative_config=config).num_speculative_tokens > 0


def _draft_head(cfg, model: str):
    """The head directory the engine would attach to ``model`` (no MTP layers in its config
    and a shipped head, or ``XDS_DRAFT_HEAD``), else None."""
    if cfg.num_mtp_layers:
        return None
    from xds_jax.loading.draft_heads import shipped_head_dir
    from xds_jax.loading.loader import resolve

    return shipped_head_dir(resolve(model))


def _perf(args, cfg, spec: DeploymentSpec) -> int:
    from sharding.hardware import hardware_preset
    from sharding.perf_model import estimate, format_estimates

    if "decode_attention" in spec.roles and cfg.moe is None:
        raise ConfigError(f"{spec.name!r} is an MA layout (attention and MoE experts on their "
                          "own dies); this model has no MoE layers")
    est = estimate(cfg, spec, hardware_preset(args.hardware), batch_per_die=args.batch_per_die,
                   context=args.context, mtp_acceptance=args.mtp_acceptance,
                   mtp_tokens=1 if cfg.num_mtp_layers else 0)
    print(json.dumps([asdict(e) for e in est], indent=1) if args.json
          else format_estimates(est, args.model, spec.name))
    return 0


def _number(kind, low: float, high: float = math.inf, open_low: bool = True):
    """An argparse type: a finite ``kind`` in (low, high] (``open_low``) or [low, high]."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (math.isfinite(value) and (value > low if open_low else value >= low)
                and value <= high):
            span = f"{'(' if open_low else '['}{low:g}, {high:g}]"
            raise argparse.ArgumentTypeError(f"{text} is not in {span}")
        return value
    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xds plan", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True,
                        help="model as LLM takes it: name, HF directory, .gguf or config.json")
    parser.add_argument("--deployment", required=True, help="deployment YAML")
    parser.add_argument("--memory-gib", type=_number(float, 0),
                        help="override memory per device (GiB, > 0)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                        help="weights and KV dtype (default: the model's)")
    parser.add_argument("--quantization", choices=["int8"],
                        help="int8: weight-only INT8 linear weights (default: none)")
    parser.add_argument("--speculative-config", metavar="JSON",
                        help='MTP speculative decoding as xds serve takes it, e.g. \'{"method": '
                        '"mtp", "num_speculative_tokens": 2}\': counts the MTP block and its KV')
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    perf = parser.add_argument_group("performance model (docs/deployments.md)")
    perf.add_argument("--perf", action="store_true",
                      help="estimate iteration time, TPOT and tokens/s per chip instead")
    perf.add_argument("--hardware", default="cloudmatrix384",
                      help="cloudmatrix384, h100 or h200 (default: %(default)s)")
    perf.add_argument("--batch-per-die", type=_number(int, 0),
                      help="default: 96 (MA), 60 (decode)")
    perf.add_argument("--mtp-acceptance", type=_number(float, 0, 1, open_low=False),
                      default=0.9, help="the MTP draft's acceptance rate in [0, 1] (default: "
                      "%(default)s; models without MTP layers draft nothing)")
    perf.add_argument("--context", type=_number(int, 0), default=3072,
                      help="mean KV tokens per sequence")
    args = parser.parse_args(argv)
    if args.perf:
        given = [flag for flag, value in (("--dtype", args.dtype),
                                          ("--quantization", args.quantization),
                                          ("--speculative-config", args.speculative_config),
                                          ("--memory-gib", args.memory_gib)) if value]
        if given:  # the model takes its byte sizes and MTP from --hardware's preset
            parser.error(f"--perf models the --hardware preset's dtypes and one MTP token at "
                         f"--mtp-acceptance; {', '.join(given)} apply to the memory plan only")
    try:
        cfg = _load_model(args.model)
        spec = read_deployment(args.deployment)
        if args.perf:
            return _perf(args, cfg, spec)
        drafting = _speculative(args.speculative_config)
        head = _draft_head(cfg, args.model) if drafting else None
        dtype = None if args.dtype == "auto" else args.dtype  # the model's, as the engine
        plan = plan_deployment(cfg, spec, model_name=args.model, memory_gib=args.memory_gib,
                               dtype=dtype, quantization=args.quantization,
                               drafting=drafting, draft_head=head)
    except (DeploymentError, OSError, ValueError, TypeError) as e:
        print(f"xds: error: {e}", file=sys.stderr)  # as the other commands: 1, not a usage 2
        return 1
    print(json.dumps(asdict(plan), indent=1) if args.json else format_plan(plan))
    short = [r.role for r in plan.roles if r.free_bytes < 0]
    if short:  # the plan is printed, and a script sees the failure
        print(f"xds: error: the weights do not fit the memory per device in "
              f"{', '.join(short)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
