"""Engines laid out by a deployment file (``configs/deployments/*.yaml``), or colocated DP
groups without one (``build_colocated_engine``).

=========================================  ================================================
roles in the file                          engine
=========================================  ================================================
``decode``                                 colocated: one DP group per ``dp`` rank
``decode`` with ``ep: N`` (a MoE model)    colocated DP + EP: an MA pool whose expert slice is
                                           its own N ranks (``serving.disagg.ep_decode``)
``prefill`` + ``decode``                   PD: TP prefill groups hand KV to decode groups
                                           (EP decode groups too)
``decode_attention`` + ``decode_experts``  MA: attention DP groups in domains, expert slice
``prefill`` + both MA roles                PD + MA: prefill groups feed the MA attention
=========================================  ================================================

Groups get the engine's capacity (``EngineConfig``, through ``engine.group_config_for``),
overridden per role by the file's ``max_num_seqs`` / ``max_num_batched_tokens`` /
``kv_cache_gib`` fields, and by the caller's ``prefill_config`` / ``decode_config``.
``build_engine`` is the one way in: colocated groups without a deployment, this otherwise.
"""

from __future__ import annotations

import logging
import os

import jax

from serving.core.dp_group import DPGroup, GroupConfig
from serving.core.engine import Engine, group_config_for
from serving.core.host_memory import check_weight_copies
from serving.core.timeline import Timeline
from serving.disagg.ep_decode import ep_decode_pool, runs_ep_decode
from serving.disagg.eplb_config import EplbConfig
from serving.disagg.pd import DecodeGroup, PrefillGroup
from serving.disagg.pd_router import PDRouter
from sharding import read_deployment
from sharding.deployment import Deployment, DeploymentError, DeploymentSpec, build_deployment
from xds_jax.engine_config import EngineConfig
from xds_jax.errors import ConfigError
from xds_jax.model.config import ModelConfig

log = logging.getLogger(__name__)


class UnsupportedDeploymentError(DeploymentError):
    """The deployment is valid but asks for a layout this engine cannot serve."""


def build_engine(params: dict, cfg: ModelConfig, max_model_len: int,
                 config: EngineConfig) -> Engine:
    """The engine ``config`` describes: its deployment's layout, or colocated DP groups."""
    if config.deployment is None:
        _no_dispatch(config, "a layout without a deployment file")
        if config.enable_eplb:  # EPLB balances an MA deployment's expert slice
            EplbConfig.parse(True, config.eplb_config).resolve(
                cfg.moe.num_experts if cfg.moe else None, None,
                "a layout without a deployment file")
        return build_colocated_engine(params, cfg, max_model_len, config)
    return build_deployed_engine(params, cfg, max_model_len, config)


def build_colocated_engine(params: dict, cfg: ModelConfig, max_model_len: int,
                           config: EngineConfig, devices: list | None = None) -> Engine:
    """An engine with ``config.num_dp_groups`` colocated groups on the first ``devices``."""
    devices = devices or jax.devices()
    if not config.num_dp_groups <= len(devices):
        raise ValueError(f"num_dp_groups must be in 1..{len(devices)} (devices available), "
                         f"got {config.num_dp_groups}")
    # device 0's group shares the loaded weights; each other one copies them
    check_weight_copies(params, config.num_dp_groups - 1, "num_dp_groups", devices)
    group = group_config_for(params, cfg, max_model_len, config)
    return Engine(params, cfg, list(devices[:config.num_dp_groups]), group,
                  faults=config.faults, heartbeat_timeout_s=config.heartbeat_timeout_s)


