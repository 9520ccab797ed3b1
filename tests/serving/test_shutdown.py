"""Graceful shutdown: on SIGTERM the server refuses new requests with 503 (and /health turns
503) while those in flight finish, up to --shutdown-timeout; then it aborts the rest and exits 0.
In process over the fake engine, and a real ``xds serve`` subprocess on the tiny model."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn

from serving.entrypoints.server import build_app
from serving.entrypoints.shutdown import DrainingServer
from tests.serving.fake_engine import REPLY, FakeEngine, wait_for

ROOT = Path(__file__).resolve().parents[2]


class DrainingThread:
    """``DrainingServer`` over the fake engine on a loopback port, in a thread."""

    def __init__(self, engine: FakeEngine, timeout_s: float):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        app = build_app(engine)
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2)
        self.server = DrainingServer(config, app.state.served, timeout_s)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)
        self.thread.start()
        assert wait_for(lambda: self.server.started)

    def sigterm(self) -> None:
        self.server.handle_exit(signal.SIGTERM, None)


def stream_lines(url: str, body: dict, started: threading.Event, out: list) -> None:
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True},
                      timeout=60) as response:
        for line in response.iter_lines():
            if line:
                out.append(line)
                started.set()


def texts(lines: list[str]) -> tuple[str, str | None]:
    events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    text = "".join(c["text"] for e in events for c in e.get("choices", []))
    return text, next((c["finish_reason"] for e in events for c in e.get("choices", [])
                       if c["finish_reason"]), None)


def test_sigterm_drains_in_flight_and_refuses_new():
    running = DrainingThread(FakeEngine(delay=0.04), timeout_s=30)  # the stream runs 2.4 s
    started, lines = threading.Event(), []
    body = {"model": "fake", "prompt": "Hi", "max_tokens": 60}
    client = threading.Thread(target=stream_lines, args=(running.url, body, started, lines))
    client.start()
    assert started.wait(10)
    running.sigterm()
    assert wait_for(lambda: running.server.served.draining)
    refused = httpx.post(running.url + "/v1/completions", json={**body, "max_tokens": 2})
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
    assert 1 <= int(refused.headers["retry-after"]) <= 31
    assert httpx.get(running.url + "/health").status_code == 503
    assert httpx.post(running.url + "/ping").status_code == 503
    client.join(30)
    assert texts(lines) == ((REPLY * 2)[:60], "length") and lines[-1] == "data: [DONE]"
    running.thread.join(10)
    assert not running.thread.is_alive()
    metrics = running.server.served.metrics.rejections.labels("fake", "shutting_down")
    assert metrics._value.get() == 1


@pytest.mark.parametrize("timeout_s", [0.5, 0.0])  # 0: abort at the first signal
def test_shutdown_timeout_aborts_what_is_left(timeout_s):
    engine = FakeEngine(delay=0.05, max_model_len=2000)
    running = DrainingThread(engine, timeout_s=timeout_s)
    started, lines = threading.Event(), []
    body = {"model": "fake", "prompt": "Hi", "max_tokens": 1000}
    client = threading.Thread(target=stream_lines, args=(running.url, body, started, lines))
    client.start()
    assert started.wait(10)
    began = time.monotonic()
    running.sigterm()
    client.join(20)
    running.thread.join(10)
    assert not running.thread.is_alive() and time.monotonic() - began < 8
    text, reason = texts(lines)
    assert reason == "abort" and 0 < len(text) < 1000 and lines[-1] == "data: [DONE]"
    assert engine.admission.slots == 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_xds_serve_sigterm_exits_zero_after_draining():
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "serving.entrypoints.cli", "serve", "--model",
               str(ROOT / "tests/golden/llama"), "--dtype", "float32", "--port", str(port),
               "--max-num-seqs", "4", "--kv-cache-gib", "0.01", "--shutdown-timeout", "60",
               "--log-level", "warning", "--precompile-seconds", "0",  # not checked here
               # 20 ms a step: the 200-token stream is still running when the drain begins
               # (at uvicorn's next tick, up to 100 ms after the signal)
               "--fault", "group_stall:group=0:seconds=0.02:after_steps=1:times=1000000"]
    server = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    try:
        def healthy() -> bool:
            try:
                return httpx.get(url + "/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return server.poll() is not None
        assert wait_for(healthy, seconds=240) and server.poll() is None, server.stdout.read()
        started, lines = threading.Event(), []
        body = {"prompt": [5, 6, 7], "max_tokens": 200, "ignore_eos": True, "temperature": 0}
        client = threading.Thread(target=stream_lines, args=(url, body, started, lines))
        client.start()
        assert started.wait(60)
        server.send_signal(signal.SIGTERM)
        assert wait_for(lambda: httpx.get(url + "/health").status_code == 503, seconds=10)
        refused = httpx.post(url + "/v1/completions", json={**body, "max_tokens": 2})
        assert refused.status_code == 503 and "retry-after" in refused.headers
        client.join(120)
        assert server.wait(60) == 0
        _, reason = texts(lines)
        assert reason == "length" and lines[-1] == "data: [DONE]"
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
