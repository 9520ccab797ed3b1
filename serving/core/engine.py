"""FlowServe engine: DP groups on their own devices behind a thin control plane.

``Engine`` builds one ``DPGroup`` per device slice (or takes the groups and drivers a
deployment built), places each request on an entry group with the ``Balancer`` and either
steps its ``Driver``s inline until given requests finish (the ``LLM`` path) or gives each
driver its own thread (the server path). Python's garbage collector is kept out of steps:
automatic collection is off while the engine runs, and it collects between steps instead.

Reliability (``docs/reliability.md``): a group whose loop raises (a crash), or whose heartbeat
stops for ``heartbeat_timeout_s`` (a stall; threaded engines watch for it), is taken out of
service by ``recover``: its requests continue on healthy groups, recomputed from their tokens
(``resume``). Faults are injected through ``self.faults`` (``serving.core.faults``).
"""

from __future__ import annotations

import logging
import threading
import time

import jax

from serving.core.balancer import Balancer, NoHealthyGroupError
from serving.core.dp_group import DPGroup, GroupConfig
from serving.core.engine_runs import reset_groups, run_until_done
from serving.core.faults import FaultInjector, FaultSpec, InjectedFault
from serving.core.fencing import GroupFencedError, Recovery, Resume
from serving.core.heartbeat import watch_heartbeats
from serving.core.interfaces import AddRequest, Driver, EngineMisuseError, Router
from serving.core.request import Request
from serving.core.request_outcomes import DuplicateRequestError
from serving.core.step_gc import StepGC
from xds_jax.engine_config import EngineConfig
from xds_jax.model.config import ModelConfig
from xds_jax.model.params import model_dtype

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.05  # an idle driver waits this long on its groups' inboxes between steps
EVACUATE_WAIT_S = 0.5  # the monitor waits this long for a stalled group's state, then retries


