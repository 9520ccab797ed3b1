"""Engines laid out by a deployment file (``configs/deployments/*.yaml``).

A colocated ``decode`` role becomes one DP group per ``dp`` rank, each on its own device slice.
Prefill pools (PD) and attention/expert slices (MA) are validated here but served by the
disaggregation layer, which is not in this build yet: such deployments get a clear error.
"""

from __future__ import annotations

from serving.engine import Engine, build_engine
from sharding import load_deployment
from sharding.deployment import DeploymentError
from xds_jax.config import ModelConfig


class UnsupportedDeploymentError(DeploymentError):
    """The deployment is valid but asks for a layout this engine cannot serve yet."""


def build_deployed_engine(params: dict, cfg: ModelConfig, max_model_len: int,
                          deployment: str, **group_options) -> Engine:
    """DP groups on the devices of the deployment's ``decode`` role."""
    layout = load_deployment(deployment, model=cfg)
    if layout.spec.is_ma or "prefill" in layout.roles:
        kind = "MoE-attention" if layout.spec.is_ma else "prefill/decode"
        raise UnsupportedDeploymentError(
            f"deployment {layout.name!r} is {kind} disaggregated; this build serves colocated "
            "'decode' deployments only (e.g. configs/deployments/single.yaml)"
        )
    role = layout.role("decode")
    if role.spec.tp != 1:
        raise UnsupportedDeploymentError(
            f"deployment {layout.name!r}: decode tp={role.spec.tp}; DP groups run with tp=1"
        )
    devices = list(role.mesh.devices.reshape(-1))
    return build_engine(params, cfg, max_model_len, num_dp_groups=len(devices), devices=devices,
                        **group_options)
