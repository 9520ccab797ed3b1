"""An MA pool's step meets a fault at a hop: roll it back on every rank, recover, re-run.

xDeepServe §6: iteration rollback on communication errors and vertical scale-down of the
expert slice. Faults reach an MA step at ``FaultPoint``: every service the pipeline talks to
(routed experts, a dense model's FFN slice, shared experts) is wrapped so that each ``send``
(the A2E hop) first asks the engine's ``FaultInjector`` (``before_dispatch``).

``StepRecovery.run`` runs the step's passes; when a hop raises, the whole step is undone on
every attention rank: each group's scheduler ``roll_back`` puts its sequences back to be
recomputed from their tokens (the KV the step wrote lands in blocks that are freed and written
again before they are read; nothing is registered in the prefix cache before ``update``).
Then:

- ``CollectiveFailed`` (transient): the step is planned and run again, up to ``STEP_RETRIES``
  times; one more failure in a row fails the step's requests alone (``MAStepFailed``) and the
  pool serves on.
- ``ExpertRankLost``: ``shrink_expert_slice`` builds the expert slice without that device
  (the routed experts' services over the ``N - 1`` others, every layer's map without its
  slots, the surviving devices' slot weights re-labelled, not copied) and the step runs
  again on it. The attention domains, their KV and their programs are untouched.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from collectives.a2e import A2E
from collectives.expert_map import ExpertMap, ExpertMapError
from collectives.transport import TrampolineMap
from serving.core.faults import CollectiveFailed, ExpertRankLost
from serving.disagg.ma_layout import MALayout
from xds_jax.errors import ConfigError

log = logging.getLogger(__name__)

STEP_RETRIES = 2  # re-runs of an MA step after transient hop errors, before its requests fail


class ScaleDownError(ConfigError):
    """The expert slice cannot lose this rank (no such rank, already lost, a dense model's
    FFN slice, or an expert would be left with no replica)."""


class MAStepFailed(RuntimeError):
    """An MA step failed ``STEP_RETRIES + 1`` times in a row; its requests end with this."""


class FaultPoint:
    """A ``SliceService`` whose ``send`` (each hop to the expert slice) first lets the engine's
    fault injector raise (``FaultInjector.before_dispatch``); everything else passes through."""

    def __init__(self, service, pool) -> None:
        self.inner = service
        self.pool = pool

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def send(self, *arrays, **kwargs):
        self.pool.faults.before_dispatch(self.pool)
        return self.inner.send(*arrays, **kwargs)


def guard(parts: list, pool) -> list:
    """``DomainParts`` whose services are wrapped in ``FaultPoint``s."""
    wrap = lambda s: FaultPoint(s, pool) if s is not None else None  # noqa: E731
    return [dataclasses.replace(p, routed=wrap(p.routed), ffn=wrap(p.ffn),
                                shared=wrap(p.shared)) for p in parts]


class StepRecovery:
    """What one MA pool does when a hop of its step fails (module docstring).

    ``rollbacks``: step attempts undone on every rank; ``scale_downs``: expert devices taken
    out; ``lost``: the deployment's expert ranks taken out, in order.
    """

    def __init__(self, pool) -> None:
        self.pool = pool
        self.deployed = tuple(pool.layout.expert_devices)  # ``rank`` indexes these
        self.rollbacks = 0
        self.scale_downs = 0
        self.lost: list[int] = []

    def run(self, plans: list, run_passes) -> list | None:
        """``run_passes(plans)``, re-planned and re-run after each recovered fault. Returns
        the plans that ran (to complete), or None when nothing is left to run or the step
        failed its requests."""
        failures = 0
        while True:
            try:
                run_passes(plans)
                return plans
            except (CollectiveFailed, ExpertRankLost) as error:
                self._roll_back(plans)
                if isinstance(error, ExpertRankLost):
                    log.error("MA step: %s; scaling the expert slice down", error)
                    self.pool.scale_down(error.rank)
                else:
                    failures += 1
                    log.warning("MA step: %s (failure %d); rolled back on every rank",
                                error, failures)
                    if failures > STEP_RETRIES:
                        self._fail(plans, error, failures)
                        return None
            plans = [g.plan() for g in self.pool.groups]
            if all(p is None for p in plans):
                return None

    def _roll_back(self, plans: list) -> None:
        for group, out in zip(self.pool.groups, plans, strict=True):
            if out is not None:
                group.scheduler.roll_back(out)
        self.rollbacks += 1

    def _fail(self, plans: list, error: Exception, attempts: int) -> None:
        """End the requests of a step that kept failing; the pool serves on."""
        failure = MAStepFailed(f"an MA step failed {attempts} times in a row (last: "
                               f"{type(error).__name__}: {error}); its requests fail")
        for group, out in zip(self.pool.groups, plans, strict=True):
            if out is not None:
                for request in group.requests_in(out):
                    group.fail_request(request, failure)

    # -- scale-down ---------------------------------------------------------------------------
    def position(self, rank: int) -> int:
        """Where the deployment's expert rank ``rank`` is in the current slice; raises
        ``ScaleDownError`` if the slice cannot lose it."""
        layout = self.pool.layout
        if layout.expert_map is None:
            raise ScaleDownError("a dense model's FFN slice has no expert replicas to fall "
                                 "back on; expert_rank_down needs a MoE model")
        if not 0 <= rank < len(self.deployed):
            raise ScaleDownError(f"field 'rank': expert rank {rank} does not exist "
                                 f"({len(self.deployed)} routed-expert devices)")
        if rank in self.lost:
            raise ScaleDownError(f"field 'rank': expert rank {rank} is out of service already")
        index = layout.expert_devices.index(self.deployed[rank])
        reb = self.pool.rebalancer
        try:
            for emap in [layout.expert_map, *(reb.maps.values() if reb else ())]:
                emap.without_device(index)
        except ExpertMapError as e:  # it names the device by its place in today's slice
            raise ScaleDownError(f"cannot scale the expert slice down to lose expert rank "
                                 f"{rank} (device {index} of the {len(layout.expert_devices)} "
                                 f"left): {e}") from None
        return index


def shrink_expert_slice(layout: MALayout, services: list[A2E], index: int,
                        maps: dict[int, ExpertMap]) -> tuple[MALayout, list[A2E], list]:
    """The expert slice without its device ``index``: the new layout, one routed-expert
    service per domain over the surviving devices (layer maps ``maps`` without the device),
    and ``(service, {layer: slot weights})`` per distinct placement. A surviving device keeps
    its slot shards: the weights are re-labelled onto the smaller mesh, nothing is copied."""
    devices = layout.expert_devices[:index] + layout.expert_devices[index + 1:]
    smaller = dataclasses.replace(
        layout, expert_devices=devices, expert_map=layout.expert_map.without_device(index),
        trampolines=TrampolineMap.spread(layout.ranks_per_domain, len(devices)))
    mesh = smaller.expert_mesh()
    placed: dict = {}  # (old weights, new run devices) -> new weights, shared as before
    out, distinct = [], []
    for old, attn in zip(services, smaller.domain_meshes, strict=True):
        new = A2E(attn, mesh, smaller.expert_map, mode=layout.a2e_mode, int8=old.int8)
        key = (id(old.weights), tuple(new.run_devices))
        if key not in placed:
            placed[key] = {layer: _relabel(tree, new) for layer, tree in old.weights.items()}
            distinct.append((new, placed[key]))
        new.use_weights(placed[key])
        for layer, emap in maps.items():
            new.set_map(layer, emap.without_device(index))
        out.append(new)
    return smaller, out, distinct


def _relabel(tree: dict, service: A2E) -> dict:
    """Slot weights on the service's run mesh from the shards its devices already hold."""
    sharding = NamedSharding(service.moe.mesh, P(service.moe.axis))
    devices = service.run_devices
    out = {}
    for name, leaf in tree.items():
        shards = {sh.device: sh.data for sh in leaf.addressable_shards}
        rows = shards[devices[0]].shape[0]
        out[name] = jax.make_array_from_single_device_arrays(
            (rows * len(devices),) + leaf.shape[1:], sharding, [shards[d] for d in devices])
    return out
