"""MoE-attention (MA) disaggregated decode: attention domains take turns on one expert slice.

xDeepServe §5.2 / Fig. 19. ``MAPool`` is the engine's driver for an MA deployment
(``serving.core.interfaces.Driver``). From an ``MALayout`` (``serving.disagg.ma_layout``,
built once by the deployment) it builds:

- one ``Domain`` per attention domain (``serving.disagg.ma_runner``: SPMD stage programs over
  its ranks, KV pages sharded on the page axis) and one DP group per rank, whose runner is a
  ``RankView`` (``serving.disagg.ma_rank``);
- the services each domain talks to, all over ``collectives.transport``: routed experts
  (``collectives.a2e.A2E``, slot weights placed once per expert mesh), a dense model's FFN
  (``FfnSlice``) and the shared experts on their own dies (``SharedExperts``);
- a ``LayerPipeline`` (``serving.disagg.ma_pipeline``) that dispatches a pass layer-major,
  a ``CapacityPolicy`` (``serving.disagg.ma_capacity``) for the experts' fixed capacity, and,
  with a timeline, the tracing wrappers of ``serving.disagg.ma_trace``.

A step plans every group, runs the decode pass and the prefill pass of every domain, reads
the overflow flags once and re-runs a pass whose experts overflowed (grow-only capacity; the
re-run rewrites the same KV slots), samples, and completes the groups. With
``num_speculative_tokens`` the decode pass drafts on the attention ranks and verifies
``k + 1`` tokens per sequence (``serving.disagg.ma_spec``).
"""

from __future__ import annotations

import logging

import numpy as np

from collectives.a2e import A2E
from collectives.eplb import device_loads, max_over_mean
from serving.core.dp_group import DPGroup, GroupConfig
from serving.core.faults import NO_FAULTS
from serving.core.spec_decode import check_speculative, default_disable_by_batch_size
from serving.core.spec_state import SpecState
from serving.core.step_rows import MIN_DECODE_ROWS, MIN_PREFILL_WIDTH
from serving.core.timeline import Timeline
from serving.disagg.eplb_config import EplbConfig
from serving.disagg.ma_capacity import CapacityPolicy
from serving.disagg.ma_eplb import ExpertLoadCounter, ExpertRebalancer
from serving.disagg.ma_layout import MALayout
from serving.disagg.ma_pipeline import DomainParts, LayerPipeline, RecordingPipeline
from serving.disagg.ma_rank import RankView
from serving.disagg.ma_recovery import StepRecovery, guard, shrink_expert_slice
from serving.disagg.ma_runner import Domain, MicroBatch
from serving.disagg.ma_slices import FfnSlice, SharedExperts
from serving.disagg.ma_spec import MADrafter, SpecPass
from serving.disagg.ma_trace import TracedDomain, TracedService, Tracer
from xds_jax.generate import sample_rows
from xds_jax.model.config import ModelConfig
from xds_jax.multihost import fetch

log = logging.getLogger(__name__)

# (kind, decode rows?, smallest row bucket, smallest width bucket)
PASSES = (("decode", True, MIN_DECODE_ROWS, 1), ("prefill", False, 1, MIN_PREFILL_WIDTH))


def _is_decode(s) -> bool:
    return s.num_tokens == 1 and s.start > 0


