"""FlowServe engine: DP groups on their own devices behind a thin control plane.

``Engine`` builds one ``DPGroup`` per device slice (or takes the groups and drivers a
deployment built), places each request on an entry group with the ``Balancer`` and either
steps its ``Driver``s inline until given requests finish (the ``LLM`` path) or gives each
driver its own thread (the server path). Python's garbage collector is kept out of steps:
automatic collection is off while the engine runs, and it collects between steps instead.
"""

from __future__ import annotations

import gc
import logging
import threading
import time

import jax

from serving.core.balancer import Balancer
from serving.core.dp_group import DPGroup, GroupConfig
from serving.core.interfaces import Driver, Router
from serving.core.request import Request
from xds_jax.engine_config import EngineConfig
from xds_jax.model.config import ModelConfig

log = logging.getLogger(__name__)

GC_YOUNG_EVERY = 64  # steps between generation-0 collections
GC_FULL_EVERY = 2048  # steps between full collections
IDLE_WAIT_S = 0.05  # an idle driver waits this long on its groups' inboxes between steps


class StepGC:
    """Collect garbage only at step boundaries."""

    def __init__(self) -> None:
        self._steps = 0
        self._was_enabled = gc.isenabled()

    def __enter__(self) -> StepGC:
        gc.disable()
        return self

    def __exit__(self, *exc) -> None:
        if self._was_enabled:
            gc.enable()

    def after_step(self) -> None:
        self._steps += 1
        if self._steps % GC_FULL_EVERY == 0:
            gc.collect()
        elif self._steps % GC_YOUNG_EVERY == 0:
            gc.collect(0)


class Engine:
    """Several self-contained DP groups and the control plane that feeds them.

    Built from ``devices`` (one colocated group each), or from ready ``groups`` (the
    disaggregated layouts of ``serving.disagg.deploy``): ``entry`` are the groups new requests go
    to (the prefill pool in PD), ``drivers`` what steps them (a group steps itself; an MA
    pool steps all its attention groups at once), ``router`` what moves requests between
    groups (PD). ``timeline`` records what the steps did.
    """

    def __init__(self, params: dict | None, cfg: ModelConfig, devices: list | None = None,
                 group_config: GroupConfig | None = None, *, groups: list | None = None,
                 entry: list | None = None, drivers: list[Driver] | None = None,
                 router: Router | None = None, timeline=None):
        self.cfg = cfg
        self.group_config = group_config = group_config or GroupConfig()
        if groups is None:
            devices = devices or [jax.devices()[0]]
            groups = [DPGroup(i, params, cfg, d, group_config) for i, d in enumerate(devices)]
        self.groups = groups
        self.entry = entry or groups
        self.drivers = drivers or groups
        self.router = router
        self.timeline = timeline
        self.balancer = Balancer()
        self._placement: dict[str, DPGroup] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- control plane ------------------------------------------------------------------------
    def submit(self, request: Request) -> int:
        """Place a request on an entry group; returns the group's index."""
        with self._lock:
            index = self.balancer.choose([g.load() for g in self.entry], request.prompt_ids)
            group = next(g for g in self.entry if g.index == index)
            self._placement[request.request_id] = group
        group.submit(request)
        return group.index

    def abort(self, request_id: str) -> None:
        """Abort wherever the request is: its entry group, and (disaggregated) every group it
        may have moved to or be moving to; groups ignore ids they never see."""
        with self._lock:
            placed = self._placement.pop(request_id, None)
        if placed is None:
            return
        for g in self.groups:
            if g is placed or g not in self.entry:
                g.abort(request_id)

    def release(self, request_id: str) -> None:
        """Forget a finished request's placement."""
        with self._lock:
            self._placement.pop(request_id, None)

    # -- running ------------------------------------------------------------------------------
    def run(self, seqs: list) -> None:
        """Run sequences to completion inline (the ``LLM.generate`` contract)."""
        self.run_until_done([
            Request(f"seq-{s.seq_id}", None, s.prompt_ids, s.params, [s]) for s in seqs
        ])

    def run_until_done(self, requests: list[Request]) -> None:
        """Submit ``requests`` and step all groups inline until they have finished."""
        for r in requests:
            self.submit(r)
        with StepGC() as collector:
            while not all(r.finished for r in requests):
                busy = False
                for d in self.drivers:
                    busy |= d.step()
                if not busy and not any(d.has_work() for d in self.drivers):
                    raise RuntimeError("engine idle with unfinished requests")
                collector.after_step()
        for r in requests:
            self.release(r.request_id)

    def start(self) -> None:
        """Give every driver its own loop thread."""
        if self._threads:
            return
        self._stop.clear()
        self._gc = StepGC().__enter__()  # collection only between steps while threads run
        for d in self.drivers:
            t = threading.Thread(target=drive, args=(d, self._stop, self._gc.after_step),
                                 name=_thread_name(d), daemon=True)
            t.start()
            self._threads.append(t)

    def shutdown(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=10)
        if self._threads:
            self._gc.__exit__(None, None, None)
        self._threads = []

    # -- observability ------------------------------------------------------------------------
    def stats(self) -> dict:
        loads = [g.load() for g in self.groups]
        schedulers = [g.scheduler for g in self.groups]
        return {
            "num_groups": len(self.groups),
            "num_running": sum(x.num_running for x in loads),
            "num_waiting": sum(x.num_waiting for x in loads),
            "kv_usage": sum(x.kv_usage for x in loads) / len(loads),
            "prefix_hit_rate": _mean([s.prefix_hit_rate for s in schedulers]),
            "num_preemptions": sum(s.num_preemptions for s in schedulers),
            "healthy_groups": sum(x.healthy for x in loads),
            "compiles": sum(g.runner.compile_count for g in self.groups),
            "prompt_tokens_total": sum(g.prompt_tokens for g in self.groups),
            "prefill_tokens_total": sum(g.prefill_tokens for g in self.groups),
            "generation_tokens_total": sum(g.generated_tokens for g in self.groups),
            "batch_size": sum(g.last_batch[0] for g in self.groups),
            "batched_tokens": sum(g.last_batch[1] for g in self.groups),
            "heartbeat_age_s": max(time.monotonic() - g.last_heartbeat for g in self.groups),
        } | (self.router.stats() if self.router is not None else {}) | self._driver_stats() \
          | self._spec_stats() | self._expert_stats()

    def _expert_stats(self) -> dict:
        """Per-expert load of the last window and EPLB counters, from the drivers that have
        experts to balance (``Driver.expert_stats``; colocated groups report none)."""
        out: dict = {}
        for d in self.drivers:
            out |= d.expert_stats()
        return out

    def _spec_stats(self) -> dict:
        """Speculative-decoding counters summed over the groups that draft (none: empty)."""
        out: dict = {}
        for g in self.groups:
            for key, value in getattr(g.runner, "spec_stats", dict)().items():
                if isinstance(value, list):
                    old = out.get(key, [0] * len(value))
                    out[key] = [a + b for a, b in zip(old, value, strict=True)]
                else:
                    out[key] = out.get(key, 0) + value
        return out

    def _driver_stats(self) -> dict:
        """Numeric counters of drivers that step many groups (MA pools), summed and prefixed
        ``ma_``; a group driving itself has none."""
        out: dict = {}
        for d in self.drivers:
            for key, value in d.stats().items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    out[f"ma_{key}"] = out.get(f"ma_{key}", 0) + value
        return out


