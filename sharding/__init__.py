"""Device slices, role meshes and partition rules (see docs/deployments.md)."""

from sharding.deployment import (
    Deployment,
    DeploymentError,
    DeploymentFieldError,
    DeploymentSpec,
    DeploymentSyntaxError,
    DeviceRange,
    ExpertSlotsError,
    HeadsNotDivisibleError,
    OverlappingRangesError,
    Role,
    RoleSpec,
    TooFewDevicesError,
    UnknownRoleError,
    build_deployment,
    load_deployment,
    parse_deployment,
    read_deployment,
)

__all__ = [
    "Deployment", "DeploymentError", "DeploymentFieldError", "DeploymentSpec",
    "DeploymentSyntaxError", "DeviceRange", "ExpertSlotsError", "HeadsNotDivisibleError",
    "OverlappingRangesError", "Role", "RoleSpec", "TooFewDevicesError", "UnknownRoleError",
    "build_deployment", "load_deployment", "parse_deployment", "read_deployment",
]
