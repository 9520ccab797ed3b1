"""``Engine.run_until_done``: requests run to completion for a caller that waits (the ``LLM``
path). Inline, the caller's thread steps the drivers; an engine already started (its drivers on
their own threads, as under an ``AsyncEngine``) runs them there and the caller waits, since two
threads stepping one group corrupt its state. A run cut short (Ctrl-C in ``LLM.generate``, a
step raising to the caller) ends its requests and leaves every group empty, so the next run
starts clean: a step interrupted between schedule and update had left the scheduler
inconsistent, and the next run took the group out of service. ``precompile``: a server's
warm-up compiles the step buckets before requests come.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from serving.core.interfaces import EngineMisuseError
from serving.core.request import Request
from serving.core.step_gc import StepGC
from xds_jax import memory_maps

if TYPE_CHECKING:
    from serving.core.engine import Engine

log = logging.getLogger(__name__)

WAIT_S = 0.5  # a waiting caller checks that the engine still runs this often


def run_until_done(engine: Engine, requests: list[Request]) -> None:
    """Submit ``requests`` and return once all have finished."""
    if engine.started:
        _wait_started(engine, requests)
        return
    try:
        for r in requests:
            engine.submit(r)
        _step_inline(engine, requests)
    except BaseException:
        _abandon(engine, requests)
        raise
    for r in requests:
        engine.release(r.request_id)


def _step_inline(engine: Engine, requests: list[Request]) -> None:
    with StepGC() as collector:
        while not all(r.finished for r in requests):
            busy = False
            for d in engine.drivers:
                try:
                    busy |= d.step()
                except Exception as error:
                    if d.groups != [d] or isinstance(error, EngineMisuseError):
                        raise  # a pool's step, or a wiring bug: up to the caller
                    engine.driver_failed(d, error)
                    busy = True
            if not busy and not any(d.has_work() for d in engine.drivers):
                raise RuntimeError("engine idle with unfinished requests")
            collector.after_step()


def _wait_started(engine: Engine, requests: list[Request]) -> None:
    """The started engine's threads run the requests; wake at each of their outputs."""
    woken = threading.Condition()

    def told(out, then=None) -> None:
        if then is not None:
            then(out)
        with woken:
            woken.notify_all()

    submitted: list[Request] = []
    try:
        for r in requests:
            r.on_output = (lambda out, then=r.on_output: told(out, then))
            engine.submit(r)  # a DuplicateRequestError: the id is another's, not aborted here
            submitted.append(r)
        with woken:
            while not all(r.finished for r in requests):
                if not engine.started:  # shut down meanwhile: its threads will not end them
                    raise EngineMisuseError("the engine was shut down while a run waited on it")
                woken.wait(WAIT_S)
    except BaseException:  # Ctrl-C, or the shutdown: the threads drop what is aborted
        for r in submitted:
            engine.abort(r.request_id)
        for r in requests:
            r.abort()
        raise
    for r in requests:
        engine.release(r.request_id)


def _abandon(engine: Engine, requests: list[Request]) -> None:
    """End an interrupted inline run: every group forgets its work (admitting what it was
    still sent first), then its requests abort."""
    reset_groups(engine)
    for r in requests:
        r.abort()
        engine.abort(r.request_id)


def reset_groups(engine: Engine) -> None:
    """Every group in service forgets its work (the fence's evacuation: queued messages
    applied, scheduler and pool reset) and serves on: after an interrupted run, or a shutdown that
    stopped the threads before they dropped what was aborted."""
    for g in engine.groups:
        if not g.healthy:  # out of service (a crash, a stall): it stays out
            continue
        try:
            if g.evacuate(timeout=0) is not None:
                g.rejoin()
        except Exception as error:  # the run's own error is the one to raise
            log.warning("%s group %d not reset: %s", g.role, g.index, error)


def precompile(engine: Engine, max_model_len: int, seconds: float) -> int:
    """Compile the step buckets a server meets (``ModelRunner.step_buckets``: decode up to
    ``max_num_seqs`` rows and ``max_model_len`` tokens, fresh prompts' prefill up to the step's
    token budget) on each plain group of ``engine`` with nothing running, smallest first and
    every group a shape before the next, for up to ``seconds`` and while compiled programs
    hold under 80% of ``memory_maps``' high-water mark (past it they would all be dropped);
    returns how many compiled.
    Other runners (speculative, MA ranks) compile as they meet shapes; PD's prefill groups
    take only prefill buckets, its decode groups only decode ones."""
    groups = [g for g in engine.groups if g.healthy
              and getattr(g.runner, "overlaps_steps", False)]
    if not groups:
        return 0
    config = engine.group_config
    shapes = groups[0].runner.step_buckets(config.max_num_seqs, max_model_len,
                                           config.max_num_batched_tokens or max_model_len)
    # a PD prefill group decodes nothing, its decode groups prefill nothing
    pd = engine.router is not None
    work = [(g, shape) for shape in shapes for g in groups
            if not ((g.role == "prefill") if shape[1] == 1 else (pd and g.role != "prefill"))]
    before = sum(g.runner.compile_count for g in groups)
    deadline = time.monotonic() + seconds
    sizes = groups[0].runner.input_sizes(config.max_num_seqs)
    for g, shape in work:
        if time.monotonic() > deadline or not memory_maps.room_for_more():
            break
        g.runner.precompile(*shape, input_sizes=sizes)
    return sum(g.runner.compile_count for g in groups) - before
