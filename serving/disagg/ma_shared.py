"""Shared experts on the expert role's shared devices (xDeepServe's 32 shared-expert dies).

When ``decode_experts.shared_devices`` is set, the shared expert of every MoE layer runs
there instead of on the attention ranks. Attention rank ``i`` of a domain of A ranks is
served by shared device ``i // G`` (G = ceil(A / S) ranks per shared device). One SPMD program
over the union of the domain's ranks and the S shared devices moves each rank's normed tokens
to its shared device (G ``ppermute`` rounds), runs the shared SwiGLU there only (a per-device
``lax.cond``: attention ranks skip it) and sends the outputs back the same way.

Shape legend: T tokens per attention rank, D hidden, G attention ranks per shared device.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from serving.disagg.ma_runner import from_host
from xds_jax.model.config import ModelConfig
from xds_jax.model.layers import swiglu


def _shared_weights(moe: dict) -> dict:
    return {k: moe[k] for k in ("shared", "shared_gate") if k in moe}


def _shared_on_union(w: dict, x_TD: jax.Array, *, num_attn: int, num_shared: int,
                     per_shared: int) -> jax.Array:
    """Per rank of the union axis ``u`` (attention ranks first, then shared devices)."""
    me = jax.lax.axis_index("u")
    pairs = [[(g * per_shared + j, num_attn + g) for g in range(num_shared)
              if g * per_shared + j < num_attn] for j in range(per_shared)]
    x_GTD = jnp.stack([jax.lax.ppermute(x_TD, "u", p) for p in pairs])
    g, t, d = x_GTD.shape

    def mlp(x):
        y = swiglu(w["shared"], x)
        if "shared_gate" in w:
            y = y * jax.nn.sigmoid(x.astype(jnp.float32) @ w["shared_gate"]).astype(y.dtype)
        return y

    y_GTD = jax.lax.cond(me >= num_attn, mlp, jnp.zeros_like,
                         x_GTD.reshape(g * t, d)).reshape(g, t, d)
    out_TD = jnp.zeros_like(x_TD)
    for j, p in enumerate(pairs):
        out_TD = out_TD + jax.lax.ppermute(y_GTD[j], "u", [(b, a) for a, b in p])
    return out_TD


class SharedExperts:
    """Shared-expert service of one attention domain on the shared devices."""

    def __init__(self, attn_mesh: Mesh, shared_devices: list, params: dict, cfg: ModelConfig):
        self.attn_devices = list(attn_mesh.devices.flat)
        self.shared_devices = list(shared_devices)
        a, s = len(self.attn_devices), len(self.shared_devices)
        self.per_shared = math.ceil(a / s)
        self.union = Mesh(np.array(self.attn_devices + self.shared_devices), ("u",))
        self.attn_sharding = NamedSharding(attn_mesh, P("dp"))
        repl = NamedSharding(self.union, P())
        self.weights = {i: jax.tree.map(lambda w: from_host(w, repl),
                                        _shared_weights(layer["moe"]))
                        for i, layer in enumerate(params["layers"]) if cfg.is_moe_layer(i)}
        body = functools.partial(_shared_on_union, num_attn=a, num_shared=s,
                                 per_shared=self.per_shared)
        self._program = jax.jit(jax.shard_map(body, mesh=self.union, in_specs=(P(), P("u")),
                                              out_specs=P("u")))
        self._zeros: dict = {}

    def __call__(self, layer: int, h_TD: jax.Array) -> jax.Array:
        """Shared-expert output ``[A * T, D]`` on the attention mesh for normed tokens."""
        t = h_TD.shape[0] // len(self.attn_devices)
        shards = {s.device: s.data for s in h_TD.addressable_shards}
        local = (t,) + h_TD.shape[1:]
        arrays = [shards[d] for d in self.attn_devices] + [
            self._zeros_on(dev, local, h_TD.dtype) for dev in self.shared_devices]
        x_U = jax.make_array_from_single_device_arrays(
            (t * len(arrays),) + h_TD.shape[1:], NamedSharding(self.union, P("u")), arrays)
        out_U = self._program(self.weights[layer], x_U)
        back = {s.device: s.data for s in out_U.addressable_shards}
        return jax.make_array_from_single_device_arrays(
            h_TD.shape, self.attn_sharding, [back[d] for d in self.attn_devices])

    def _zeros_on(self, device, shape, dtype) -> jax.Array:
        key = (device, shape, np.dtype(dtype))
        if key not in self._zeros:
            self._zeros[key] = jax.device_put(np.zeros(shape, dtype), device)
        return self._zeros[key]
