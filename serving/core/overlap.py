"""Asynchronous scheduling of a DP group: step n + 1 launched while step n runs.

A step of a group that overlaps (``GroupConfig.async_scheduling`` on a runner that
``overlaps_steps``) schedules and launches step n + 1 while step n still runs on the device,
its decode rows taking their input from step n's sampled tokens on device, then finishes
step n: reads its tokens, appends, checks stops, detokenizes and emits. Step n + 1 stays in
flight until the next call. A sequence that stopped (or was aborted) at step n drops its step
n + 1 token; a sequence whose in-flight token is its last is not scheduled again
(``Scheduler.launched``). A step that fails or is fenced drops the step in flight with it,
newest first, as ``step_failed`` and ``_undo`` roll back. Sampling that reads every output
token (penalties, a grammar) and a request isolated after a failure run with nothing in flight.
"""

from __future__ import annotations

import time

from serving.core.faults import GroupCrashed
from serving.core.interfaces import EngineMisuseError
from serving.core.scheduler import SchedulerOutput


class OverlappedSteps:
    """The overlapped step of ``DPGroup`` (which holds the scheduler, runner, faults, state
    lock and the rest of a step: ``plan``, ``complete``, ``step_failed``, ``_undo``)."""

    _in_flight: tuple | None  # (SchedulerOutput, runner handle, start time) launched

    def _step_overlapped(self) -> bool:
        """Schedule and launch step n + 1 (its decode inputs taken on device from step n),
        then finish step n; with nothing in flight, only launch."""
        with self._state:
            prev, self._in_flight = self._in_flight, None
            out = None
            if prev is None or self._may_follow(prev[0]):
                out = self.plan()
            if out is not None:
                start = time.perf_counter()
                try:
                    self.faults.before_launch(self)
                    handle = self.runner.launch(out.scheduled, after=prev and prev[1])
                    self._beat()
                except (EngineMisuseError, GroupCrashed):
                    self._undo(out)
                    self._drop_flight(prev)
                    raise
                except Exception as error:
                    self.step_failed(out, error)
                    self._drop_flight(prev)
                    return True
                self.scheduler.launched(out)
                self._in_flight = (out, handle, start)
            if prev is None:
                return out is not None
        self._finish(*prev)
        return True

    def _may_follow(self, prev: SchedulerOutput) -> bool:
        """Whether the next step may be scheduled before ``prev``'s tokens are appended: not
        while a request runs alone after a failure, nor for sampling that reads every output
        token (penalties, a grammar)."""
        if self._suspects:
            return False
        return not any(s.seq.params.reads_outputs for s in prev.scheduled)

    def _finish(self, out: SchedulerOutput, handle, start: float) -> None:
        """Second half of an overlapped step: wait for ``out`` on the device, append its
        tokens, emit. If it was fenced meanwhile or fails, the step in flight goes too."""
        self.faults.stall(self)
        with self._state:
            if self.fenced:
                if self.drained:
                    self.rollbacks += 1  # the pool is reset already (and the flight dropped)
                else:
                    self._drop_flight(self._in_flight)
                    self._undo(out)
                self._in_flight = None
                return
            try:
                self.runner.finish(handle)
            except EngineMisuseError:
                self._drop_flight(self._in_flight)
                self._undo(out)
                raise
            except Exception as error:
                self._drop_flight(self._in_flight)
                self.step_failed(out, error)
                return
            if self.timeline is not None:
                self.timeline.span(self.role, "step", start, time.perf_counter(),
                                   stream=f"{self.role}{self.index}",
                                   tokens=out.num_batched_tokens)
            self.complete(out)

    def _drop_flight(self, flight: tuple | None) -> None:
        """Roll back a launched step whose input tokens are gone (the step before it failed
        or was fenced); its results are never read."""
        if flight is None:
            return
        if flight is self._in_flight:
            self._in_flight = None
        self._undo(flight[0])

    def _reset(self) -> None:
        """Fenced and drained: the step in flight goes with the pool."""
        super()._reset()
        self._in_flight = None
