"""Expert parallelism in colocated and PD decode: a ``decode`` role with ``ep: N``.

xDeepServe's colocated decode is DP + EP across all dies: each die runs attention for its own
sequences (a DP rank, TP = 1) and holds a few expert slots; the routed experts of a MoE
layer run as one two-phase dispatch / combine over every die of the role. That is an MA
pool (``serving.disagg.ma.MAPool``) whose expert slice coincides with its attention domain:

- one domain of N ranks (the role's devices, each its own DP group and scheduler, stepped
  together by the pool like an MA domain's ranks);
- the expert mesh is the same N devices (``("ep",)``), their slots filled by an
  ``ExpertMap`` (``slots_per_device``, ``redundant_slots``), with EPLB as on MA;
- the A2E "hop" is ``collectives.transport.ColocatedTransport``: the rows are re-labelled
  onto the expert mesh, the dispatch all-to-all is the only exchange;
- shared experts and the dense layers of a MoE model run on the ranks themselves.

A dense model has no routed experts, so ``ep`` leaves its decode groups plain DP groups.
"""

from __future__ import annotations

import numpy as np
from jax.sharding import Mesh

from collectives.expert_map import build_expert_map
from collectives.transport import TrampolineMap
from serving.core.dp_group import GroupConfig
from serving.core.timeline import Timeline
from serving.disagg.eplb_config import EplbConfig
from serving.disagg.ma_layout import MALayout
from sharding.deployment import DISPATCH_DTYPES, Deployment, DeploymentFieldError
from xds_jax.engine_config import EngineConfig
from xds_jax.model.config import ModelConfig


def runs_ep_decode(deployment: Deployment, cfg: ModelConfig) -> bool:
    """True when the deployment's decode role splits a MoE model's experts over its devices."""
    role = deployment.spec.roles.get("decode")
    return role is not None and role.expert_parallel and cfg.moe is not None


def ep_decode_pool(params: dict, cfg: ModelConfig, deployment: Deployment,
                   group_config: GroupConfig, config: EngineConfig, eplb: EplbConfig,
                   timeline: Timeline | None, group_factory):
    """The engine's driver of an EP decode role: an ``MAPool`` over ``ep_decode_layout``,
    its groups made by ``group_factory`` (colocated DP groups, or PD decode groups)."""
    from serving.disagg.ma import MAPool

    layout = ep_decode_layout(deployment, cfg, dispatch_dtype=config.dispatch_dtype)
    return MAPool(params, cfg, layout, group_config, micro_batches=config.micro_batches,
                  timeline=timeline, group_factory=group_factory, eplb=eplb)


def ep_decode_layout(deployment: Deployment, cfg: ModelConfig, *,
                     dispatch_dtype: str | None = None) -> MALayout:
    """The ``MALayout`` of an EP decode role: one domain over the role's devices, which are
    also the expert mesh. ``dispatch_dtype`` (``"auto"`` / ``"int8"``) overrides the role's
    field."""
    deployment.spec.check_model(cfg)
    if dispatch_dtype not in (None, *DISPATCH_DTYPES):
        raise DeploymentFieldError(f"dispatch_dtype must be one of {list(DISPATCH_DTYPES)}, "
                                   f"got {dispatch_dtype!r}")
    role = deployment.role("decode")
    devices = tuple(role.mesh.devices.flat)
    n = len(devices)
    slots = role.spec.resolved_slots_per_device(cfg.moe.num_experts)
    return MALayout(
        name=deployment.name,
        domain_meshes=(Mesh(np.array(devices), ("dp",)),),
        expert_devices=devices,
        shared_devices=(),
        expert_map=build_expert_map(cfg.moe.num_experts, n, slots),
        a2e_mode="colocated",
        trampolines=TrampolineMap.spread(n, n),
        dispatch_dtype=dispatch_dtype or role.spec.dispatch_dtype,
    )
