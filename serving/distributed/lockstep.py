"""One control plane, many controllers: every process steps the same engine in lockstep.

Every process builds the same ``Engine`` (same deployment, same weights) over the global device
list, so each holds the same groups, schedulers and compiled programs and runs only its own
devices' share of each program (multi-controller SPMD). Process 0 (``LeaderEngine``) alone
takes requests from the front end. It steps the engine in **rounds**: a round takes the
requests and aborts that arrived since the last one, sends them to the other processes as one
small message (``Round``, pickled, over ``ControlChannel``), applies them, and steps every driver
in a fixed order. The others (``FollowerEngine.follow``) apply the same message and step the
same drivers. The schedulers, balancer and KV bookkeeping are deterministic host code, and
every device value they act on (sampled tokens, overflow flags) is read identically on every
process (``xds_jax.multihost.fetch``), so every process plans the same step and launches the
same programs in the same order; the message carries no plan, only new inputs, plus a
fingerprint of the leader's state that followers check (a mismatch stops them loudly rather
than letting the processes drift apart).

A process that dies or hangs is reported by the channel within ``timeout_s``: the leader ends
every request in flight with a ``PeerLostError`` and exits with ``EXIT_PEER_LOST`` (the JAX
runtime cannot recover collectives that wait for a lost peer); a follower that loses the leader
exits the same way. A follower that gets SIGTERM asks the leader to stop (``request_drain``):
unless the leader is already stopping, it sends itself SIGTERM (``xds serve`` drains), and its
shutdown sends every process ``STOP``.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import sys
import threading
from collections.abc import Callable

from serving.core.engine import IDLE_WAIT_S, Engine
from serving.core.request import Request
from serving.core.step_gc import StepGC
from serving.distributed.channel import ControlChannel
from serving.distributed.round_events import (
    Abort,
    Release,
    Round,
    Submit,
    apply,
    fingerprint,
    requests_of,
    wire,
)
from sharding.processes import DistributedConfig
from xds_jax.errors import XdsError

log = logging.getLogger(__name__)

EXIT_PEER_LOST = 3  # exit status of a process whose peer died or hung
LOST_GRACE_S = 2.0  # the leader's callers get this long to report failed requests
# A follower's stop request waits this long for a SIGTERM to process 0 itself (a scheduler
# that stops a job signals every process at about the same time): a second SIGTERM would
# stop its server at once instead of draining.
DRAIN_COALESCE_S = 2.0


class PeerLostError(XdsError, RuntimeError):
    """Another process of the engine died or stopped answering."""


class DivergenceError(XdsError, RuntimeError):
    """A follower's engine state no longer matches the leader's."""


class FollowerError(XdsError, RuntimeError):
    """A process other than 0 was asked to take requests; it follows process 0."""


def step_drivers(engine: Engine, dead: set[int]) -> bool:
    """One step of every driver, in order; a driver that raises fails its groups (as
    ``engine.drive`` does) and is stepped no more. True when any driver did work."""
    busy = False
    for i, driver in enumerate(engine.drivers):
        if i in dead:
            continue
        try:
            busy |= driver.step()
        except Exception as error:
            log.exception("driver %d failed; marking its groups unhealthy", i)
            dead.add(i)
            for g in driver.groups:
                g.fail(f"{type(error).__name__}: {error}")
    return busy


# -- process 0 --------------------------------------------------------------------------------
class LeaderEngine:
    """Process 0's engine: the ``Engine`` interface (``submit``, ``abort``, ``release``, ``run``,
    ``start``, ``shutdown``, ``stats``), stepped in rounds that every process runs."""

    def __init__(self, engine: Engine, config: DistributedConfig) -> None:
        self.engine = engine
        self.config = config
        self._outbox: list = []  # Request | Abort | Release, in arrival order
        self._lock = threading.Lock()  # the outbox; and one round at a time
        self._round_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._dead: set[int] = set()
        self.rounds = 0
        self.lost: str | None = None
        self.drain_asked_by: int | None = None
        self.channel = ControlChannel.connect(config, self._on_lost, on_drain=self._on_drain)

    def __getattr__(self, name: str):  # groups, drivers, timeline, cfg, ...: the engine's
        return getattr(self.engine, name)

    # -- the control plane --------------------------------------------------------------------
    def submit(self, request: Request) -> int:
        """Queue a request for the next round (every process places it the same way)."""
        self._post(request)
        return -1

    def abort(self, request_id: str) -> None:
        self._post(Abort(request_id))

    def release(self, request_id: str) -> None:
        self._post(Release(request_id))

    def _post(self, item) -> None:
        if self.lost is not None:  # nothing runs any more: refuse requests, drop the rest
            if isinstance(item, Request):
                raise PeerLostError(self.lost)
            return
        with self._lock:
            self._outbox.append(item)
        self._wake.set()

    # -- rounds -------------------------------------------------------------------------------
    def round(self) -> bool:
        """Send this round's inputs, apply them, step every driver; True if any did work."""
        with self._round_lock:
            with self._lock:
                items, self._outbox = self._outbox, []
            message = Round(self.rounds, tuple(wire(i) for i in items),
                            fingerprint(self.engine))
            self.channel.broadcast(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))
            for item in items:
                apply(self.engine, item)
            self.rounds += 1
            return step_drivers(self.engine, self._dead)

    def has_work(self) -> bool:
        return bool(self._outbox) or any(d.has_work() for d in self.engine.drivers)

    def run(self, seqs: list) -> None:
        """Run sequences to completion inline (the ``LLM.generate`` contract)."""
        self.run_until_done(requests_of(seqs))

    def run_until_done(self, requests: list[Request]) -> None:
        for r in requests:
            self.submit(r)
        with StepGC() as collector:
            while not all(r.finished for r in requests):
                if not self.round() and not self.has_work():
                    raise RuntimeError("engine idle with unfinished requests")
                collector.after_step()
        for r in requests:
            self.release(r.request_id)

    def start(self) -> None:
        """One loop thread runs the rounds (drivers cannot each have a thread: every process
        must launch the same programs in the same order)."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="xds-lockstep", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        with StepGC() as collector:
            while not self._stop.is_set():
                if self.has_work():
                    self.round()
                    collector.after_step()
                else:
                    self._wake.wait(IDLE_WAIT_S)
                    self._wake.clear()

    def shutdown(self) -> None:
        """Stop the loop and tell the other processes to leave."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        self.channel.stop()
        stats = self.stats()
        log.info("lockstep: %d rounds over %d processes, step broadcast %.0f us per round",
                 self.rounds, self.config.num_processes, stats["broadcast_us_per_round"])

    def stats(self) -> dict:
        sent = self.channel.sent_frames
        return self.engine.stats() | {
            "processes": self.config.num_processes,
            "lockstep_rounds": self.rounds,
            "broadcast_us_per_round": 1e6 * self.channel.send_seconds / sent if sent else 0.0,
        }

    def can_serve(self) -> bool:
        """The engine's answer, but never once a process is lost (the deployment is ending:
        every request fails with ``PeerLostError``)."""
        return self.lost is None and self.engine.can_serve()

    def _on_drain(self, process_id: int) -> None:
        """A follower got SIGTERM (a node drain): stop as at a SIGTERM to this process (the
        server drains, then ``shutdown`` sends every process ``STOP``), unless this process
        is stopping by then (``DRAIN_COALESCE_S``). Once only."""
        if self.drain_asked_by is not None:
            return
        self.drain_asked_by = process_id
        log.warning("process %d got SIGTERM; stopping the deployment", process_id)
        timer = threading.Timer(DRAIN_COALESCE_S, self._stop_as_at_sigterm)
        timer.daemon = True
        timer.start()

    def _stop_as_at_sigterm(self) -> None:
        if self._stop.is_set() or self.lost is not None or _draining():
            return  # already stopping: a SIGTERM now would be a second one
        os.kill(os.getpid(), signal.SIGTERM)

    # -- failure ------------------------------------------------------------------------------
    def _on_lost(self, process_id: int, reason: str) -> None:
        self.lost = (f"process {process_id} of {self.config.num_processes} was lost "
                     f"({reason})")
        log.error("%s; failing the requests in flight and exiting", self.lost)
        error = PeerLostError(self.lost)
        with self._lock:
            waiting, self._outbox = [i for i in self._outbox if isinstance(i, Request)], []
        for request in waiting:
            request.fail(error)
            if request.on_output is not None:
                request.on_output(request.snapshot())
        for group in self.engine.groups:
            for request in list(group.requests.values()):
                group.fail_request(request, error)
        timer = threading.Timer(LOST_GRACE_S, _exit_lost)
        timer.daemon = True
        timer.start()


