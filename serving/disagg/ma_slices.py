"""The two non-routed services of MA decode, over ``collectives.transport``.

``FfnSlice`` (dense models on an MA layout, attention-FFN disaggregation): a dense model has
no experts to place, so the expert slice serves every layer's FFN: each attention rank's
hidden states hop to one FFN device (spread like trampolines), which holds a replica of
every layer's MLP and returns ``x + mlp(norm(x))``. No all-to-all: a dense FFN needs no
routing.

``SharedExperts`` (xDeepServe's shared-expert dies, ``decode_experts.shared_devices``): the
shared expert of every MoE layer runs there instead of on the attention ranks; with more
ranks than shared dies each die serves several ranks (hop rounds).

Shape legend: B rows per rank, S tokens per row, T tokens per rank, D hidden, G hop rounds.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from collectives.transport import SliceService, Transport
from serving.disagg.ma_runner import from_host
from sharding.rules import program_spec
from xds_jax.model import stages
from xds_jax.model.config import ModelConfig
from xds_jax.model.layers import swiglu


def _replicated(tree, mesh: Mesh):
    repl = NamedSharding(mesh, program_spec(mesh, "decode_experts"))
    return jax.tree.map(lambda w: from_host(w, repl), tree)


@functools.cache
def _program(mesh: Mesh, fn, cfg=None):
    """``fn(weights, rows[, cfg=cfg])`` per device of the other slice: weights whole, rows one
    block per device (the ``batch`` rule of the expert role). One per process for each mesh
    and configuration: a slice rebuilt on the same devices reuses what compiled before."""
    rows = program_spec(mesh, "decode_experts", "batch")
    body = fn if cfg is None else functools.partial(fn, cfg=cfg)
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(program_spec(mesh, "decode_experts"),
                                                            rows), out_specs=rows))


class FfnSlice(SliceService):
    """Dense FFN replicas on the expert devices, one per attention rank of a domain.

    Args:
      attn_mesh: one domain's ``("dp",)`` mesh.
      ffn_devices: the distinct expert devices serving the domain's ranks.
      params: the model parameters (each layer's ``post_norm`` and ``mlp`` are replicated
        on the FFN devices).
    """

    trace = (SliceService.trace[0], ("expert", "ffn_l{layer}", "expert"),
             SliceService.trace[2])

    def __init__(self, attn_mesh: Mesh, ffn_devices: list, params: dict, cfg: ModelConfig):
        super().__init__(Transport(attn_mesh, ffn_devices))
        mesh = self.transport.other_mesh
        self.weights = [_replicated({"post_norm": layer["post_norm"], "mlp": layer["mlp"]},
                                    mesh) for layer in params["layers"]]
        self._program = _program(mesh, _ffn, cfg)

    def launch(self, layer: int, sent: tuple, capacity: int | None = None):
        return self._program(self.weights[layer], sent[0]), None


def _ffn(weights, x_BSD, *, cfg):
    return stages.ffn(weights, cfg, x_BSD)


def _shared_mlp(w: dict, x_TD: jax.Array) -> jax.Array:
    y = swiglu(w["shared"], x_TD)
    if "shared_gate" in w:
        y = y * jax.nn.sigmoid(x_TD.astype(jnp.float32) @ w["shared_gate"]).astype(y.dtype)
    return y


class SharedExperts(SliceService):
    """Shared-expert service of one attention domain on the shared dies."""

    trace = (("shared_expert", "shared_a2e_l{layer}", "shared/a2e/d{domain}"),
             ("shared_expert", "shared_l{layer}", "shared"),
             ("shared_expert", "shared_e2a_l{layer}", "shared/e2a/d{domain}"))

    def __init__(self, attn_mesh: Mesh, shared_devices: list, params: dict, cfg: ModelConfig):
        super().__init__(Transport(attn_mesh, shared_devices))
        mesh = self.transport.other_mesh
        self.weights = {i: _replicated({k: layer["moe"][k] for k in ("shared", "shared_gate")
                                        if k in layer["moe"]}, mesh)
                        for i, layer in enumerate(params["layers"]) if cfg.is_moe_layer(i)}
        self._program = _program(mesh, _shared_mlp)

    def launch(self, layer: int, sent: tuple, capacity: int | None = None):
        return self._program(self.weights[layer], sent[0]), None
