"""What ``LLM`` does before JAX starts: read the deployment file, size the CPU devices."""

from __future__ import annotations

import os

from xds_jax.engine_config import EngineConfig


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
