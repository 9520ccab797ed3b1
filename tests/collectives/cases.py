"""Random MoE problems for the collective tests, and their dense references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from collectives.ep_moe import EpMoe
from collectives.expert_map import build_expert_map
from xds_jax.model.moe import moe_dense_reference


def need_devices(n: int):
    import pytest

    if len(jax.devices()) != n:
        pytest.skip(f"needs exactly {n} devices (have {len(jax.devices())})")


def make_experts(rng, num_experts: int, hidden: int, inter: int, dtype=np.float32) -> dict:
    shapes = {"gate": (num_experts, hidden, inter), "up": (num_experts, hidden, inter),
              "down": (num_experts, inter, hidden)}
    return {k: jnp.asarray((0.3 * rng.normal(size=s)).astype(np.float32), dtype=dtype)
            for k, s in shapes.items()}


def make_routing(rng, tokens: int, num_experts: int, top_k: int, skew: str = "random"):
    """``(ids [T, K], gates [T, K])``; ``skew="all"`` sends every token to expert 0 first."""
    ids = np.stack([rng.choice(num_experts, top_k, replace=False) for _ in range(tokens)])
    if skew == "all":
        ids = np.stack([np.r_[0, rng.choice(np.arange(1, num_experts), top_k - 1,
                                             replace=False)] for _ in range(tokens)])
    gates = rng.random((tokens, top_k)).astype(np.float32)
    return jnp.asarray(ids.astype(np.int32)), jnp.asarray(gates / gates.sum(1, keepdims=True))


def run_case(num_devices: int, *, slots: int = 1, experts: int | None = None, tokens: int = 4,
             top_k: int = 2, hidden: int = 16, inter: int = 8, skew: str = "random",
             seed: int = 0, devices=None, dtype=np.float32, **moe_kwargs):
    """Run ``EpMoe`` on a fresh random problem; return ``(out, reference, moe)``."""
    rng = np.random.default_rng(seed)
    devices = devices if devices is not None else jax.devices()[:num_devices]
    mesh = Mesh(np.array(devices), ("ep",))
    num_experts = experts or num_devices * slots
    w = make_experts(rng, num_experts, hidden, inter, dtype)
    x = jnp.asarray(rng.normal(size=(num_devices * tokens, hidden)).astype(np.float32), dtype)
    ids, gates = make_routing(rng, num_devices * tokens, num_experts, top_k, skew)
    emap = build_expert_map(num_experts, num_devices, slots)
    moe_kwargs.setdefault("capacity", tokens * top_k)  # no overflow unless asked for
    moe = EpMoe(mesh, emap, **moe_kwargs)
    phys = jax.tree.map(moe.shard, emap.physical_weights(w))
    out = moe(phys, moe.shard(x), moe.shard(ids), moe.shard(gates))
    return np.asarray(out), np.asarray(_reference(w, x, ids, gates)), moe


_reference = jax.jit(moe_dense_reference)
