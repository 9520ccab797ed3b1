"""Dense models on an MA layout: the FFN of every layer runs on the expert slice.

A dense model has no experts to place, so the expert slice serves the dense FFN instead
(attention-FFN disaggregation): each attention rank of a domain sends its hidden states to
one FFN device (the same evenly spread trampolines A2E uses), which holds a replica of every
layer's MLP and returns ``x + mlp(norm(x))``. One hop there and one back, no all-to-all: a
dense FFN needs no routing. Attention ranks keep embed, attention, head and the KV cache.

Shape legend: A attention ranks of a domain, B rows per rank, S tokens per row, D hidden.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from collectives.a2e import A2EError, shards_in_order, trampoline_devices
from xds_jax.model import stages
from xds_jax.model.config import ModelConfig


class FfnSlice:
    """Dense FFN replicas on the expert devices, one per attention rank of a domain.

    Args:
      attn_mesh: one domain's ``("dp",)`` mesh.
      expert_devices: the ``decode_experts`` devices (at least as many as the ranks).
      params: the model parameters (each layer's ``post_norm`` and ``mlp`` are replicated
        on the FFN devices).
    """

    def __init__(self, attn_mesh: Mesh, expert_devices: list, params: dict, cfg: ModelConfig):
        self.attn_devices = list(attn_mesh.devices.flat)
        if len(self.attn_devices) > len(expert_devices):
            raise A2EError(
                f"a dense model's FFN slice needs at least one expert device per attention "
                f"rank ({len(self.attn_devices)}), the layout has {len(expert_devices)}")
        self.devices = trampoline_devices(expert_devices, len(self.attn_devices))
        mesh = Mesh(np.array(self.devices), ("t",))
        self.sharding = NamedSharding(mesh, P("t"))
        self.attn_sharding = NamedSharding(attn_mesh, P("dp"))
        replicated = NamedSharding(mesh, P())
        self.weights = [jax.device_put({"post_norm": layer["post_norm"], "mlp": layer["mlp"]},
                                       replicated) for layer in params["layers"]]
        self._program = jax.jit(jax.shard_map(
            functools.partial(_ffn, cfg=cfg), mesh=mesh, in_specs=(P(), P("t")),
            out_specs=P("t")))

    def send(self, x_BSD: jax.Array) -> jax.Array:
        """Each rank's rows onto its FFN device (one copy per rank)."""
        shards = shards_in_order(x_BSD)
        moved = [jax.device_put(s, d) for s, d in zip(shards, self.devices, strict=True)]
        return jax.make_array_from_single_device_arrays(x_BSD.shape, self.sharding, moved)

    def compute(self, layer: int, x_BSD: jax.Array) -> jax.Array:
        return self._program(self.weights[layer], x_BSD)

    def receive(self, y_BSD: jax.Array) -> jax.Array:
        """The FFN outputs back onto the attention ranks, rank-major as they left."""
        shards = shards_in_order(y_BSD)
        moved = [jax.device_put(s, d) for s, d in zip(shards, self.attn_devices, strict=True)]
        return jax.make_array_from_single_device_arrays(y_BSD.shape, self.attn_sharding, moved)

    @staticmethod
    def hop_bytes(x_BSD: jax.Array) -> int:
        return x_BSD.size * x_BSD.dtype.itemsize


def _ffn(weights, x_BSD, *, cfg):
    return stages.ffn(weights, cfg, x_BSD)