def drive(driver: Driver, stop: threading.Event, after_step=lambda: None) -> None:
    """A driver's loop until ``stop`` is set: step while there is work, otherwise wait on its
    groups' inboxes; ``after_step`` runs between busy steps (garbage collection). If a step
    raises, every group the driver steps fails (unhealthy; its requests end aborted)."""
    groups = driver.groups
    while not stop.is_set():
        try:
            busy = driver.step()
        except Exception as error:
            log.exception("%s failed; marking its %d groups unhealthy", _thread_name(driver),
                          len(groups))
            for g in groups:
                g.fail(f"{type(error).__name__}: {error}")
            return
        if busy:
            after_step()
            continue
        for g in groups:  # an idle pool wakes when any of its groups gets a message
            if g.wait_for_work(IDLE_WAIT_S / len(groups)):
                break


def _thread_name(driver: Driver) -> str:
    """``decode-3`` for a group driving itself, ``decode-4..7`` for a pool of groups."""
    first, last = driver.groups[0], driver.groups[-1]
    return f"{first.role}-{first.index}" + (f"..{last.index}" if last is not first else "")


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def group_config_for(params: dict, cfg: ModelConfig, max_model_len: int,
                     config: EngineConfig) -> GroupConfig:
    """A group's capacity from the engine's: a KV pool sized to fit ``kv_cache_bytes`` (but
    no more than ``max_num_seqs`` full contexts, and at least one)."""
    itemsize = jax.tree_util.tree_leaves(params)[0].dtype.itemsize
    block_size = config.block_size
    per_block = max(cfg.kv_bytes_per_token(itemsize) * block_size, 1)
    per_seq = -(-max_model_len // block_size)
    num_blocks = max(per_seq, min(config.kv_cache_bytes // per_block,
                                  per_seq * config.max_num_seqs))
    return GroupConfig(num_blocks=int(num_blocks), block_size=block_size,
                       max_num_seqs=config.max_num_seqs,
                       max_num_batched_tokens=config.max_num_batched_tokens,
                       enable_prefix_caching=config.enable_prefix_caching,
                       staged=config.staged,
                       num_speculative_tokens=config.num_speculative_tokens)


def build_colocated_engine(params: dict, cfg: ModelConfig, max_model_len: int,
                           config: EngineConfig, devices: list | None = None) -> Engine:
    """An engine with ``config.num_dp_groups`` colocated groups on the first ``devices``."""
    devices = devices or jax.devices()
    if not config.num_dp_groups <= len(devices):
        raise ValueError(f"num_dp_groups must be in 1..{len(devices)} (devices available), "
                         f"got {config.num_dp_groups}")
    group = group_config_for(params, cfg, max_model_len, config)
    return Engine(params, cfg, list(devices[:config.num_dp_groups]), group)
