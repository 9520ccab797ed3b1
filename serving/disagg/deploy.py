"""Engines laid out by a deployment file (``configs/deployments/*.yaml``).

=========================================  ================================================
roles in the file                          engine
=========================================  ================================================
``decode``                                 colocated: one DP group per ``dp`` rank
``prefill`` + ``decode``                   PD: TP prefill groups hand KV to decode groups
``decode_attention`` + ``decode_experts``  MA: attention DP groups in domains, expert slice
``prefill`` + both MA roles                PD + MA: prefill groups feed the MA attention
=========================================  ================================================

Groups get the engine's capacity options (``engine.group_config_for``), overridden per role
by the file's ``max_num_seqs`` / ``max_num_batched_tokens`` / ``kv_cache_gib`` fields, and
by the caller's ``prefill_config`` / ``decode_config``.
"""

from __future__ import annotations

import logging
import os

from serving.core.balancer import Balancer
from serving.core.dp_group import DPGroup, GroupConfig
from serving.core.engine import Engine, group_config_for
from serving.disagg.pd import DecodeGroup, PrefillGroup, connect
from sharding import load_deployment
from sharding.deployment import Deployment, DeploymentError
from xds_jax.model.config import ModelConfig

log = logging.getLogger(__name__)


class UnsupportedDeploymentError(DeploymentError):
    """The deployment is valid but asks for a layout this engine cannot serve."""


def build_deployed_engine(params: dict, cfg: ModelConfig, max_model_len: int,
                          deployment: str, *, prefill_config: GroupConfig | None = None,
                          decode_config: GroupConfig | None = None, timeline=None,
                          micro_batches: int = 2, eplb=None, dispatch_dtype: str | None = None,
                          **group_options) -> Engine:
    """The engine a deployment file describes (see the module table). ``eplb``: an
    ``EplbConfig`` for the MA expert slice (``serving.disagg.eplb_config``);
    ``dispatch_dtype``: overrides the expert role's (``"auto"`` / ``"int8"``)."""
    layout = load_deployment(deployment, model=cfg)
    if eplb is not None and not layout.spec.is_ma:  # refused here; MAPool checks the rest
        eplb.resolve(cfg.moe.num_experts if cfg.moe else None, None, repr(layout.name))
    roles = set(layout.roles)
    host_share = _host_kv_share(layout)

    def config_of(role: str) -> GroupConfig:  # the role's own capacity fields win
        options = group_options | layout.role(role).spec.capacity
        if host_share is not None and options.get("kv_cache_bytes", 1 << 30) > host_share:
            log.info("%s: %s KV pools capped at %.1f MiB per group: %d simulated groups share "
                     "this host's memory", layout.name, role, host_share / 2**20,
                     _num_groups(layout))
            options["kv_cache_bytes"] = host_share
        return group_config_for(params, cfg, max_model_len, **options)

    decode_role = "decode_attention" if layout.spec.is_ma else "decode"
    prefill_config = prefill_config or (config_of("prefill") if "prefill" in roles else None)
    decode_config = decode_config or config_of(decode_role)
    prefill = _prefill_groups(params, cfg, layout, prefill_config) if "prefill" in roles else []
    first = len(prefill)
    kind = DecodeGroup if prefill else DPGroup  # decode groups fed by prefill, or colocated
    if layout.spec.is_ma:
        from serving.disagg.ma import MAPool
        from serving.disagg.ma_layout import MALayout

        def factory(index, *args, **kwargs):  # attention groups numbered after prefill's
            return kind(first + index, *args, **kwargs)

        ma_layout = MALayout.from_deployment(layout, cfg, dispatch_dtype=dispatch_dtype)
        pool = MAPool(params, cfg, ma_layout, decode_config,
                      micro_batches=micro_batches, timeline=timeline, group_factory=factory,
                      eplb=eplb)
        decode, drivers = list(pool.groups), [*prefill, pool]
    else:
        devices = _decode_devices(layout)
        decode = [kind(first + i, params, cfg, d, decode_config) for i, d in enumerate(devices)]
        drivers = [*prefill, *decode]
    for g in [*prefill, *decode]:
        g.timeline = timeline
    if not prefill:
        return Engine(params, cfg, groups=decode, drivers=drivers, timeline=timeline)
    balancer = Balancer()
    hub = connect(prefill, decode, lambda request: balancer.choose(
        [g.load() for g in decode], request.prompt_ids))
    return Engine(params, cfg, groups=[*prefill, *decode], entry=prefill, drivers=drivers,
                  timeline=timeline, hub=hub)


# Virtual CPU devices share the host's memory: all simulated KV pools together take at most
# this fraction of it (each pool still holds at least one full context).
HOST_KV_FRACTION = 0.25


def _num_groups(layout: Deployment) -> int:
    return sum(r.spec.dp * (r.spec.domains if r.name == "decode_attention" else 1)
               for r in layout.roles.values() if r.name != "decode_experts")


def _host_kv_share(layout: Deployment) -> int | None:
    """Bytes of KV per group when the deployment runs on virtual CPU devices, else None."""
    first = next(iter(layout.roles.values())).mesh.devices.flat[0]
    if first.platform != "cpu":
        return None
    try:
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    return int(host * HOST_KV_FRACTION) // max(_num_groups(layout), 1)


def _prefill_groups(params, cfg, layout: Deployment, config: GroupConfig) -> list[PrefillGroup]:
    """One prefill group per ``dp`` row of the prefill mesh, TP over the row's devices."""
    mesh = layout.role("prefill").mesh
    return [PrefillGroup(i, params, cfg, list(row), config)
            for i, row in enumerate(mesh.devices.reshape(mesh.devices.shape[0], -1))]


def _decode_devices(layout: Deployment) -> list:
    role = layout.role("decode")
    if role.spec.tp != 1:
        raise UnsupportedDeploymentError(
            f"deployment {layout.name!r}: decode tp={role.spec.tp}; decode DP groups run with "
            "tp=1 (xDeepServe's decode layout); use more dp ranks instead")
    return list(role.mesh.devices.reshape(-1))
