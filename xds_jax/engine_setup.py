"""What ``LLM`` does around loading: before JAX starts, read the deployment file and size the
CPU devices; after, make the parameter tree the engine runs."""

from __future__ import annotations

import logging
import os

from xds_jax.engine_config import EngineConfig

log = logging.getLogger(__name__)


def read_deployment_file(config: EngineConfig) -> EngineConfig:
    """``config`` with its deployment file parsed (once, here: no JAX needed)."""
    if not isinstance(config.deployment, str | os.PathLike):
        return config
    from sharding.deployment import read_deployment

    return config.replace(deployment=read_deployment(config.deployment))


def size_cpu_devices(config: EngineConfig) -> None:
    """Before JAX starts, give the CPU backend the virtual devices the layout needs (the
    device count cannot change later in the process)."""
    from sharding.devices import backends_started, ensure_cpu_devices, queues_collectives

    needed = config.num_dp_groups
    collectives = queues_collectives(config.deployment)
    if config.deployment is not None:
        needed = max(needed, config.deployment.num_devices)
    if config.distributed is not None:  # first of all: join the other processes
        from sharding.processes import DistributedConfig, initialize

        initialize(DistributedConfig.of(config.distributed), needed, collectives)
    if backends_started():
        return
    ensure_cpu_devices(needed, collectives)


def engine_params(loaded, config: EngineConfig, model_path) -> dict:
    """``loaded.params`` as the engine runs them: a shipped MTP head attached where speculative
    decoding is asked for and the model has none; where each group holds whole layers
    (colocated DP groups: no deployment file, TP 1), every layer's Q fused with its K/V
    (``xds_jax.model.fused.fuse_query``: one matmul instead of two)."""
    from xds_jax.loading.draft_heads import attach_shipped_head
    from xds_jax.model.fused import fuse_query

    params = loaded.params
    if config.quantization:
        from xds_jax.model.params import param_bytes

        log.info("weights: %s weight-only, one scale per output channel (%.1f MiB)",
                 config.quantization, param_bytes(params) / 2**20)
    if config.speculative_config:  # a model without MTP weights may have a shipped head
        params = attach_shipped_head(params, loaded.cfg, model_path)
    if config.deployment is not None:
        return params
    return fuse_query(params, loaded.cfg, in_place=params is loaded.params)  # LLM drops it


def context_length(cfg, params: dict, config: EngineConfig) -> int:
    """The engine's ``max_model_len``: the one configured (at most the model's
    ``max_position_embeddings``), the model's where None, or with ``"auto"`` (vLLM's spelling;
    -1 too) the longest context a DP group's KV pool of ``kv_cache_bytes`` holds, in whole
    blocks, at most the model's (and at least one block)."""
    from xds_jax.errors import ConfigError
    from xds_jax.model.params import model_dtype

    limit, asked = cfg.max_position_embeddings, config.max_model_len
    if asked in ("auto", -1):
        per_token = cfg.kv_bytes_per_token(model_dtype(params).itemsize)
        fit = config.kv_cache_bytes // max(per_token * config.block_size, 1) * config.block_size
        chosen = min(limit, max(fit, config.block_size))
        log.info("max_model_len auto: %d tokens (the model's %d; a KV pool of %d bytes holds "
                 "%d)", chosen, limit, config.kv_cache_bytes, fit)
        return chosen
    if asked is not None and not asked <= limit:
        raise ConfigError(f"max_model_len must be in 1..{limit} or 'auto', got {asked}")
    return asked or limit