class Engine:
    """Several self-contained DP groups and the control plane that feeds them.

    Built from ``devices`` (one colocated group each), or from ready ``groups`` (the
    disaggregated layouts of ``serving.disagg.deploy``): ``entry`` are the groups new requests go
    to (the prefill pool in PD), ``drivers`` what steps them (a group steps itself; an MA
    pool steps all its attention groups at once), ``router`` what moves requests between
    groups (PD). ``timeline`` records what the steps did. ``faults`` are armed at once (specs
    or their text); ``heartbeat_timeout_s`` (None: no monitor) bounds how long a group of a
    started engine may go without a heartbeat before its work is moved.
    """

    def __init__(self, params: dict | None, cfg: ModelConfig, devices: list | None = None,
                 group_config: GroupConfig | None = None, *, groups: list | None = None,
                 entry: list | None = None, drivers: list[Driver] | None = None,
                 router: Router | None = None, timeline=None,
                 faults: tuple[str | FaultSpec, ...] = (),
                 heartbeat_timeout_s: float | None = None):
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
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.requests_recovered = 0  # requests moved off groups taken out of service
        self.scale_downs = 0  # groups taken out of service
        self.rejoins = 0  # stalled groups back in service
        self._crashed: set[int] = set()  # groups whose loop died: they never rejoin
        self._pending: list[DPGroup] = []  # fenced, their state not yet taken (stalled inside)
        self.recoveries: list[Recovery] = []
        self._recovering = threading.RLock()
        self.faults = FaultInjector(self.groups, self.drivers, router)
        for g in [*self.groups, *self.drivers]:  # an MA pool's hops consult it too
            g.faults = self.faults
        if router is not None:
            router.on_lost = self.resume  # PD sequences whose hand-off failed
        for spec in faults:
            self.faults.add(spec)

    # -- control plane ------------------------------------------------------------------------
    def submit(self, request: Request) -> int:
        """Place a request on an entry group; returns the group's index. An id already
        placed is a ``DuplicateRequestError`` (two requests under one id: an abort or the
        output of one would reach the other)."""
        return self._place(request, AddRequest(request))

    def placed(self, request_id: str) -> bool:
        """A request of this id is placed on a group (running, not released yet)."""
        with self._lock:
            return request_id in self._placement

    def _place(self, request: Request, message: AddRequest | Resume) -> int | None:
        """Deliver ``message`` to a healthy entry group chosen by the balancer (again if that
        group is fenced meanwhile) and record the placement. A ``Resume`` of a request no
        longer placed (its caller aborted it while it moved) is not delivered: None."""
        new = isinstance(message, AddRequest)
        while True:
            with self._lock:
                if isinstance(message, Resume) and request.request_id not in self._placement:
                    return None
                if new and request.request_id in self._placement:  # not placed by a retry
                    raise DuplicateRequestError(
                        f"request id {request.request_id!r} is already running")
                new = False
                index = self.balancer.choose([g.load() for g in self.entry], request.prompt_ids,
                                             request.seqs[0].salt)
                group = next(g for g in self.entry if g.index == index)
                self._placement[request.request_id] = group
            try:
                group.deliver(message)
                return group.index
            except GroupFencedError:
                continue

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

    # -- recovery -----------------------------------------------------------------------------
    def recover(self, group: DPGroup, reason: str) -> int:
        """Take ``group`` out of service (any thread) and move its work to healthy groups:
        its requests continue there from their tokens; PD offers it made or was to pull are
        cancelled (the prefill side frees their blocks) and their sequences prefilled again.
        Returns how many requests moved (0 if the group was out already, or if a stalled step
        still holds its state: it moves once the step lets go, the monitor retrying)."""
        with self._recovering:
            if not group.fence():
                return 0
            self.scale_downs += 1
            self.recoveries.append(Recovery(time.monotonic(), group.role, group.index, reason))
            log.error("%s group %d out of service (%s); moving its work", group.role,
                      group.index, reason)
            if self.router is not None:
                self.router.group_lost(group)
            moves = group.evacuate(timeout=EVACUATE_WAIT_S)
            if moves is None:
                self._pending.append(group)
                return 0
            for move in moves:
                self.resume(move)
            return len(moves)

    def resume(self, move: Resume) -> None:
        """Continue a started request's sequences on a healthy entry group (any thread);
        a request aborted meanwhile ends aborted, and one with nowhere to go ends failed."""
        request = move.request
        try:
            if self._place(request, move) is not None:
                with self._lock:
                    self.requests_recovered += 1
                return
            request.abort()
        except NoHealthyGroupError as error:
            request.fail(error)
        request.metrics.finished_time = time.monotonic()
        if request.on_output is not None:
            request.on_output(request.snapshot())

    def driver_failed(self, driver: Driver, error: Exception) -> None:
        """A driver's step raised: a group driving itself is recovered (its work moves); the
        groups of a pool fail (their requests end aborted)."""
        reason = f"{type(error).__name__}: {error}"
        if driver.groups == [driver] and not isinstance(error, EngineMisuseError):
            self._crashed.add(driver.index)
            self.recover(driver, reason)
            return
        for g in driver.groups:
            g.fail(reason)

    def retry_evacuations(self) -> None:
        """Move the work of groups fenced while a step held their state, if it let go."""
        with self._recovering:
            for group in list(self._pending):
                moves = group.evacuate(timeout=EVACUATE_WAIT_S)
                if moves is not None:
                    self._pending.remove(group)
                    for move in moves:
                        self.resume(move)

    def rejoin(self, group: DPGroup) -> bool:
        """Put a stalled group back in service, empty, once its work has moved; a group
        whose loop died never rejoins. True if it did."""
        with self._recovering:
            if not group.drained or group.index in self._crashed:
                return False
            group.rejoin()
            if self.router is not None:
                self.router.group_back(group)
            self.rejoins += 1
        log.warning("%s group %d beats again; back in service, empty", group.role, group.index)
        return True

    # -- running ------------------------------------------------------------------------------
    def run(self, seqs: list) -> None:
        """Run sequences to completion inline (the ``LLM.generate`` contract)."""
        self.run_until_done([Request.of_sequence(s) for s in seqs])

    def run_until_done(self, requests: list[Request]) -> None:
        """Submit ``requests`` and return once they have finished: stepped inline, or by the
        driver threads of a started engine (``serving.core.engine_runs``)."""
        run_until_done(self, requests)

    @property
    def started(self) -> bool:
        """Its drivers run on their own threads (``start``; until ``shutdown``)."""
        return bool(self._threads)

    def start(self) -> None:
        """Give every driver its own loop thread."""
        if self._threads:
            return
        self._stop.clear()
        self._gc = StepGC().__enter__()  # collection only between steps while threads run
        for d in self.drivers:
            t = threading.Thread(target=drive, args=(d, self._stop, self._gc.after_step,
                                                     self.driver_failed),
                                 name=_thread_name(d), daemon=True)
            t.start()
            self._threads.append(t)
        if self.heartbeat_timeout_s is not None:
            watched = [g for g in self.groups if any(d is g for d in self.drivers)]
            t = threading.Thread(target=watch_heartbeats, name="heartbeat", daemon=True,
                                 args=(self, watched, self.heartbeat_timeout_s, self._stop))
            t.start()
            self._threads.append(t)

    def shutdown(self) -> None:
        self._stop.set()
        self.faults.release()
        for t in self._threads:
            t.join(timeout=10)
        if self._threads:
            self._gc.__exit__(None, None, None)
            reset_groups(self)  # what it was aborted with goes (the stats, the pools)
        self._threads = []
        if self.timeline is not None:
            self.timeline.close()  # its watcher threads (recorded events stay readable)

    # -- observability ------------------------------------------------------------------------
    def can_serve(self) -> bool:
        """A new request can run now: an entry group in service and, with PD, a decode group
        too (``/health``)."""
        decode_ok = self.router is None or any(g.healthy for g in self.router.decode)
        return decode_ok and any(g.healthy for g in self.entry)

    def stats(self) -> dict:
        loads = [g.load() for g in self.groups]
        schedulers = [g.scheduler for g in self.groups]
        drivers = self._driver_stats()
        stats = {
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
            "heartbeat_age_s": max((time.monotonic() - g.last_heartbeat
                                    for g in self.groups if g.healthy), default=0.0),
            "faults_injected": self.faults.injected,
            "requests_recovered": self.requests_recovered,
            # MA pools: steps rolled back on all ranks, expert devices taken out
            "rollbacks": sum(g.rollbacks for g in self.groups) + drivers.get("ma_rollbacks", 0),
            "scale_downs": self.scale_downs + drivers.get("ma_scale_downs", 0),
            "rejoins": self.rejoins,
        } | (self.router.stats() if self.router is not None else {}) | drivers \
          | self._spec_stats() | self._expert_stats()
        stats["collective_latency_s"] = self._collective_latency(stats)
        return stats

    def _collective_latency(self, stats: dict) -> dict[str, float]:
        """Mean seconds per collective: PD KV pulls (pull to landed) always; with a timeline
        (``trace``), the observed A2E / E2A hops of MA too."""
        out = self.timeline.collective_latency() if self.timeline is not None else {}
        if stats.get("kv_transfers"):
            out["kv_transfer"] = stats["kv_transfer_s"] / stats["kv_transfers"]
        return out

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
            for key, value in g.runner.spec_stats().items():
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


