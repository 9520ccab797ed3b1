"""From ``xds`` options to a running engine: the ``EngineArgs`` they describe (the
deployment parsed here, once), loading with a status line, the warm-up, and the trace.

``serving.entrypoints.cli`` (every command) and ``serving.entrypoints.server`` (``run_server``
without an engine) both start engines here.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

from tqdm import tqdm

log = logging.getLogger("xds")

GIB = 1 << 30
FOLLOWER_EXIT_AFTER_S = 15.0  # past process 0's drain: a follower's SIGTERM ends it by then


class Status:
    """A one-line status with elapsed time, kept fresh by a thread while work blocks."""

    def __init__(self) -> None:
        self.bar = tqdm(total=None, bar_format="{desc} [{elapsed}]", disable=None, leave=False)
        self.started = time.monotonic()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._tick, daemon=True)
        self._thread.start()

    def _tick(self) -> None:
        for frame in itertools.cycle("|/-\\"):
            if self._done.wait(0.25):
                return
            self.bar.set_postfix_str(frame, refresh=True)

    def stage(self, text: str) -> None:
        log.info("%s", text)
        self.bar.set_description_str(text, refresh=True)

    def close(self) -> float:
        self._done.set()
        self._thread.join()
        self.bar.close()
        return time.monotonic() - self.started


def engine_args(args: argparse.Namespace) -> Any:
    """The ``EngineArgs`` of parsed ``xds`` options, with the deployment file read once here;
    sizes the simulated CPU mesh to it before JAX starts. Every engine and admission flag sets
    the field of its name (``cli_args.ENGINE_FIELDS``, ``ADMISSION_FIELDS``), except
    ``--kv-cache-gib`` (``kv_cache_bytes``) and ``--trace`` (a file to save; ``trace`` is on
    when given)."""
    from sharding import read_deployment
    from sharding.devices import DeviceSetupError, configure_cpu_devices, queues_collectives

    deployment = read_deployment(args.deployment) if args.deployment else None
    distributed = join_processes(args, deployment)
    count = args.cpu_devices
    needed = deployment.num_devices if deployment is not None else args.num_dp_groups
    if count is not None and count < needed and distributed is None:
        source = (f"deployment {deployment.name!r}" if deployment is not None
                  else "--num-dp-groups")
        raise DeviceSetupError(f"--cpu-devices {count}: the layout needs {needed} devices "
                               f"({source})")
    if count is None and deployment is not None and not os.environ.get("XDS_CPU_DEVICES"):
        count = deployment.num_devices
    configure_cpu_devices(count, queues_collectives(deployment))
    from serving.core.engine_args import EngineArgs
    from serving.entrypoints.cli_args import ADMISSION_FIELDS, ENGINE_FIELDS

    # Only ``xds serve`` has the admission flags; the other commands keep the defaults.
    admission = {name: getattr(args, name) for name in ADMISSION_FIELDS if hasattr(args, name)}
    return EngineArgs(**{name: getattr(args, name) for name in ENGINE_FIELDS}, **admission,
                      deployment=deployment, kv_cache_bytes=int(args.kv_cache_gib * GIB),
                      trace=bool(args.trace), distributed=distributed)


def join_processes(args: argparse.Namespace, deployment: Any) -> Any:
    """With ``--coordinator``: join the other processes before JAX starts, each simulating
    its share of the deployment's devices on CPU; the ``DistributedConfig``, else None."""
    if not getattr(args, "coordinator", None):
        return None
    from sharding.devices import queues_collectives
    from sharding.processes import DistributedConfig, initialize, native_stdout_to_stderr

    native_stdout_to_stderr()
    config = DistributedConfig(args.coordinator, args.num_processes, args.process_id)
    needed = deployment.num_devices if deployment is not None else args.num_dp_groups
    initialize(config, args.cpu_devices or needed, queues_collectives(deployment))
    if threading.current_thread() is threading.main_thread():
        # jax.distributed installs a preemption notifier that swallows SIGTERM (for
        # checkpointing trainers); a server must stop on it, as it does without the flags.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    return config


