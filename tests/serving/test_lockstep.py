"""The multi-process control plane without JAX processes: the config, the control channel
(rounds, heartbeats, a lost peer) between threads, and the step broadcast's cost."""

from __future__ import annotations

import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest

from serving.core.request import Request
from serving.distributed.channel import ControlChannel
from serving.distributed.launcher import LaunchError, child_argv, describe, exit_code, launch, watch
from serving.distributed.lockstep import FollowerEngine
from serving.distributed.round_events import Round, Submit, wire
from sharding.devices import DeviceSetupError
from sharding.processes import DistributedConfig, join_timeout
from xds_jax.sampling.params import SamplingParams
from xds_jax.sequence import Sequence


class Store:
    """A stand-in for the jax.distributed key-value store."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {}
        self.changed = threading.Condition()

    def key_value_set(self, key: str, value: str) -> None:
        with self.changed:
            self.values[key] = value
            self.changed.notify_all()

    def blocking_key_value_get(self, key: str, timeout_ms: int) -> str:
        with self.changed:
            assert self.changed.wait_for(lambda: key in self.values, timeout_ms / 1000)
            return self.values[key]


def connect_pair(heartbeat_s=0.05, timeout_s=0.5):
    """A leader and one follower channel connected through a fake store; lost peers go to
    the returned lists."""
    store, lost = Store(), {0: [], 1: []}
    configs = [DistributedConfig("127.0.0.1:1", 2, i, heartbeat_s, timeout_s) for i in (0, 1)]
    channels = {}

    def open_side(i):
        channels[i] = ControlChannel.connect(configs[i], lambda p, r, i=i: lost[i].append((p, r)),
                                             timeout_s=10, store=store)

    threads = [threading.Thread(target=open_side, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return channels[0], channels[1], lost


def test_config_validates_fields():
    with pytest.raises(DeviceSetupError, match="HOST:PORT"):
        DistributedConfig("nohost", 2, 0)
    with pytest.raises(DeviceSetupError, match="process_id must be in 0..1"):
        DistributedConfig("h:1", 2, 2)
    with pytest.raises(DeviceSetupError, match="unknown keys"):
        DistributedConfig.of({"coordinator": "h:1", "num_processes": 2, "process_id": 0,
                              "rank": 1})
    config = DistributedConfig.of({"coordinator": "h:1", "num_processes": 2, "process_id": 0})
    assert config.is_leader and config.host == "h"


def test_rounds_reach_the_follower_in_order_then_stop():
    leader, follower, lost = connect_pair()
    for i in range(5):
        leader.broadcast(pickle.dumps(Round(i, (), 0)))
    leader.stop()
    got = []
    while (payload := follower.receive()) is not None:
        got.append(pickle.loads(payload).number)
    assert got == [0, 1, 2, 3, 4]
    time.sleep(0.2)
    assert lost == {0: [], 1: []}  # a stop is not a loss


def test_a_closed_peer_is_reported_within_the_timeout():
    leader, follower, lost = connect_pair()
    follower.peers[0].sock.close()  # the follower's process "dies"
    follower.closing.set()
    deadline = time.monotonic() + 2
    while not lost[0] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert lost[0] and lost[0][0][0] == 1


def test_a_silent_peer_is_reported_as_hung():
    leader, follower, lost = connect_pair(heartbeat_s=0.05, timeout_s=0.3)
    follower.closing.set()  # its heartbeat thread stops; the socket stays open (a hang)
    deadline = time.monotonic() + 3
    while not lost[0] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert lost[0] and "no heartbeat" in lost[0][0][1]


def test_step_broadcast_round_trip():
    """Rounds (some carrying a new request of a 32-token prompt) arrive whole and in order.
    Their cost is printed here and logged by the engine at shutdown, never asserted."""
    leader, follower, _ = connect_pair(heartbeat_s=1.0, timeout_s=5.0)
    params = SamplingParams(max_tokens=16, temperature=0)
    request = Request("r", None, list(range(32)), params, [Sequence(list(range(32)), params)])
    rounds = 500
    start = time.perf_counter()
    for i in range(rounds):
        events = (wire(request),) if i % 8 == 0 else ()
        leader.broadcast(pickle.dumps(Round(i, events, 123), protocol=pickle.HIGHEST_PROTOCOL))
        message = pickle.loads(follower.receive())
        assert message.number == i
    per_round_us = (time.perf_counter() - start) / rounds * 1e6
    leader.stop()
    print(f"step broadcast round trip: {per_round_us:.0f} us")
    assert isinstance(wire(request), Submit) and wire(request).seqs[0][1] == request.seqs[0].seed


def test_a_follower_rebuilds_a_request_as_the_leader_made_it():
    """Sequence ids, seeds, priority and cache salt cross the wire: a follower's queues and
    prefix cache then take the request as process 0's do."""
    params = SamplingParams(max_tokens=4, n=2, seed=5)

    def make_sequences(ids, params, priority=0, cache_salt=None):  # LLM.make_sequences
        return [Sequence(ids, params, index=i, seed=seed, priority=priority,
                         cache_salt=cache_salt) for i, seed in enumerate(params.sample_seeds())]

    made = Request("r", None, [1, 2, 3], params, make_sequences([1, 2, 3], params, -7, "t1"))
    wired = pickle.loads(pickle.dumps(wire(made)))
    again = FollowerEngine._rebuild(SimpleNamespace(make_sequences=make_sequences), wired)
    for a, b in zip(made.seqs, again.seqs, strict=True):
        assert (b.seq_id, b.seed, b.priority, b.cache_salt, b.salt) == (
            a.seq_id, a.seed, -7, "t1", b"t1")