class MAPool:
    """All attention DP groups of an MA deployment and the slices they share.

    Args:
      params: full model parameters (routed experts go to the expert slice, the rest is
        replicated on every attention domain).
      cfg: the model.
      layout: the deployment's ``MALayout``.
      group_config: per attention rank: KV blocks, block size, max sequences and tokens.
      micro_batches: micro-batches per domain and step (fewer when ranks have fewer rows).
      timeline: records every stage (roles attention, a2e, expert, e2a, shared_expert).
      capacity: initial expert capacity (rows per destination rank), default the smallest
        bucket; it only grows.
      group_factory: builds each DP group, ``(index, None, cfg, device, config, runner=)``.
      eplb: expert load windows and, when enabled, rebalancing (``EplbConfig``; checked
        against the model and the slots here).
    """

    name = "ma"

    def __init__(self, params: dict, cfg: ModelConfig, layout: MALayout,
                 group_config: GroupConfig | None = None, *, micro_batches: int = 2,
                 timeline: Timeline | None = None, capacity: int | None = None,
                 group_factory=DPGroup, eplb: EplbConfig | None = None):
        if micro_batches < 1:
            raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
        emap = layout.expert_map  # EPLB options checked before anything is placed
        self.eplb = (eplb or EplbConfig()).resolve(cfg.moe.num_experts if cfg.moe else None,
                                                    emap.num_slots if emap else None,
                                                    repr(layout.name))
        self.cfg = cfg
        self.layout = layout
        self.group_config = config = group_config or GroupConfig()
        self.micro_batches = micro_batches
        k = config.num_speculative_tokens
        if k:
            check_speculative(params, k)
        self.domains: list[Domain] = []
        self._groups: list = []
        for d, mesh in enumerate(layout.domain_meshes):
            domain = Domain(d, mesh, params, cfg, config.num_blocks, config.block_size,
                            layout.first_rank(d), mtp=bool(k))
            self.domains.append(domain)
            for r in range(domain.num_ranks):
                spec = SpecState(k, cfg.hidden_size) if k else None
                self._groups.append(group_factory(domain.first_rank + r, None, cfg,
                                                  domain.devices[r], config,
                                                  runner=RankView(domain, r, spec)))
        limit = config.spec_disable_by_batch_size
        if k and limit is None:
            limit = default_disable_by_batch_size(self.domains[0].devices[0])
        self.drafter = (MADrafter(k, [g.runner.spec for g in self._groups], cfg.num_layers,
                                  limit) if k else None)
        self._mtp_moe = bool(k) and "moe" in params["mtp"][0]["layer"]
        self.parts = [DomainParts(dom) for dom in self.domains]
        self._placed: list[tuple] = []  # (service, {layer: slot weights}) per expert mesh
        self._build_services(params)
        self.capacity = (CapacityPolicy(cfg.moe.num_experts_per_tok, capacity)
                         if cfg.moe is not None else None)
        self._build_eplb(params)
        self.reruns = 0
        self.steps = 0
        self.faults = NO_FAULTS  # the engine's FaultInjector (hops consult it)
        self.recovery = StepRecovery(self)
        self.timeline = timeline

    def _build_services(self, params: dict) -> None:
        layout, cfg = self.layout, self.cfg
        placed: dict = {}  # expert slot weights per run mesh, shared by the domains on it
        for part, mesh in zip(self.parts, layout.domain_meshes, strict=True):
            if layout.expert_map is None:
                part.ffn = FfnSlice(mesh, list(dict.fromkeys(layout.ffn_devices())), params,
                                    cfg)
                continue
            part.routed = A2E(mesh, layout.expert_mesh(), layout.expert_map,
                              mode=layout.a2e_mode, int8=layout.dispatch_dtype == "int8")
            key = tuple(part.routed.run_devices)
            if key not in placed:
                placed[key] = {i: part.routed.place_experts(layer["moe"]["experts"])
                               for i, layer in enumerate(params["layers"])
                               if cfg.is_moe_layer(i)}
                if self._mtp_moe:  # the MTP block's experts: one more layer on the slice
                    placed[key][cfg.num_layers] = part.routed.place_experts(
                        params["mtp"][0]["layer"]["moe"]["experts"])
                self._placed.append((part.routed, placed[key]))
            part.routed.use_weights(placed[key])
            if layout.shared_devices:
                part.shared = SharedExperts(mesh, list(layout.shared_devices), params, cfg)

    def _build_eplb(self, params: dict) -> None:
        """Load counters (MoE models) and, with EPLB enabled, the rebalancer."""
        emap = self.layout.expert_map
        self.load = self.rebalancer = None
        if emap is None:
            return
        experts = {i: layer["moe"]["experts"] for i, layer in enumerate(params["layers"])
                   if self.cfg.is_moe_layer(i)}
        if self._mtp_moe:  # the MTP block's experts: balanced like a target layer
            experts[self.cfg.num_layers] = params["mtp"][0]["layer"]["moe"]["experts"]
        history = -(-self.eplb.step_interval // self.eplb.window_size)
        self.load = ExpertLoadCounter(list(experts), emap.num_experts, self.eplb.window_size,
                                      history)
        self._since_rebalance = 0
        if self.eplb.enabled:
            host = {i: {k: np.asarray(v) for k, v in tree.items()}
                    for i, tree in experts.items()}
            self.rebalancer = ExpertRebalancer([p.routed for p in self.parts], self._placed,
                                               host, emap, self.eplb.num_redundant_experts)

    def _eplb_step(self, runs: list) -> None:
        """After a step: count its final pipeline runs (``PassResult``s: a drafting pass's
        MTP runs too), switch on a swap whose weights are ready, and at a window boundary
        start a rebalance when one is due."""
        if self.load is None:
            return
        for result in runs:
            self.load.add(result.load)
            self.load.add_slots(result.slot_rows, len(self.layout.expert_devices))
        reb = self.rebalancer
        if reb is not None and reb.poll():
            self.capacity.reset()  # balanced load may fit smaller buckets
        self._since_rebalance += 1
        if not self.load.step() or reb is None:
            return
        if self._since_rebalance >= self.eplb.step_interval and reb.pending is None:
            windows = -(-self._since_rebalance // self.eplb.window_size)
            self._since_rebalance = 0
            reb.start(self.load.time_slices(windows))

    def expert_load(self) -> dict[int, list[int]]:
        """Tokens per logical expert of each MoE layer in the last complete window (all
        attention ranks of every domain); empty before the first window or for a dense
        model."""
        if self.load is None:
            return {}
        return {layer: counts.tolist() for layer, counts in self.load.last_window.items()}

    def expert_imbalance(self) -> float:
        """Max / mean tokens per expert device in the last window, under each layer's current
        map (an expert's tokens split evenly over its replicas), worst layer; 0 before the
        first window."""
        if self.load is None or not self.load.last_window:
            return 0.0
        maps = self.rebalancer.maps if self.rebalancer else {}
        return max(max_over_mean(device_loads(maps.get(layer, self.layout.expert_map), c))
                   for layer, c in self.load.last_window.items())

    def expert_stats(self) -> dict:
        """What the engine's ``stats()`` shows unprefixed: ``expert_load`` (per layer, per
        expert, last window, counted on the attention ranks), ``expert_device_load`` (per
        layer, tokens each expert device received in the last window, counted on the expert
        ranks) and ``eplb_rebalances``."""
        reb = self.rebalancer
        devices = self.load.last_device_window if self.load else {}
        return {"expert_load": self.expert_load(),
                "expert_device_load": {layer: c.tolist() for layer, c in devices.items()},
                "eplb_rebalances": reb.rebalances if reb else 0}

    def expert_side_weights(self) -> list:
        """Every weight tree placed off the attention ranks, each once: routed-expert slots
        (shared by the domains on one expert mesh), a dense model's FFN copies and the
        shared-expert copies (one per domain). What ``xds plan`` counts for the expert slice."""
        trees, seen = [], set()
        for part in self.parts:
            for service in (part.routed, part.ffn, part.shared):
                if service is not None and id(service.weights) not in seen:
                    seen.add(id(service.weights))
                    trees.append(service.weights)
        return trees

    @property
    def timeline(self) -> Timeline | None:
        return self._timeline

    @timeline.setter
    def timeline(self, timeline: Timeline | None) -> None:
        """Tracing wraps the domains and services; without a timeline they run bare."""
        self._timeline = timeline if timeline is not None and timeline.enabled else None
        self._tracer = Tracer(self._timeline) if self._timeline is not None else None
        parts = self.parts
        if self._tracer is not None:
            wrap = lambda s: TracedService(s, self._tracer) if s else None  # noqa: E731
            parts = [DomainParts(TracedDomain(p.domain, self._tracer), wrap(p.routed),
                                 wrap(p.ffn), wrap(p.shared)) for p in parts]
        self.pipeline = LayerPipeline(self.cfg, guard(parts, self), self.capacity,
                                      mtp_moe=self._mtp_moe)

    def check_scale_down(self, rank: int) -> None:
        """Raise ``ScaleDownError`` if the expert slice cannot lose the deployment's expert
        rank ``rank`` (``serving.disagg.ma_recovery``)."""
        self.recovery.position(rank)

    def scale_down(self, rank: int) -> None:
        """Vertical scale-down between steps: the expert slice goes on without the
        deployment's expert rank ``rank``; its slots are never routed to again (every layer's
        map rebuilt without them). Attention is not touched."""
        index = self.recovery.position(rank)
        reb = self.rebalancer
        self.layout, services, self._placed = shrink_expert_slice(
            self.layout, [p.routed for p in self.parts], index, dict(reb.maps) if reb else {})
        for part, service in zip(self.parts, services, strict=True):
            part.routed = service
        if reb is not None:
            reb.scale_down(services, self._placed, index)
        self.recovery.lost.append(rank)
        self.recovery.scale_downs += 1
        self.timeline = self._timeline  # the pipeline over the new services
        log.warning("expert rank %d out of service: %d expert devices, %d redundant slots",
                    rank, len(self.layout.expert_devices), self.layout.expert_map.num_redundant)

    @property
    def expert_map(self):
        """The routed experts' slot table (None for a dense model)."""
        return self.layout.expert_map

    # -- Driver -------------------------------------------------------------------------------
    @property
    def groups(self) -> list:
        return self._groups

    def has_work(self) -> bool:
        return any(g.has_work() for g in self._groups)

    def step(self) -> bool:
        """Plan every group, run every domain's passes interleaved, sample, complete.
        Returns False when no group had work."""
        if self.drafter is not None:
            self.drafter.prune()
        plans = [g.plan() for g in self._groups]
        if all(p is None for p in plans):
            return False
        plans = self.recovery.run(plans, self._run_passes)  # hop faults: roll back, re-run
        if plans is None:
            return True
        for group, out in zip(self._groups, plans, strict=True):
            if out is not None:
                group.complete(out)
        self.steps += 1
        return True

    def _run_passes(self, plans: list) -> None:
        """The step's decode and prefill passes (re-run on expert overflow), sampling and the
        EPLB bookkeeping."""
        passes = {}
        for spec in PASSES:
            per_domain = self._micro_batches(plans, *spec)
            if any(per_domain):
                passes[spec[0]] = per_domain
        results, runs, todo = {}, {}, list(passes)
        while todo:
            for kind in todo:
                if self._tracer is not None:
                    self._tracer.reset()
                results[kind], runs[kind] = self._run_pass(kind, passes[kind])
            todo = [kind for kind in todo
                    if self.capacity is not None and self.capacity.grow(results[kind].checks)]
            if todo:
                self.reruns += 1
                log.info("expert capacity overflow: re-running %s (capacities %s)", todo,
                         self.capacity.snapshot())
        for result in results.values():
            if isinstance(result, SpecPass):
                self.drafter.finish_decode(result, self.cfg.vocab_size)
            for mb, logits in result.logits:
                sample_rows(fetch(logits), mb.seqs, self.cfg.vocab_size)
            if isinstance(result, SpecPass):
                self.drafter.finish_prefill(result)
        self._eplb_step([run for kind_runs in runs.values() for run in kind_runs])

    def _run_pass(self, kind: str, per_domain: list[list[MicroBatch]]) -> tuple:
        """One pass of every domain, and every pipeline run it made (what EPLB counts); with
        drafting, decode drafts and verifies (``serving.disagg.ma_spec``) and prefill also
        feeds the MTP block."""
        if self.drafter is None:
            result = self.pipeline.run(per_domain)
            return result, [result]
        pipeline = RecordingPipeline(self.pipeline)
        if kind == "decode":
            return self.drafter.decode(pipeline, per_domain), pipeline.runs
        return self.drafter.prefill(pipeline, pipeline.run(per_domain)), pipeline.runs

    def _micro_batches(self, plans: list, kind: str, decode: bool, rows_min: int,
                       width_min: int) -> list[list[MicroBatch]]:
        """Each domain's micro-batches of one pass (decode rows or prefill rows)."""
        out = []
        for dom in self.domains:
            per_rank = [[s for s in plan.scheduled if _is_decode(s) == decode] if plan else []
                        for plan in plans[dom.first_rank:dom.first_rank + dom.num_ranks]]
            out.append(dom.micro_batches(per_rank, self.micro_batches, rows_min, width_min,
                                         kind) if any(per_rank) else [])
        return out

    def stats(self) -> dict[str, float]:
        """Flat counters (the engine adds them as ``ma_*``)."""
        emap = self.layout.expert_map
        return {
            "domains": len(self.domains),
            "ranks_per_domain": self.layout.ranks_per_domain,
            "micro_batches": self.micro_batches,
            "steps": self.steps,
            "reruns": self.reruns,
            "rollbacks": self.recovery.rollbacks,
            "scale_downs": self.recovery.scale_downs,
            "compiles": sum(d.compile_count for d in self.domains),
            "expert_slots": emap.num_slots if emap else 0,
            "redundant_slots": emap.num_redundant if emap else 0,
            "max_capacity": max(self.capacity.by_shape.values(), default=0)
            if self.capacity else 0,
            "load_windows": self.load.windows if self.load else 0,
            "expert_imbalance": self.expert_imbalance(),
            "eplb_rebalances": self.rebalancer.rebalances if self.rebalancer else 0,
            "eplb_swap_ms": self.rebalancer.last_swap_ms if self.rebalancer else 0.0,
            "eplb_stall_ms": self.rebalancer.last_stall_ms if self.rebalancer else 0.0,
            "eplb_moved_slots": self.rebalancer.moved_slots if self.rebalancer else 0,
            "num_running": sum(g.scheduler.num_running for g in self._groups),
            "num_waiting": sum(g.scheduler.num_waiting for g in self._groups),
        }
