"""One self-contained data-parallel group: scheduler, KV cache, runner, detokenization.

Groups share nothing. Each owns its device, its block pool and its queues, is stepped by the
engine (a thread per driver in the server, inline in ``LLM``; a colocated group is its own
``Driver``) and hands outputs straight to each request's ``on_output`` callback. The control
plane only puts typed messages (``serving.core.interfaces``, and ``Resume`` here) into a
group's inbox.

A group the engine takes out of service is fenced (``serving.core.fencing``): a step under
way when that happens is dropped before it appends a token. The step holds the group's state
lock except while it waits on its device (``FaultInjector.stall``, where stalls are injected).

With asynchronous scheduling (``GroupConfig.async_scheduling``, on a runner that
``overlaps_steps``) steps overlap: ``serving.core.overlap``.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import jax

from serving.core.faults import NO_FAULTS, GroupCrashed
from serving.core.fencing import Fencing, GroupFencedError, Resume
from serving.core.interfaces import AbortRequest, AddRequest, EngineMisuseError
from serving.core.isolation import RequestIsolation, Suspects
from serving.core.kv_cache import BlockManager
from serving.core.overlap import OverlappedSteps
from serving.core.request import Request
from serving.core.scheduler import Scheduler, SchedulerError, SchedulerOutput
from serving.core.spec_decode import build_runner
from xds_jax.engine_config import DEFAULT_CHAINED_STEPS, DEFAULTS
from xds_jax.model.config import ModelConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class GroupConfig:
    """Capacity of one DP group (``serving.core.engine.group_config_for`` derives it from the
    ``EngineConfig``; the defaults are the engine's)."""

    num_blocks: int = 512
    block_size: int = DEFAULTS.block_size
    max_num_seqs: int = DEFAULTS.max_num_seqs
    max_num_batched_tokens: int = DEFAULTS.max_num_batched_tokens
    enable_prefix_caching: bool = DEFAULTS.enable_prefix_caching
    scheduling_policy: str = DEFAULTS.scheduling_policy  # "fcfs" or "priority"
    staged: bool = DEFAULTS.staged  # separately jitted stage programs, or one fused program
    num_speculative_tokens: int = 0  # MTP drafts per decode step (serving.core.spec_decode)
    spec_disable_by_batch_size: int | None = None  # steps of more rows do not draft
    spec_chained_steps: int = DEFAULT_CHAINED_STEPS  # greedy speculative steps back to back
    async_scheduling: bool | None = DEFAULTS.async_scheduling  # None: on unless chained
    num_scheduler_steps: int = DEFAULTS.num_scheduler_steps  # decode steps chained per launch
    max_model_len: int | None = None  # the longest sequence (prefill tables' width; runner)

    @property
    def overlaps_steps(self) -> bool:
        """Asynchronous scheduling as asked, or (None) where no chain of steps was asked for."""
        if self.async_scheduling is None:
            return self.num_scheduler_steps == 1
        return self.async_scheduling


@dataclasses.dataclass(frozen=True)
class GroupLoad:
    """What the control plane sees of a group."""

    index: int
    num_running: int
    num_waiting: int
    kv_usage: float
    healthy: bool
    max_num_seqs: int

    @property
    def full(self) -> bool:
        return self.num_running + self.num_waiting >= self.max_num_seqs


class DPGroup(OverlappedSteps, Fencing, RequestIsolation):
    """Scheduler + KV blocks + runner for one slice of devices; a ``Group`` and, colocated,
    the ``Driver`` of itself."""

    role = "decode"  # how traces and stats name what the group does
    may_overlap = True  # a group whose steps may overlap (PD prefill hands off after each)

    def __init__(self, index: int, params: dict | None, cfg: ModelConfig,
                 device: jax.Device | list | None, config: GroupConfig | None = None,
                 runner=None):
        """``device`` is one device, or a list (a TP group: parameters and KV pages sharded
        over it). ``runner`` replaces the group's own ``ModelRunner`` (an MA attention rank
        whose steps a domain runs): a ``serving.core.interfaces.Runner``."""
        self.index = index
        self.timeline = None  # a serving.core.timeline.Timeline recording each step, when tracing
        self.config = config = config or GroupConfig()
        self.blocks = BlockManager(config.num_blocks, config.block_size,
                                   enable_prefix_caching=config.enable_prefix_caching)
        self.runner = runner or build_runner(params, cfg, config, device)
        # KV slots reserved past each decoding sequence: its drafts (more where the runner
        # chains speculative steps).
        lookahead = getattr(self.runner, "num_lookahead_tokens", config.num_speculative_tokens)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs,
                                   config.max_num_batched_tokens,
                                   num_lookahead_tokens=lookahead,
                                   policy=config.scheduling_policy)
        # Steps overlap only on a runner that says it can (not speculative, not MA ranks).
        self.overlap = (config.overlaps_steps and self.may_overlap
                        and getattr(self.runner, "overlaps_steps", False))
        self._in_flight: tuple | None = None  # (SchedulerOutput, handle, start) launched
        self.inbox: queue.Queue = queue.Queue()
        self.faults = NO_FAULTS  # the engine's FaultInjector, consulted at fixed points of a step
        self.requests: dict[str, Request] = {}
        self._owners: dict[int, Request] = {}  # seq_id -> request
        self.healthy = True
        self.steps = 0
        self.prompt_tokens = 0  # prompt tokens received
        self.prefill_tokens = 0  # prompt tokens actually computed (prefix-cache hits excluded)
        self.generated_tokens = 0
        self.last_batch = (0, 0)  # (sequences, tokens) of the latest step
        self.last_heartbeat = time.monotonic()
        self.beat_compiles = self.runner.compile_count
        self.rollbacks = 0  # steps undone because they raised
        self.requests_failed = 0  # requests ended alone with an error, the group serving on
        self._suspects = Suspects()  # requests of failed steps, each to run alone
        self._wake = threading.Event()
        self._init_fence()
        # What each inbox message type does here; a subclass adds its own types.
        self._handlers: dict[type, Callable[[Any], None]] = {
            AddRequest: lambda m: self._admit(m.request),
            AbortRequest: lambda m: self._abort(m.request_id),
            Resume: self._resume,
        }

    # -- control plane side (any thread) ------------------------------------------------------
    def deliver(self, message: Any) -> None:
        """Queue a typed message for the group's next step (any thread); raises
        ``GroupFencedError`` once the group is out of service."""
        if type(message) not in self._handlers:
            raise TypeError(f"DP group {self.index} takes no {type(message).__name__} message")
        with self._gate:
            if self.fenced:
                raise GroupFencedError(f"{self.role} group {self.index} is out of service")
            self.inbox.put(message)
        self._wake.set()

    def submit(self, request: Request) -> None:
        self.deliver(AddRequest(request))

    def abort(self, request_id: str) -> None:
        try:
            self.deliver(AbortRequest(request_id))
        except GroupFencedError:  # its requests moved; the engine aborts them where they went
            pass

    def wait_for_work(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds until a message arrives; True if one did."""
        woken = self._wake.wait(timeout)
        self._wake.clear()
        return woken

    def load(self) -> GroupLoad:
        return GroupLoad(self.index, self.scheduler.num_running,
                         self.scheduler.num_waiting + self.inbox.qsize(),
                         self.scheduler.kv_usage, self.healthy, self.config.max_num_seqs)

    # -- one step, on its driver's thread ------------------------------------------------------
    def _drain_inbox(self) -> None:
        while True:
            try:
                message = self.inbox.get_nowait()
            except queue.Empty:
                return
            self._handlers[type(message)](message)

    def _abort(self, request_id: str) -> None:
        """Abort a request this group holds (unknown ids are ignored)."""
        if request_id in self.requests:
            self._end_aborted(self.requests[request_id])

    def _end_aborted(self, request: Request) -> None:
        """Drop a request here: free its sequences' blocks, mark it aborted, tell the caller."""
        self._forget(request)
        for seq in request.seqs:  # one still waiting here may be marked aborted already
            if not seq.finished or seq in self.scheduler.waiting:  # (by another group: PD)
                self.scheduler.abort(seq.seq_id)
        request.abort()
        request.metrics.finished_time = time.monotonic()
        self._emit(request)

    def _admit(self, request: Request) -> None:
        """Queue a request's sequences; one the scheduler can never run fails alone."""
        self.requests[request.request_id] = request
        for seq in request.seqs:
            self._owners[seq.seq_id] = request
        try:
            for seq in request.seqs:
                self.scheduler.add(seq)
                self.prompt_tokens += len(seq.prompt_ids)
        except SchedulerError as e:
            self.fail_request(request, e)

    def _resume(self, message: Resume) -> None:
        """Take over sequences of a started request from a group taken out of service; they
        are prefilled again over their tokens (a sequence too big for this pool fails the
        request alone)."""
        request = message.request
        seqs = [s for s in message.seqs if not s.finished]
        if not seqs:
            return
        self.requests[request.request_id] = request
        for seq in seqs:
            self._owners[seq.seq_id] = request
        try:
            for seq in seqs:
                self.scheduler.add(seq)
        except SchedulerError as e:
            self.fail_request(request, e)

    def has_work(self) -> bool:
        return bool(self.requests) or not self.inbox.empty()

    def step(self) -> bool:
        """Run one scheduled step; False when there was nothing to do. A step that raises is
        rolled back (``step_failed``) and the group goes on serving; an injected crash (or a
        wiring bug) is rolled back and raised: the group's loop dies. The state lock is let go
        while the step waits on its device (where a stall is injected); a group fenced in the
        meantime drops the step before any token is appended."""
        if self.overlap:
            return self._step_overlapped()
        with self._state:
            out = self.plan()
            if out is None:
                return False
            start = time.perf_counter()
            try:
                self.faults.before_launch(self)
                handle = self.runner.launch(out.scheduled)
                self._beat()  # a compile in the launch is over
            except (EngineMisuseError, GroupCrashed):  # no request is to blame
                self._undo(out)
                raise
            except Exception as error:  # one request's bad input must not stop the group
                self.step_failed(out, error)
                return True
        self.faults.stall(self)
        with self._state:
            if self.fenced:  # taken out of service meanwhile: its requests went elsewhere
                if self.drained:
                    self.rollbacks += 1  # the pool is reset already
                else:
                    self._undo(out)
                return True
            try:
                self.runner.finish(handle)
            except EngineMisuseError:
                self._undo(out)
                raise
            except Exception as error:
                self.step_failed(out, error)
                return True
            if self.timeline is not None:
                self.timeline.span(self.role, "step", start, time.perf_counter(),
                                   stream=f"{self.role}{self.index}",
                                   tokens=out.num_batched_tokens)
            self.complete(out)
        return True

    def _beat(self) -> None:
        """The loop is alive. ``beat_compiles``: the runner's compiles so far, so a monitor
        sees that a launch since the last beat is compiling (slow, not stuck)."""
        self.last_heartbeat = time.monotonic()
        self.beat_compiles = self.runner.compile_count

    def _undo(self, out: SchedulerOutput) -> None:
        """Roll back a step no request is blamed for (its sequences recompute their tokens)."""
        self.scheduler.roll_back(out)
        self.rollbacks += 1

    def plan(self) -> SchedulerOutput | None:
        """First half of a step: take new work and schedule; None when there is nothing to
        run (or the group is fenced). Whoever runs the step (``step``, or an MA domain for
        all its ranks at once) calls ``complete`` after the tokens are sampled."""
        self._beat()
        if self.fenced:
            return None
        self._drain_inbox()
        self._before_schedule()
        if not self.requests:
            return None
        out = self.scheduler.schedule(only=self._isolated())
        if not out.scheduled:
            return None
        now = time.monotonic()
        for s in out.scheduled:
            request = self._owners[s.seq.seq_id]
            if request.metrics.first_scheduled_time is None:
                request.metrics.first_scheduled_time = now
        return out

    def _before_schedule(self) -> None:
        """Hook: work a subclass does at the top of each step (KV transfers in PD)."""

    def complete(self, out: SchedulerOutput) -> None:
        """Second half of a step: record it, emit outputs, forget finished requests."""
        self.scheduler.update(out)
        self.steps += 1
        self.prefill_tokens += sum(s.num_tokens for s in out.scheduled if s.is_prefill)
        # One token per sampled row, or 1 .. k + 1 when it speculated.
        self.generated_tokens += sum(max(0, s.seq.num_tokens - s.start - s.num_tokens)
                                     for s in out.scheduled if s.is_last_chunk)
        self.last_batch = (len(out.scheduled), out.num_batched_tokens)
        now = time.monotonic()
        # A request may have ended while an overlapped step ran (aborted, failed).
        touched = {s.seq.seq_id: r for s in out.scheduled
                   if s.is_last_chunk and (r := self._owners.get(s.seq.seq_id)) is not None}
        self.suspect_ran(out, touched)
        for request in {id(r): r for r in touched.values()}.values():
            request.mark_tokens(now)
            try:
                self._emit(request)
            except Exception as error:  # detokenizing or reporting this request failed
                self.fail_request(request, error)
                continue
            if request.finished:
                self._forget(request)
        self._after_step(out)

    def _after_step(self, out: SchedulerOutput) -> None:
        """Hook: a subclass's work once a step's tokens are out (hand-off to decode in PD)."""

    def _forget(self, request: Request) -> Request:
        self.requests.pop(request.request_id, None)
        self._suspects.forget(request.request_id)
        for seq in request.seqs:
            self._owners.pop(seq.seq_id, None)
        return request

    def _emit(self, request: Request) -> None:
        if request.on_output is not None:
            request.on_output(request.snapshot())

    def fail(self, reason: str) -> None:
        """Mark the group unhealthy (the control plane avoids it) and end every request it
        holds, aborted."""
        log.error("DP group %d failed (%s); aborting its %d requests", self.index, reason,
                  len(self.requests))
        self.healthy = False
        for request in list(self.requests.values()):
            request.abort()
            self._emit(self._forget(request))

    # -- as a driver of itself ----------------------------------------------------------------
    @property
    def groups(self) -> list[DPGroup]:
        return [self]

    def stats(self) -> dict[str, Any]:
        """No counters beyond the group's own (``Engine.stats`` reads those)."""
        return {}

    def expert_stats(self) -> dict[str, Any]:
        """A colocated group balances no expert slice: nothing to report."""
        return {}
