"""Signals and a multi-process deployment (``xds launch``): SIGTERM to a process other than 0
stops the whole deployment through process 0 (a server drains, every process exits 0), and
the processes die with a launcher killed by SIGKILL."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.serving.test_lockstep import connect_pair
from tests.serving.test_multiprocess import MODEL, ROOT, _get, generate_args, served_model


def _gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie no one reaped counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] in ("Z", "X")
    except OSError:
        return True


def _children(pid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                if int(f.read().rpartition(")")[2].split()[1]) == pid:
                    pids.append(int(entry))
        except (OSError, ValueError):
            continue
    return pids


def _launch(tmp_path, command: list[str]) -> tuple[subprocess.Popen, int]:
    """``xds launch --num-processes 2 -- command``; the launcher and process 1's pid."""
    argv = [sys.executable, "-m", "serving.entrypoints.cli", "launch", "--num-processes", "2",
            "--log-dir", str(tmp_path), "--", *command]
    env = {k: v for k, v in os.environ.items() if k != "XDS_CPU_DEVICES"}
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if m := re.search(r"process 1 is pid (\d+)", line):
            return proc, int(m.group(1))
    raise AssertionError(f"the launcher did not start process 1: {proc.communicate()}")


def _kill(proc: subprocess.Popen, pids: list[int]) -> None:
    """End the launcher and the processes ``pids`` (its children) where they still run."""
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                ours = b"serving.entrypoints.cli" in f.read()  # not a reused pid
        except OSError:
            continue
        if ours and not _gone(pid):
            os.kill(pid, signal.SIGKILL)
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_a_follower_s_drain_request_reaches_the_leader():
    """``request_drain`` on a follower's channel calls the leader's ``on_drain`` with its id,
    and is no loss."""
    leader, follower, lost = connect_pair()
    asked = threading.Event()
    leader.on_drain = lambda process_id: asked.set() if process_id == 1 else None
    follower.request_drain()
    assert asked.wait(5)
    leader.stop()
    assert follower.receive() is None
    assert lost == {0: [], 1: []}


def test_a_follower_s_sigterm_asks_to_stop_then_exits_in_bounded_time():
    """Process 0 not answering the request (``request_drain`` does nothing here): the process
    dies by SIGTERM after the wait, and the request was made once."""
    code = ("import sys, time, types\n"
            "from serving.entrypoints.launch import stop_deployment_on_sigterm\n"
            "follower = types.SimpleNamespace(request_drain=lambda: print('asked', flush=True))\n"
            "stop_deployment_on_sigterm(follower, 1.0)\n"
            "print('ready', flush=True)\n"
            "time.sleep(30)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signal.SIGTERM)
        start = time.monotonic()
        out, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGTERM
    assert out == "asked\n"
    assert 0.8 < time.monotonic() - start < 5


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal")
def test_the_processes_die_with_a_killed_launcher(tmp_path):
    """``kill -9`` of ``xds launch`` (here while its processes start) leaves none running."""
    proc, follower = _launch(tmp_path, generate_args("cpu8-pd.yaml"))
    children = []
    try:
        children = _children(proc.pid)
        assert follower in children and len(children) == 2
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 10
        while not all(_gone(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [pid for pid in children if not _gone(pid)] == []
    finally:
        _kill(proc, children)


@pytest.mark.slow
# (SIGTERM to every process at once drained and exited 0 as well, by hand and in a test left
# out of the suite for its ~40 s: process 0 waits DRAIN_COALESCE_S for its own SIGTERM)
@pytest.mark.parametrize("targets", [(1,)], ids=["process-1"])
def test_sigterm_to_a_follower_drains_the_server_and_stops_every_process(tmp_path, targets):
    """``xds launch -- serve`` on cpu8-pd (decode on process 1): SIGTERM to process 1 while a
    completion runs makes process 0 drain (the completion finishes), then every process exits
    0 and so does the launch. The same when every process gets SIGTERM at once (a scheduler
    stopping the job): process 0 drains once, it does not take process 1's request for a
    second SIGTERM (which stops a server at once)."""
    from serving.distributed.launcher import free_port

    url = f"http://127.0.0.1:{free_port()}"
    proc, follower = _launch(tmp_path, [
        "serve", "--model", MODEL, "--deployment", "configs/deployments/cpu8-pd.yaml",
        "--port", url.rpartition(":")[2], "--log-level", "warning"])
    children = _children(proc.pid)
    pids = {1: follower, 0: next(pid for pid in children if pid != follower)}
    try:
        model = served_model(url, proc)
        replies = []
        request = threading.Thread(target=lambda: replies.append(_get(
            f"{url}/v1/completions", {"model": model, "prompt": "Hello", "max_tokens": 48,
                                      "temperature": 0, "ignore_eos": True})))
        request.start()
        time.sleep(1)
        for i in targets:
            os.kill(pids[i], signal.SIGTERM)
        start = time.monotonic()
        _, err = proc.communicate(timeout=60)
        request.join(10)
    finally:
        _kill(proc, children)
    assert proc.returncode == 0, err[-3000:]
    assert time.monotonic() - start < 45
    assert all(_gone(pid) for pid in children)
    assert replies and replies[0]["choices"][0]["finish_reason"] == "length"
    with open(tmp_path / "process-1.log") as f:
        assert "asking process 0 to stop" in f.read()