def test_launcher_argv_and_statuses():
    argv = child_argv(["generate", "--max-tokens", "2", "Hi"], "127.0.0.1:9", 2, 1)
    assert argv[3:] == ["generate", "--coordinator", "127.0.0.1:9", "--num-processes", "2",
                        "--process-id", "1", "--max-tokens", "2", "Hi"]
    assert describe(-9) == "was killed by SIGKILL" and exit_code(-9) == 137
    with pytest.raises(LaunchError, match="not 'bench'"):
        launch(["--", "bench"], 2)


def test_launcher_stops_followers_that_outlive_process_0(capsys):
    """Process 0 finished (status 0) but process 1 keeps running: after --grace it is
    terminated and named, and the launch fails; all finishing with 0 is a success."""
    procs = [subprocess.Popen(["true"]), subprocess.Popen(["sleep", "60"])]
    assert watch(procs, [None, None], grace=0.5) == 1
    assert procs[1].returncode == -signal.SIGTERM
    assert "processes [1] did not follow" in capsys.readouterr().err
    assert watch([subprocess.Popen(["true"]), subprocess.Popen(["true"])], [None, None],
                  grace=5) == 0


def test_a_leader_that_lost_a_process_cannot_serve():
    """``/health`` of process 0 turns 503 once a peer is lost (it said 200 until the exit)."""
    from types import SimpleNamespace

    from serving.distributed.lockstep import LeaderEngine

    leader = object.__new__(LeaderEngine)  # no channel: only the health answer is under test
    leader.engine, leader.lost = SimpleNamespace(can_serve=lambda: True), None
    assert leader.can_serve()
    leader.lost = "process 1 of 2 was lost (connection closed)"
    assert not leader.can_serve()


@pytest.mark.parametrize("process_id,says", [(1, "could not join"), (0, "waited")])
def test_processes_that_never_all_join_exit_with_an_error_naming_what_to_check(process_id,
                                                                                says):
    """jax.distributed alone aborts with a native stack trace after its join timeout."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code = ("from sharding.processes import DistributedConfig, initialize; "
            f"initialize(DistributedConfig('127.0.0.1:{port}', 2, {process_id}))")
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "XDS_JOIN_TIMEOUT_S": "4"})
    assert done.returncode == 1 and time.monotonic() - start < 30
    assert f"xds: error: process {process_id}" in done.stderr and says in done.stderr
    assert "--num-processes 2" in done.stderr
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDS_JOIN_TIMEOUT_S", "soon")
        with pytest.raises(DeviceSetupError, match="XDS_JOIN_TIMEOUT_S"):
            join_timeout()


def test_a_duplicate_id_fails_that_request_alike_on_every_process():
    """A request whose id another still holds is refused by the engine; applied in a round
    (on process 0 and each follower) it fails that request alone instead of raising out of
    the round loop, which took every process down."""
    from serving.core.request_outcomes import DuplicateRequestError
    from serving.distributed.round_events import apply

    class Placed:
        def submit(self, request):
            raise DuplicateRequestError(f"request id {request.request_id!r} is already running")

    seen = []
    seq = Sequence([1, 2, 3], SamplingParams(max_tokens=2))
    request = Request("dup", None, [1, 2, 3], seq.params, [seq], on_output=seen.append)
    apply(Placed(), request)
    assert request.finished and seen and seen[-1].error and "already running" in seen[-1].error


def test_llm_generates_n_samples_as_one_request_every_process_rebuilds():
    """``LLM.generate`` hands the leader its sequences; the samples of an n > 1 prompt went
    out as a request each, which a follower rebuilt as n samples (zip(strict) failed)."""
    from serving.distributed.round_events import requests_of

    params = SamplingParams(max_tokens=4, n=3, seed=5)

    def make_sequences(ids, params, priority=0, cache_salt=None):  # LLM.make_sequences
        seqs = [Sequence(ids, params, index=i, seed=seed)
                for i, seed in enumerate(params.sample_seeds())]
        for seq in seqs[1:]:
            seq.fork_of = seqs[0]
        return seqs

    seqs = make_sequences([1, 2, 3], params) + make_sequences([4, 5], SamplingParams(max_tokens=2))
    requests = requests_of(seqs)
    assert [len(r.seqs) for r in requests] == [3, 1]
    for made in requests:
        wired = pickle.loads(pickle.dumps(wire(made)))
        again = FollowerEngine._rebuild(SimpleNamespace(make_sequences=make_sequences), wired)
        assert [(s.seq_id, s.seed) for s in again.seqs] == [(s.seq_id, s.seed) for s in made.seqs]
        assert all(s.fork_of is again.seqs[0] for s in again.seqs[1:])
