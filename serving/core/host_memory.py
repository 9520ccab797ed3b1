"""Whether a layout of virtual CPU devices fits this host: every simulated group keeps its own
copy of the weights in the one host's memory (a real cluster has a device's memory each)."""

from __future__ import annotations

import os

import jax

from xds_jax.errors import ConfigError


def available_bytes() -> int | None:
    """This host's available memory (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def tree_bytes(tree, within: str | None = None) -> int:
    """Bytes of ``tree``'s arrays (only those under a key named ``within``, when given)."""
    total = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        names = [str(getattr(p, "key", "")) for p in path]
        if within is None or within in names:
            total += leaf.size * leaf.dtype.itemsize
    return total


def check_weight_copies(params: dict, copies: int, where: str, devices: list) -> None:
    """Refuse ``copies`` groups on virtual CPU devices whose weights (each a copy of the
    model's but for the routed experts, which the expert slice splits) need more than the
    host has available: the process would be killed for memory mid-build instead."""
    if copies <= 1 or not devices or devices[0].platform != "cpu":
        return
    host = available_bytes()
    if host is None:
        return
    experts = tree_bytes(params, "experts")
    dense = tree_bytes(params) - experts
    need = copies * dense + experts  # a lower bound: replicated leaves of TP groups not counted
    if need > host:
        gib = 2**30
        raise ConfigError(
            f"{where}: {copies} groups on virtual CPU devices each hold a copy of the weights "
            f"({dense / gib:.2f} GiB), {need / gib:.1f} GiB in all, more than this host's "
            f"{host / gib:.1f} GiB available; use fewer groups (dp) or a smaller model")