def run_follower(args: argparse.Namespace) -> int:
    """A process other than 0: build the same engine and run process 0's steps until it
    stops (prints nothing; process 0 prints). SIGTERM: ``stop_deployment_on_sigterm``."""
    from serving.core.async_engine import AsyncEngine

    engine = AsyncEngine.from_args(engine_args(args))
    wait_s = getattr(args, "shutdown_timeout", 0.0) + FOLLOWER_EXIT_AFTER_S
    stop_deployment_on_sigterm(engine.llm.engine, wait_s)
    engine.llm.follow()
    return 0


def stop_deployment_on_sigterm(follower: Any, wait_s: float) -> None:
    """SIGTERM on a process other than 0 (a node drain) stops the whole deployment, which
    cannot run without this process: process 0 is asked to stop as at its own SIGTERM
    (``xds serve`` drains its requests, then releases every process) and this process keeps
    following it until then. It dies by SIGTERM after ``wait_s`` seconds if process 0 has
    not released it (process 0 then reports it lost), or at once at a second SIGTERM. Before
    this is installed (while the engine loads) SIGTERM ends the process."""

    def on_sigterm(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends it at once
        log.warning("SIGTERM: asking process 0 to stop the deployment (this process exits "
                    "within %.0f s)", wait_s)
        follower.request_drain()
        timer = threading.Timer(wait_s, os.kill, (os.getpid(), signal.SIGTERM))
        timer.daemon = True
        timer.start()

    signal.signal(signal.SIGTERM, on_sigterm)


def load_engine(args: argparse.Namespace) -> Any:
    """Build, start and (unless ``--no-warmup``) warm up the engine for ``args``."""
    from serving.core.async_engine import AsyncEngine

    options = engine_args(args)
    # faults are armed after the warm-up request: it must not set them off or count toward
    # their after_steps (docs/reliability.md). Several processes arm them at build, where
    # every process does (the others never warm up on their own: lockstep needs one count).
    later = not args.no_warmup and args.num_processes == 1
    faults = options.faults if later else ()
    options = options.replace(faults=()) if faults else options
    status = Status()
    try:
        status.stage(f"loading {args.model}")
        engine = AsyncEngine.from_args(options)
        for spec in faults:  # checked against the layout now, before the warm-up compiles
            engine.engine.faults.check(spec)
        engine.start()
        if not args.no_warmup:
            status.stage("compiling step programs (warm-up request)")
            asyncio.run(warm_up(engine))
        if later and getattr(args, "precompile_seconds", 0) > 0:
            status.stage("compiling the step buckets ahead (--precompile-seconds)")
            precompile_buckets(engine, args.precompile_seconds)
        for spec in faults:
            engine.engine.faults.add(spec)
    finally:
        elapsed = status.close()
    log.info("%s ready in %.1f s (context %d tokens)", engine.model_name, elapsed,
             engine.max_model_len)
    if timeline_of(engine) is not None:
        timeline_of(engine).clear()  # the trace starts after the warm-up
    return engine


def precompile_buckets(engine: Any, seconds: float) -> None:
    """``serving.core.engine_runs.precompile`` on the started ``engine`` before it serves."""
    from serving.core.engine_runs import precompile

    start = time.monotonic()
    count = precompile(engine.engine, engine.max_model_len, seconds)
    if count:
        log.info("compiled %d step programs ahead in %.1f s", count, time.monotonic() - start)
    else:  # speculative and MA runners compile as they meet shapes
        log.info("no step program to compile ahead for this layout")


def timeline_of(engine: Any):
    """The engine's timeline when it records one (``--trace``), else None."""
    return getattr(getattr(engine, "engine", None), "timeline", None)


def finish_trace(engine: Any, args: argparse.Namespace) -> None:
    """With ``--trace``: save the Chrome trace and print the per-role summary (stderr)."""
    timeline = timeline_of(engine)
    if not getattr(args, "trace", None) or timeline is None:
        return
    from serving.core.timeline import format_summary

    path = timeline.save(args.trace)
    print(format_summary(timeline.summary()), file=sys.stderr)
    print(f"trace: {path} ({len(timeline.events)} events; open in chrome://tracing or "
          "ui.perfetto.dev)", file=sys.stderr)


async def warm_up(engine: Any) -> None:
    from xds_jax.sampling.params import SamplingParams

    tok = engine.tokenizer
    ids = tok.encode("Hello") if tok is not None else [1, 2, 3]
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    async for _ in engine.generate(ids, params, "warmup"):
        pass