def drive(driver: Driver, stop: threading.Event, after_step=lambda: None,
          failed=None) -> None:
    """A driver's loop until ``stop`` is set: step while there is work, otherwise wait on its
    groups' inboxes; ``after_step`` runs between busy steps (garbage collection). If a step
    raises, the loop ends with ``failed(driver, error)`` (``Engine.driver_failed``; without
    it every group the driver steps fails: unhealthy, its requests aborted)."""
    groups = driver.groups
    while not stop.is_set():
        try:
            busy = driver.step()
        except Exception as error:
            if isinstance(error, InjectedFault):
                log.error("%s: %s", _thread_name(driver), error)
            else:
                log.exception("%s failed", _thread_name(driver))
            if failed is not None:
                failed(driver, error)
            else:
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
    itemsize = model_dtype(params).itemsize
    block_size = config.block_size
    per_block = max(cfg.kv_bytes_per_token(itemsize) * block_size, 1)
    per_seq = -(-max_model_len // block_size)
    num_blocks = max(per_seq, min(config.kv_cache_bytes // per_block,
                                  per_seq * config.max_num_seqs))
    return GroupConfig(num_blocks=int(num_blocks), block_size=block_size,
                       max_num_seqs=config.max_num_seqs,
                       max_num_batched_tokens=config.max_num_batched_tokens,
                       enable_prefix_caching=config.enable_prefix_caching,
                       scheduling_policy=config.scheduling_policy,
                       staged=config.staged, async_scheduling=config.async_scheduling,
                       num_scheduler_steps=config.num_scheduler_steps,
                       max_model_len=max_model_len,
                       num_speculative_tokens=config.num_speculative_tokens,
                       spec_disable_by_batch_size=config.spec_disable_by_batch_size,
                       spec_chained_steps=config.spec_chained_steps)

