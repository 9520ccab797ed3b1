"""Several jax.distributed processes on one machine (``xds launch``): the same text as one
process (``generate``, and ``serve`` answering a completion), a killed process reported, and
KV arrays copied device to device between processes (``multihost.move``). Each case starts
its own processes, so it runs in any pytest process group; they are slow (two engines
compile)."""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

MODEL = "configs/models/deepseek-v3-tiny.json"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.slow


def xds(*argv: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XDS_CPU_DEVICES"}
    return subprocess.run([sys.executable, "-m", "serving.entrypoints.cli", *argv], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


def generate_args(deployment: str, max_tokens: int = 8) -> list[str]:
    return ["generate", "--model", MODEL, "--deployment", f"configs/deployments/{deployment}",
            "--max-tokens", str(max_tokens), "--temperature", "0", "--log-level", "warning",
            "Hello"]


@functools.cache
def one_process(deployment: str) -> str:
    """What ``xds generate`` prints in one process on ``deployment`` (the two-process
    ``generate`` and ``serve`` cases compare against it: run once, not once each)."""
    one = xds(*generate_args(deployment))
    assert one.returncode == 0, one.stderr
    assert one.stdout.strip()
    return one.stdout


@pytest.mark.parametrize("deployment", ["cpu16-ma.yaml", "cpu8-pd.yaml"])
def test_two_processes_print_what_one_prints(deployment):
    """cpu16-ma (PD + MA over 8 devices each): prefill and attention domain 0 on process 0,
    domain 1 across both, the expert slice on process 1; KV hand-off, A2E/E2A and the
    sampled tokens all cross the process boundary. cpu8-pd: prefill on process 0, decode on
    process 1, so every KV pull is a device-to-device copy between the processes."""
    one = one_process(deployment)
    two = xds("launch", "--num-processes", "2", "--", *generate_args(deployment))
    assert two.returncode == 0, two.stderr
    assert two.stdout == one


def test_a_killed_process_is_named_and_the_launch_fails(tmp_path):
    """Process 1 is killed while process 0 generates: process 0 fails the request with a
    clear error, and the launcher exits non-zero naming process 1."""
    argv = [sys.executable, "-m", "serving.entrypoints.cli", "launch", "--num-processes", "2",
            "--log-dir", str(tmp_path), "--grace", "20", "--",
            *generate_args("cpu16-ma.yaml", max_tokens=4000)]
    env = {k: v for k, v in os.environ.items() if k != "XDS_CPU_DEVICES"}
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    pid = None
    for line in proc.stderr:
        if m := re.search(r"process 1 is pid (\d+)", line):
            pid = int(m.group(1))
            break
    assert pid is not None
    assert proc.stdout.read(1)  # process 0 is generating (past the warm-up)
    time.sleep(1)
    os.kill(pid, signal.SIGKILL)
    start = time.monotonic()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert time.monotonic() - start < 40
    assert "process 1" in err and "SIGKILL" in err
    assert "process 1 of 2 was lost" in err



def test_move_copies_device_to_device_across_processes():
    """``multihost.move`` between slices on different processes: every case (a PD pull from
    a TP pair, a sharded source, several rounds, overlapping slices, one process only) lands
    on the destination with the source's values and reads nothing back to host memory."""
    from serving.distributed.launcher import free_port

    coordinator = f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if k != "XDS_CPU_DEVICES"} | {"PYTHONPATH": ROOT}
    procs = [subprocess.Popen([sys.executable, "tests/serving/move_worker.py", coordinator,
                               str(i)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-3000:]
        assert out.strip() == "ok"


def _get(url: str, body: dict | None = None) -> dict | None:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as reply:
        raw = reply.read()
    return json.loads(raw) if raw else None


def served_model(url: str, proc: subprocess.Popen, seconds: float = 300) -> str:
    """The model name a launched server answers ``/v1/models`` with, once it is up."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return _get(f"{url}/v1/models")["data"][0]["id"]
        except OSError:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(1)


def test_serve_over_two_processes_answers_and_stops_cleanly(tmp_path):
    """``xds launch -- serve`` on cpu8-pd (prefill on process 0, decode on process 1): process
    0 answers an OpenAI completion with the text one process generates; SIGTERM to the
    launcher drains the server, releases process 1, and the launch exits 0."""
    from serving.distributed.launcher import free_port

    url = f"http://127.0.0.1:{free_port()}"
    argv = [sys.executable, "-m", "serving.entrypoints.cli", "launch", "--num-processes", "2",
            "--log-dir", str(tmp_path), "--", "serve", "--model", MODEL, "--deployment",
            "configs/deployments/cpu8-pd.yaml", "--port", url.rpartition(":")[2],
            "--log-level", "warning"]
    env = {k: v for k, v in os.environ.items() if k != "XDS_CPU_DEVICES"}
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        model = served_model(url, proc)
        reply = _get(f"{url}/v1/completions", {"model": model, "prompt": "Hello",
                                               "max_tokens": 8, "temperature": 0})
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert reply["choices"][0]["text"] == one_process("cpu8-pd.yaml").removesuffix("\n") != ""