# -- the other processes ----------------------------------------------------------------------
class FollowerEngine:
    """A process other than 0: the same engine, stepped as process 0's messages say."""

    def __init__(self, engine: Engine, config: DistributedConfig,
                 make_sequences: Callable) -> None:
        self.engine = engine
        self.config = config
        self.make_sequences = make_sequences
        self._dead: set[int] = set()
        self.rounds = 0
        self.channel = ControlChannel.connect(config, self._on_lost)

    def __getattr__(self, name: str):
        return getattr(self.engine, name)

    def follow(self) -> int:
        """Run process 0's rounds until it stops; returns the number of rounds."""
        with StepGC() as collector:
            while (payload := self.channel.receive()) is not None:
                message: Round = pickle.loads(payload)
                mine = fingerprint(self.engine)
                if message.number != self.rounds or message.fingerprint != mine:
                    raise DivergenceError(
                        f"process {self.config.process_id} diverged from process 0 at round "
                        f"{message.number} (its round {self.rounds}; state {mine:#x} vs "
                        f"{message.fingerprint:#x})")
                for event in message.events:
                    apply(self.engine, self._rebuild(event))
                self.rounds += 1
                step_drivers(self.engine, self._dead)
                collector.after_step()
        self.channel.stop()
        log.info("process %d: process 0 stopped after %d rounds", self.config.process_id,
                 self.rounds)
        return self.rounds

    def _rebuild(self, event):
        if not isinstance(event, Submit):
            return event
        seqs = self.make_sequences(list(event.prompt_ids), event.params, event.priority,
                                   event.cache_salt)
        for seq, (seq_id, seed) in zip(seqs, event.seqs, strict=True):
            seq.seq_id, seq.seed = seq_id, seed
        return Request(event.request_id, event.prompt, list(event.prompt_ids), event.params,
                       seqs)

    def _refuse(self, *args, **kwargs):
        raise FollowerError(f"process {self.config.process_id} follows process 0, which takes "
                            "the requests: call follow() here")

    submit = abort = run = run_until_done = start = _refuse

    def shutdown(self) -> None:
        self.channel.stop()

    def request_drain(self) -> None:
        """Ask process 0 to stop the deployment; ``follow`` returns at its ``STOP``."""
        self.channel.request_drain()

    def _on_lost(self, process_id: int, reason: str) -> None:
        log.error("process %d: lost process %d (%s); exiting", self.config.process_id,
                  process_id, reason)
        _exit_lost()


# -- helpers ----------------------------------------------------------------------------------
def _draining() -> bool:
    """Whether this process's SIGTERM handler is a server's that has started its drain
    (``serving.entrypoints.shutdown.DrainingServer.drain_requested``)."""
    server = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
    return bool(getattr(server, "drain_requested", False))


def _exit_lost() -> None:
    """Leave at once: collectives that wait for a lost peer would never return."""
    logging.shutdown()
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(EXIT_PEER_LOST)


def attach(engine: Engine, config: DistributedConfig,
           make_sequences: Callable) -> LeaderEngine | FollowerEngine:
    """Process 0's ``LeaderEngine`` or another process's ``FollowerEngine`` around ``engine``
    (connects the control channel: every process must call it)."""
    if config.is_leader:
        return LeaderEngine(engine, config)
    return FollowerEngine(engine, config, make_sequences)