def build_deployed_engine(params: dict, cfg: ModelConfig, max_model_len: int,
                          config: EngineConfig, *, prefill_config: GroupConfig | None = None,
                          decode_config: GroupConfig | None = None) -> Engine:
    """The engine ``config.deployment`` describes (see the module table)."""
    spec = config.deployment
    if not isinstance(spec, DeploymentSpec):  # a path: parse it here, once
        spec = read_deployment(spec)
    layout = build_deployment(spec, model=cfg)
    eplb = EplbConfig.parse(config.enable_eplb, config.eplb_config)
    ep_decode = runs_ep_decode(layout, cfg)
    pooled = layout.spec.is_ma or ep_decode  # decode ranks stepped together by an MA pool
    if not pooled or cfg.moe is None:
        _no_dispatch(config, f"{layout.name!r} with this model")
    if eplb.enabled and not pooled:  # refused here; MAPool checks the rest
        eplb.resolve(cfg.moe.num_experts if cfg.moe else None, None, repr(layout.name))
    roles = set(layout.roles)
    # each group copies the loaded weights (one on the loaded tree's device may share them)
    check_weight_copies(params, _num_groups(layout) - 1, f"deployment {layout.name!r}",
                        list(next(iter(layout.roles.values())).mesh.devices.flat))
    host_share = _host_kv_share(layout)
    timeline = Timeline() if config.trace else None

    def config_of(role: str) -> GroupConfig:  # the role's own capacity fields win
        options = config.replace(**layout.role(role).spec.capacity)
        if host_share is not None and options.kv_cache_bytes > host_share:
            log.info("%s: %s KV pools capped at %.1f MiB per group: %d simulated groups share "
                     "this host's memory", layout.name, role, host_share / 2**20,
                     _num_groups(layout))
            options = options.replace(kv_cache_bytes=host_share)
        return group_config_for(params, cfg, max_model_len, options)

    decode_role = "decode_attention" if layout.spec.is_ma else "decode"
    prefill_config = prefill_config or (config_of("prefill") if "prefill" in roles else None)
    decode_config = decode_config or config_of(decode_role)
    num_prefill = _num_prefill_groups(layout) if "prefill" in roles else 0
    kind = DecodeGroup if num_prefill else DPGroup  # decode groups fed by prefill, or colocated
    if layout.spec.is_ma:
        from serving.disagg.ma import MAPool
        from serving.disagg.ma_layout import MALayout

        def factory(index, *args, **kwargs):  # attention groups numbered after prefill's
            return kind(num_prefill + index, *args, **kwargs)

        pool = MAPool(params, cfg, MALayout.from_deployment(layout, cfg,
                                                             dispatch_dtype=config.dispatch_dtype),
                      decode_config, micro_batches=config.micro_batches, timeline=timeline,
                      group_factory=factory, eplb=eplb)
        decode, decode_drivers = list(pool.groups), [pool]
    elif ep_decode:
        pool = ep_decode_pool(params, cfg, layout, decode_config, config, eplb, timeline,
                              lambda index, *a, **kw: kind(num_prefill + index, *a, **kw))
        decode, decode_drivers = list(pool.groups), [pool]
    else:
        decode = [kind(num_prefill + i, params, cfg, d, decode_config)
                  for i, d in enumerate(_decode_devices(layout))]
        decode_drivers = decode
    router = PDRouter(decode, kv_retries=config.kv_transfer_retries) if num_prefill else None
    prefill = _prefill_groups(params, cfg, layout, prefill_config, router) if router else []
    for g in [*prefill, *decode]:
        g.timeline = timeline
    return Engine(params, cfg, groups=[*prefill, *decode], entry=prefill or None,
                  drivers=[*prefill, *decode_drivers], router=router, timeline=timeline,
                  faults=config.faults, heartbeat_timeout_s=config.heartbeat_timeout_s)


def _no_dispatch(config: EngineConfig, where: str) -> None:
    """``dispatch_dtype: int8`` and ``micro_batches`` shape an expert dispatch (MA or EP
    decode): refused where none runs rather than ignored."""
    use = ("use a MoE model on an MA deployment or a decode role with ep: N")
    if config.dispatch_dtype == "int8":
        raise ConfigError(f"dispatch_dtype 'int8': {where} runs no expert dispatch (a dense "
                          f"model, or decode groups that hold every expert); {use}")
    if config.micro_batches != EngineConfig.micro_batches:
        raise ConfigError(f"micro_batches {config.micro_batches}: {where} runs no MA or EP "
                          f"decode step to split in micro-batches; {use}")


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


def _num_prefill_groups(layout: Deployment) -> int:
    return layout.role("prefill").mesh.devices.shape[0]


def _prefill_groups(params, cfg, layout: Deployment, config: GroupConfig,
                    router: PDRouter) -> list[PrefillGroup]:
    """One prefill group per ``dp`` row of the prefill mesh, TP over the row's devices."""
    mesh = layout.role("prefill").mesh
    return [PrefillGroup(i, params, cfg, list(row), config, router=router)
            for i, row in enumerate(mesh.devices.reshape(mesh.devices.shape[0], -1))]


def _decode_devices(layout: Deployment) -> list:
    role = layout.role("decode")
    if role.spec.tp != 1:
        raise UnsupportedDeploymentError(
            f"deployment {layout.name!r}: decode tp={role.spec.tp}; decode DP groups run with "
            "tp=1 (xDeepServe's decode layout); use more dp ranks instead")
    return list(role.mesh.devices.reshape(-1))
