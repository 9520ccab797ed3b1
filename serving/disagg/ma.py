"""MoE-attention (MA) disaggregated decode: attention domains take turns on one expert slice.

xDeepServe §5.2 / Fig. 19. The ``decode_attention`` role is ``domains`` x ``dp`` devices; each
device is one attention DP group (TP = 1) with its own scheduler and KV blocks (a ``DPGroup``
whose runner is a ``RankView``). A domain runs its ranks' steps SPMD (``serving.disagg.ma_runner``).
The ``decode_experts`` role holds the routed experts in slots (with redundant replicas, per
the deployment's ``slots_per_device`` / ``redundant_slots``); shared experts run on the
role's ``shared_devices`` when it has some (``serving.disagg.ma_shared``), else on the attention
ranks.

One layer of one micro-batch: attention (KV pages donated) -> gate + shared expert -> A2E
(``collectives.a2e``: one hop to the trampolines) -> dispatch, experts, combine inside the
expert mesh -> E2A -> residual combine on attention. Dense layers run their FFN on attention.

Overlap comes from asynchronous dispatch in this order, layer-major::

    for layer: for domain: for micro-batch: combine(previous layer), attention, gate, A2E,
                                            experts, E2A

so while micro-batch 0's tokens are at the experts, attention runs micro-batch 1, and the
domains' micro-batches reach the expert slice one after another. The host never waits
inside a step: the experts run at a capacity chosen up front, their overflow flags are read
once at the end, and if any layer overflowed the whole pass is re-run from the same inputs
with a larger capacity (grow-only; the re-run rewrites the same KV slots: step rollback).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from collectives.a2e import A2E
from collectives.ep_moe import capacity_buckets, next_capacity
from collectives.expert_map import build_expert_map
from serving.core.balancer import Balancer
from serving.core.dp_group import DPGroup, GroupConfig
from serving.core.request import Request
from serving.core.runner import MIN_DECODE_ROWS, MIN_PREFILL_WIDTH
from serving.core.timeline import Timeline
from serving.disagg.ma_ffn import FfnSlice
from serving.disagg.ma_runner import Domain, MicroBatch, RankView
from serving.disagg.ma_shared import SharedExperts
from sharding.deployment import Deployment, load_deployment
from xds_jax.generate import sample_rows
from xds_jax.model.config import ModelConfig

log = logging.getLogger(__name__)


def _is_decode(s) -> bool:
    return s.num_tokens == 1 and s.start > 0


@dataclasses.dataclass
class _Flight:
    """A micro-batch in flight through the layers."""

    x: object  # hidden [A * B, S, D] on the domain mesh
    event: int | None = None  # timeline id of the stage that produced x
    pending: tuple | None = None  # (x_TD, routed_TD, shared_TD) awaiting combine
    pending_deps: tuple = ()
    returning: tuple | None = None  # at the experts: what E2A and the combine need


@dataclasses.dataclass
class _PassResult:
    logits: list = dataclasses.field(default_factory=list)  # (MicroBatch, logits [A*B, V])
    checks: list = dataclasses.field(default_factory=list)  # (overflow, capacity, T, ranks)


class MAPool:
    """All attention DP groups of an MA deployment and the expert slice they share.

    Args:
      params: full model parameters (routed experts go to the expert slice, the rest is
        replicated on every attention domain).
      cfg: the model; it must have routed experts (a dense model is refused by the
        deployment check with ``ExpertSlotsError``).
      layout: a ``Deployment`` or a deployment YAML path with ``decode_attention`` and
        ``decode_experts`` roles.
      group_config: per attention rank: KV blocks, block size, max sequences and tokens.
      micro_batches: micro-batches per domain and step (fewer when ranks have fewer rows).
      timeline: records every stage (roles attention, a2e, expert, e2a) when given.
      a2e_mode: ``"trampoline"`` or ``"direct"`` (``collectives.a2e``).
      capacity: initial expert capacity (rows per destination rank), default the smallest
        bucket; it only grows.
      group_factory: builds each DP group, ``(index, None, cfg, device, config, runner=)``.
    """

    def __init__(self, params: dict, cfg: ModelConfig, layout: Deployment | str,
                 group_config: GroupConfig | None = None, *, micro_batches: int = 2,
                 timeline: Timeline | None = None, a2e_mode: str = "trampoline",
                 capacity: int | None = None, group_factory=DPGroup):
        deployment = layout if isinstance(layout, Deployment) else load_deployment(layout)
        deployment.spec.check_model(cfg)
        if micro_batches < 1:
            raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
        self.cfg = cfg
        self.deployment = deployment
        self.group_config = config = group_config or GroupConfig()
        self.micro_batches = micro_batches
        self.timeline = timeline if timeline is not None and timeline.enabled else None
        attn, experts = deployment.role("decode_attention"), deployment.role("decode_experts")
        self.expert_map = None
        if cfg.moe is not None:
            num_experts = cfg.moe.num_experts
            slots = experts.spec.resolved_slots_per_device(num_experts)
            self.expert_map = build_expert_map(num_experts, experts.spec.routed_devices, slots)
        self.domains: list[Domain] = []
        self.a2e: list[A2E] = []
        self.ffn: list[FfnSlice] = []  # dense models: the FFN on the expert devices
        self.groups: list = []
        dp = attn.spec.dp
        for d in range(attn.spec.domains):
            mesh = attn.domain_mesh(d)
            domain = Domain(d, mesh, params, cfg, config.num_blocks, config.block_size, d * dp)
            self.domains.append(domain)
            if self.expert_map is not None:
                self.a2e.append(A2E(mesh, experts.routed_mesh(), self.expert_map,
                                    mode=a2e_mode))
            else:
                self.ffn.append(FfnSlice(mesh, list(experts.mesh.devices.flat), params, cfg))
            for r in range(dp):
                self.groups.append(group_factory(d * dp + r, None, cfg, domain.devices[r],
                                                 config, runner=RankView(domain, r)))
        self._experts = self._place_experts(params)
        shared_devices = list(experts.mesh.devices.flat)[experts.spec.routed_devices:]
        self.shared = ([SharedExperts(attn.domain_mesh(d), shared_devices, params, cfg)
                        for d in range(attn.spec.domains)]
                       if shared_devices and cfg.moe and cfg.moe.num_shared_experts else None)
        self.initial_capacity = capacity
        self.capacity: dict[tuple[int, int], int] = {}  # (tokens per rank, ranks) -> rows
        self.reruns = 0
        self.steps = 0
        self.balancer = Balancer()

    def _place_experts(self, params: dict) -> list[dict]:
        """Slot weights per domain and MoE layer; domains on the same run mesh share them."""
        placed: dict = {}
        out = []
        for a2e in self.a2e:
            key = tuple(a2e.run_devices)
            if key not in placed:
                placed[key] = {i: a2e.place_experts(layer["moe"]["experts"])
                               for i, layer in enumerate(params["layers"])
                               if self.cfg.is_moe_layer(i)}
            out.append(placed[key])
        return out

    # -- requests -----------------------------------------------------------------------------
    def submit(self, request: Request) -> int:
        """Place a request on an attention DP group (the balancer's choice); its index."""
        index = self.balancer.choose([g.load() for g in self.groups], request.prompt_ids)
        self.groups[index].submit(request)
        return index

    def has_work(self) -> bool:
        return any(g.has_work() for g in self.groups)

    def run_until_done(self, requests: list[Request]) -> None:
        """Submit ``requests`` and step until all have finished."""
        for r in requests:
            self.submit(r)
        while not all(r.finished for r in requests):
            if not self.step() and not self.has_work():
                raise RuntimeError("MA pool idle with unfinished requests")

    # -- one step -----------------------------------------------------------------------------
    def step(self) -> bool:
        """Plan every group, run every domain's passes interleaved, sample, complete.
        Returns False when no group had work."""
        plans = [g.plan() for g in self.groups]
        if all(p is None for p in plans):
            return False
        passes = {}
        for kind, wanted, rows_min, width_min in (("decode", True, MIN_DECODE_ROWS, 1),
                                                  ("prefill", False, 1, MIN_PREFILL_WIDTH)):
            per_domain = []
            for dom in self.domains:
                per_rank = [[s for s in plans[dom.first_rank + r].scheduled
                             if _is_decode(s) == wanted] if plans[dom.first_rank + r] else []
                            for r in range(dom.num_ranks)]
                per_domain.append(dom.micro_batches(per_rank, self.micro_batches, rows_min,
                                                    width_min, kind) if any(per_rank) else [])
            if any(per_domain):
                passes[kind] = per_domain
        results, todo = {}, list(passes)
        while todo:
            for kind in todo:
                results[kind] = self._run_pass(passes[kind])
            todo = [kind for kind in todo if self._grow_on_overflow(results[kind].checks)]
            if todo:
                self.reruns += 1
                log.info("expert capacity overflow: re-running %s (capacities %s)", todo,
                         self.capacity)
        for result in results.values():
            for mb, logits in result.logits:
                sample_rows(np.asarray(logits), mb.seqs, self.cfg.vocab_size)
        for group, out in zip(self.groups, plans, strict=True):
            if out is not None:
                group.complete(out)
        self.steps += 1
        return True

    def _capacity_for(self, tokens: int, ranks: int) -> int:
        key = (tokens, ranks)
        if key not in self.capacity:
            buckets = capacity_buckets(tokens, self.cfg.moe.num_experts_per_tok, ranks)
            start = self.initial_capacity
            self.capacity[key] = buckets[0] if start is None else min(start, buckets[-1])
        return self.capacity[key]

    def _grow_on_overflow(self, checks: list) -> bool:
        """Read the pass's overflow flags (one wait per step); grow the capacity of every
        shape that overflowed. True when the pass must be re-run."""
        if not checks:  # no MoE layer ran (a dense model)
            return False
        k = self.cfg.moe.num_experts_per_tok
        grew = False
        for overflow, cap, tokens, ranks in checks:
            if int(np.asarray(overflow).sum()) > 0:
                key = (tokens, ranks)
                self.capacity[key] = max(self.capacity[key], next_capacity(cap, tokens, k, ranks))
                grew = True
        return grew

    def _rec(self, role: str, stage: str, outputs, stream: str, deps=(), **meta):
        if self.timeline is None:
            return None
        return self.timeline.record(role, stage, outputs, stream=stream, deps=deps, **meta)

    def _run_pass(self, per_domain: list[list[MicroBatch]]) -> _PassResult:
        """Dispatch one pass (decode rows or prefill rows) of every domain, layer-major."""
        result = _PassResult()
        flights: dict[tuple[int, int], _Flight] = {}
        for dom, mbs in zip(self.domains, per_domain, strict=True):
            for mb in mbs:
                x = dom.embed(mb)
                flights[dom.index, mb.index] = _Flight(x, self._rec(
                    "attention", "embed", x, f"attention/d{dom.index}", domain=dom.index,
                    micro_batch=mb.index))
        moe = [self.cfg.is_moe_layer(i) for i in range(self.cfg.num_layers)]
        for layer in range(self.cfg.num_layers):
            for dom, mbs in zip(self.domains, per_domain, strict=True):
                returning = None  # the previous micro-batch, still at the experts
                for mb in mbs:
                    flight = flights[dom.index, mb.index]
                    self._settle(dom, mb, flight, layer - 1)
                    self._attend(dom, mb, flight, layer)
                    # E2A of the previous micro-batch goes after this attention, so that
                    # nothing queued on the attention devices waits for the experts.
                    if returning is not None:
                        self._receive(returning)
                    returning = None
                    if moe[layer]:
                        self._to_experts(dom, mb, flight, layer, result)
                        returning = flight
                if returning is not None:
                    self._receive(returning)
        for dom, mbs in zip(self.domains, per_domain, strict=True):
            for mb in mbs:
                flight = flights[dom.index, mb.index]
                self._settle(dom, mb, flight, self.cfg.num_layers - 1)
                logits = dom.head(flight.x, mb)
                self._rec("attention", "head", logits, f"attention/d{dom.index}",
                          (flight.event,), domain=dom.index, micro_batch=mb.index)
                result.logits.append((mb, logits))
        return result

    def _settle(self, dom: Domain, mb: MicroBatch, flight: _Flight, layer: int) -> None:
        """Combine a micro-batch's returned expert output into its residual stream."""
        if flight.pending is None:
            return
        flight.x = dom.combine(*flight.pending, mb)
        flight.event = self._rec("attention", f"combine_l{layer}", flight.x,
                                 f"attention/d{dom.index}", flight.pending_deps,
                                 domain=dom.index, micro_batch=mb.index, layer=layer)
        flight.pending, flight.pending_deps = None, ()

    def _attend(self, dom: Domain, mb: MicroBatch, flight: _Flight, layer: int) -> None:
        """Attention of one layer (KV pages donated), and its FFN when the layer is dense."""
        meta = {"domain": dom.index, "micro_batch": mb.index, "layer": layer}
        stream = f"attention/d{dom.index}"
        flight.x = dom.attention(layer, flight.x, mb)
        flight.event = self._rec("attention", f"attn_l{layer}", flight.x, stream,
                                 (flight.event,), **meta)
        if self.cfg.is_moe_layer(layer):
            return
        if not self.ffn:  # a MoE model's dense layers stay on attention
            flight.x = dom.ffn(layer, flight.x)
            flight.event = self._rec("attention", f"ffn_l{layer}", flight.x, stream,
                                     (flight.event,), **meta)
            return
        ffn, d = self.ffn[dom.index], dom.index
        nbytes = ffn.hop_bytes(flight.x) if self.timeline else 0
        sent = ffn.send(flight.x)
        send = self._rec("a2e", f"a2e_l{layer}", sent, f"a2e/d{d}", (flight.event,),
                         bytes=nbytes, **meta)
        out = ffn.compute(layer, sent)
        work = self._rec("expert", f"ffn_l{layer}", out, "expert", (send,), **meta)
        flight.x = ffn.receive(out)
        flight.event = self._rec("e2a", f"e2a_l{layer}", flight.x, f"e2a/d{d}", (work,),
                                 bytes=nbytes, **meta)

    def _to_experts(self, dom: Domain, mb: MicroBatch, flight: _Flight, layer: int,
                    result: _PassResult) -> None:
        """Gate and shared expert on attention, A2E, routed experts on the expert slice."""
        d, meta = dom.index, {"domain": dom.index, "micro_batch": mb.index, "layer": layer}
        a2e = self.a2e[d]
        service = self.shared[d] if self.shared else None
        x_TD, h_TD, ids_TK, w_TK, *shared = dom.gate(layer, flight.x, mb, service is None)
        gate = self._rec("attention", f"gate_l{layer}", (h_TD, ids_TK, w_TK, *shared),
                         f"attention/d{d}", (flight.event,), **meta)
        if service is not None:
            shared = [service(layer, h_TD)]
            gate = self._rec("shared_expert", f"shared_l{layer}", shared, "shared", (gate,),
                             **meta)
        shared_TD = shared[0]
        sent = a2e.send(h_TD, ids_TK, w_TK)
        to_bytes, back_bytes = a2e.hop_bytes(h_TD, ids_TK) if self.timeline else (0, 0)
        send = self._rec("a2e", f"a2e_l{layer}", sent, f"a2e/d{d}", (gate,), bytes=to_bytes,
                         **meta)
        tokens = mb.rows * mb.width
        cap = self._capacity_for(tokens, a2e.moe.n)
        out_TD, stats = a2e.compute_async(self._experts[d][layer], sent, cap)
        moe = self._rec("expert", f"moe_l{layer}", out_TD, "expert", (send,),
                        bytes=self._expert_bytes(a2e, cap, h_TD) if self.timeline else 0,
                        **meta)
        result.checks.append((stats.overflow, cap, tokens, a2e.moe.n))
        flight.returning = (a2e, out_TD, x_TD, shared_TD, gate, moe, back_bytes, meta)

    def _receive(self, flight: _Flight) -> None:
        """E2A: the routed output back to the attention ranks; its combine is now pending."""
        a2e, out_TD, x_TD, shared_TD, gate, moe, back_bytes, meta = flight.returning
        routed_TD = a2e.receive(out_TD)
        back = self._rec("e2a", f"e2a_l{meta['layer']}", routed_TD, f"e2a/d{meta['domain']}",
                         (moe,), bytes=back_bytes, **meta)
        flight.pending, flight.pending_deps = (x_TD, routed_TD, shared_TD), (gate, back)
        flight.returning = None

    def _expert_bytes(self, a2e: A2E, cap: int, h_TD) -> int:
        """Dispatch + combine buffers inside the expert mesh: every rank sends C rows to
        every rank each way."""
        n = a2e.moe.n
        return 2 * n * n * cap * h_TD.shape[-1] * h_TD.dtype.itemsize

    # -- observability ------------------------------------------------------------------------
    def stats(self) -> dict:
        return {
            "domains": len(self.domains),
            "ranks_per_domain": self.domains[0].num_ranks,
            "micro_batches": self.micro_batches,
            "steps": self.steps,
            "reruns": self.reruns,
            "capacity": {f"{t}x{n}": c for (t, n), c in sorted(self.capacity.items())},
            "compiles": sum(d.compile_count for d in self.domains),
            "expert_slots": self.expert_map.num_slots if self.expert_map else 0,
            "redundant_slots": self.expert_map.num_redundant if self.expert_map else 0,
            "shared_experts_on": "shared_devices" if self.shared else "attention",
            "dense_ffn_on": "expert_devices" if self.ffn else "attention",
            "num_running": sum(g.scheduler.num_running for g in self.groups),
            "num_waiting": sum(g.scheduler.num_waiting for g in self.groups),
        }
