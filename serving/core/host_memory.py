"""Whether a layout of virtual CPU devices fits this host: every simulated group keeps its own
copy of the weights in the one host's memory (a real cluster has a device's memory each)."""

from __future__ import annotations

import jax

from xds_jax.errors import ConfigError
from xds_jax.model.params import param_bytes


def available_bytes() -> int | None:
    """The memory this process can still take (None where the OS does not say): Linux's
    MemAvailable (free memory and the page cache it can drop), within a cgroup's limit."""
    found = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    try:  # cgroup v2: what the container may still use
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit != "max" and found is not None:
            with open("/sys/fs/cgroup/memory.current") as f:
                found = min(found, int(limit) - int(f.read().strip()))
    except (OSError, ValueError):
        pass
    return found


def expert_bytes(tree) -> int:
    """Bytes of ``tree``'s arrays under a key named ``experts`` (routed experts)."""
    return param_bytes([leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
                        if "experts" in (getattr(p, "key", None) for p in path)])


def check_weight_copies(params: dict, copies: int, where: str, devices: list) -> None:
    """Refuse ``copies`` more copies of the loaded weights (each group's on virtual CPU
    devices, but for the routed experts, which the expert slice splits) where they need more
    than the host has available: the process would be killed for memory mid-build instead.
    One process only (several each hold their own groups' copies, on hosts this one cannot
    see)."""
    if (copies < 1 or not devices or devices[0].platform != "cpu"
            or jax.process_count() > 1):
        return
    host = available_bytes()
    if host is None:
        return
    experts = expert_bytes(params)
    dense = param_bytes(params) - experts
    need = copies * dense + experts  # a lower bound: TP groups' replicated leaves not counted
    if need > host:
        gib = 2**30
        raise ConfigError(
            f"{where}: {copies + 1} groups on virtual CPU devices each hold a copy of the "
            f"weights ({dense / gib:.2f} GiB): {need / gib:.1f} GiB more than the loaded one, "
            f"past this host's {host / gib:.1f} GiB available; use fewer groups (dp) or a "
            "smaller model")
