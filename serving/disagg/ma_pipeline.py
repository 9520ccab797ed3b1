"""MA decode as a layer-major pipeline over the domains and the services they talk to.

One layer of one micro-batch: attention (KV pages donated) -> gate (+ shared expert on the
attention ranks, or a round trip to the shared dies) -> routed experts through A2E / E2A
(``collectives.a2e``) -> residual combine on attention. A dense model's layers send their
FFN to the expert slice (``FfnSlice``); a MoE model's dense layers run it on attention.

Overlap comes from asynchronous dispatch in this order::

    for layer: for domain: for micro-batch: combine(previous layer), attention,
                                            E2A(previous micro-batch), gate, A2E, experts

so while micro-batch 0's tokens are at the experts, attention runs micro-batch 1 (E2A of the
previous micro-batch is queued after the next attention, so nothing on the attention devices
waits for the experts), and the domains' micro-batches reach the expert slice in turn. The
pipeline never waits: each routed launch leaves an ``OverflowCheck`` for the pool.

A pass may start from given hiddens and run other layers: speculative decoding
(``serving.disagg.ma_spec``) runs the MTP block as "layer" ``cfg.num_layers`` (its routed
experts on the expert slice, its shared expert or dense FFN on attention), and verifies
drafts with a full pass whose final hiddens it keeps.
"""

from __future__ import annotations

import dataclasses

from collectives.transport import SliceService
from serving.disagg.ma_capacity import CapacityPolicy, OverflowCheck
from serving.disagg.ma_runner import Domain, MicroBatch
from xds_jax.model.config import ModelConfig


@dataclasses.dataclass
class DomainParts:
    """A domain and the services it talks to (None where the work stays on attention)."""

    domain: Domain
    routed: SliceService | None = None  # MoE layers' routed experts
    ffn: SliceService | None = None  # a dense model's FFN on the expert slice
    shared: SliceService | None = None  # shared experts on their own dies


@dataclasses.dataclass
class _Flight:
    """A micro-batch in flight through the layers."""

    mb: MicroBatch
    x: object  # hidden [A * B, S, D] on the domain mesh
    pending: tuple | None = None  # (x_TD, routed_TD, shared_TD) awaiting combine
    returning: tuple | None = None  # (service, out at the experts, x_TD, shared_TD)


@dataclasses.dataclass
class PassResult:
    logits: list = dataclasses.field(default_factory=list)  # (MicroBatch, logits [A*B, V])
    hidden: list = dataclasses.field(default_factory=list)  # (MicroBatch, x [A*B, S, D])
    checks: list[OverflowCheck] = dataclasses.field(default_factory=list)
    # (domain, layer) -> [A, E] tokens per rank and logical expert in this pass (on device)
    load: dict = dataclasses.field(default_factory=dict)
    # (domain, layer) -> per routed launch, [ranks, S] rows each expert rank got per slot
    slot_rows: dict = dataclasses.field(default_factory=dict)


