"""What the server says when the engine cannot serve: ``/health`` is 503 when no request can
run (with PD, no prefill group or no decode group in service; it said 200 while every request
got 503), and a request the engine failed is a JSON error on a connection that stays open
(``RequestFailedError`` reached the catch-all handler, after which uvicorn closed the
connection: a keep-alive client's next request failed with a dropped connection)."""

from __future__ import annotations

import json
import socket
from urllib.parse import urlparse

import httpx

from serving.core.balancer import NoHealthyGroupError
from serving.core.request_outcomes import EngineDeadError, RequestFailedError
from serving.distributed.lockstep import PeerLostError
from tests.serving.fake_engine import FakeEngine, serve
from tests.serving.test_faults import pd_engine


def test_a_pd_engine_serves_only_with_a_prefill_and_a_decode_group_in_service():
    _, engine = pd_engine()
    assert engine.can_serve()
    for g in engine.entry:
        g.healthy = False
    assert not engine.can_serve()  # decode groups are healthy, but nothing prefills
    engine.entry[1].healthy = True
    assert engine.can_serve()
    for g in engine.router.decode:
        g.healthy = False
    assert not engine.can_serve()  # prompts are prefilled, but nothing decodes them


class Failing(FakeEngine):
    """A fake engine whose requests fail as ``error`` says after their first output (an
    error before it is answered as the request's own), and whose health is settable."""

    def __init__(self):
        super().__init__()
        self.error: Exception | None = None
        self.serving = True

    async def generate(self, *args, **kwargs):
        stream = super().generate(*args, **kwargs)
        yield await anext(stream)
        if self.error is not None:
            raise self.error
        async for out in stream:
            yield out

    def can_serve(self) -> bool:
        return self.serving


def post(conn: socket.socket, body: dict) -> tuple[int, dict, dict]:
    """POST /v1/completions on an open HTTP/1.1 connection: status, headers, JSON body."""
    data = json.dumps(body).encode()
    conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json"
                 b"\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
    raw = b""
    while b"\r\n\r\n" not in raw:
        chunk = conn.recv(65536)
        assert chunk, "the server closed the connection"
        raw += chunk
    head, rest = raw.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    while len(rest) < int(headers["content-length"]):
        rest += conn.recv(65536)
    return int(lines[0].split()[1]), headers, json.loads(rest)


def test_health_and_engine_errors_keep_the_connection():
    engine = Failing()
    body = {"model": "fake", "prompt": "hi", "max_tokens": 3}
    with serve(engine) as server:
        assert httpx.get(server.url + "/health").status_code == 200
        engine.serving = False
        assert httpx.get(server.url + "/health").status_code == 503
        engine.serving = True
        url = urlparse(server.url)
        conn = socket.create_connection((url.hostname, url.port), timeout=30)
        cases = [(RequestFailedError("request r failed: MAStepFailed"), 500, "request_failed"),
                 (NoHealthyGroupError("NoHealthyGroupError: none"), 503, "unavailable"),
                 (EngineDeadError("the engine was shut down"), 503, "shutting_down"),
                 (PeerLostError("process 1 of 2 was lost"), 503, "shutting_down")]
        with conn:
            for error, status, code in cases:
                engine.error = error
                got, headers, reply = post(conn, body)
                assert got == status and reply["error"]["code"] == code, reply
                assert headers.get("connection") != "close"
                if status == 503:
                    assert "retry-after" in headers
            engine.error = None
            assert post(conn, body)[0] == 200  # the same connection serves on