class LayerPipeline:
    """Dispatches passes (all decode rows, or all prefill rows) of every domain."""

    def __init__(self, cfg: ModelConfig, parts: list[DomainParts],
                 capacity: CapacityPolicy | None, mtp_moe: bool = False) -> None:
        self.cfg = cfg
        self.parts = parts
        self.capacity = capacity
        self.mtp_moe = mtp_moe  # the MTP block ("layer" num_layers) routes to the experts

    def is_moe(self, layer: int) -> bool:
        return self.mtp_moe if layer == self.cfg.num_layers else self.cfg.is_moe_layer(layer)

    def run(self, per_domain: list[list[MicroBatch]], inputs: list[list] | None = None,
            layers=None, head: bool = True) -> PassResult:
        """One pass of every domain's micro-batches through ``layers`` (default: the target's;
        ``[cfg.num_layers]`` is the MTP block), from ``inputs`` (hiddens per domain and
        micro-batch; default: the tokens' embeddings). Final hiddens are always kept; with
        ``head``, the last tokens' logits too."""
        result = PassResult()
        if inputs is None:
            inputs = [[p.domain.embed(mb) for mb in mbs]
                      for p, mbs in zip(self.parts, per_domain, strict=True)]
        flights = [[_Flight(mb, x) for mb, x in zip(mbs, xs, strict=True)]
                   for mbs, xs in zip(per_domain, inputs, strict=True)]
        for layer in range(self.cfg.num_layers) if layers is None else layers:
            moe = self.is_moe(layer)
            for part, domain_flights in zip(self.parts, flights, strict=True):
                returning = None  # the previous micro-batch, still at the experts
                for f in domain_flights:
                    self._settle(part, f)
                    self._attend(part, f, layer)
                    if returning is not None:
                        self._receive(returning)
                    returning = None
                    if moe:
                        self._to_experts(part, f, layer, result)
                        returning = f
                if returning is not None:
                    self._receive(returning)
        for part, domain_flights in zip(self.parts, flights, strict=True):
            for f in domain_flights:
                self._settle(part, f)
                result.hidden.append((f.mb, f.x))
                if head:
                    result.logits.append((f.mb, part.domain.head(f.x, f.mb)))
        return result

    def _settle(self, part: DomainParts, f: _Flight) -> None:
        """Combine a micro-batch's returned expert output into its residual stream."""
        if f.pending is not None:
            f.x = part.domain.combine(*f.pending, f.mb)
            f.pending = None

    def _attend(self, part: DomainParts, f: _Flight, layer: int) -> None:
        """Attention of one layer, and its FFN when the layer is dense."""
        f.x = part.domain.attention(layer, f.x, f.mb)
        if self.is_moe(layer):
            return
        # a MoE model's dense layers stay on attention, and so does a dense MTP block's FFN
        if part.ffn is None or layer == self.cfg.num_layers:
            f.x = part.domain.ffn(layer, f.x)
        else:
            out, _ = part.ffn.launch(layer, part.ffn.send(f.x))
            f.x = part.ffn.receive(out)

    def _to_experts(self, part: DomainParts, f: _Flight, layer: int,
                    result: PassResult) -> None:
        """Gate (and shared expert), A2E and the routed experts of one micro-batch."""
        # the MTP block's shared expert runs on attention; its routed load counts for EPLB
        shared_svc = None if layer == self.cfg.num_layers else part.shared
        key = (part.domain.index, layer)
        x_TD, h_TD, ids_TK, w_TK, load, *shared = part.domain.gate(
            layer, f.x, f.mb, shared_svc is None, result.load.get(key))
        result.load[key] = load
        if shared_svc is not None:
            out, _ = shared_svc.launch(layer, shared_svc.send(h_TD))
            shared = [shared_svc.receive(out)]
        routed = part.routed
        sent = routed.send(h_TD, ids_TK, w_TK)
        tokens = routed.tokens_per_rank(f.mb.rows * f.mb.width)
        cap = self.capacity.capacity(tokens, routed.ranks)
        out, overflow = routed.launch(layer, sent, cap)
        result.slot_rows.setdefault(key, []).append(routed.last_slot_rows)
        result.checks.append(self.capacity.check(overflow, tokens, routed.ranks))
        f.returning = (routed, out, x_TD, shared[0])

    @staticmethod
    def _receive(f: _Flight) -> None:
        """E2A: the routed output back to the attention ranks; its combine is now pending."""
        routed, out, x_TD, shared_TD = f.returning
        f.pending = (x_TD, routed.receive(out), shared_TD)
        f.returning = None


class RecordingPipeline:
    """A ``LayerPipeline`` that keeps the ``PassResult`` of every run it makes: a drafting
    pass is several runs (MTP passes, then verify), and EPLB counts the experts of each."""

    def __init__(self, pipeline: LayerPipeline) -> None:
        self.pipeline = pipeline
        self.runs: list[PassResult] = []

    def __getattr__(self, name):
        return getattr(self.pipeline, name)

    def run(self, *args, **kwargs) -> PassResult:
        result = self.pipeline.run(*args, **kwargs)
        self.runs.append(result)
        return result
