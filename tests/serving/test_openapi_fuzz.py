"""schemathesis against the server's own ``/openapi.json`` (issue 14): requests generated
from the schema of every operation, valid and invalid, never get a 5xx, and after each one the
server is healthy and serves a good request. The real engine on the tiny golden Llama (the
server ``test_request_isolation`` fuzzes with hypothesis); a few examples per operation and
mode keep it bounded."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable

from tests.serving.real_server import text_server_fixture
from tests.serving.test_request_isolation import assert_still_serving

EXAMPLES = 5  # per operation and generation mode

server = text_server_fixture()


def fuzz(server, operation, mode, seen: list) -> None:
    """``EXAMPLES`` requests of one operation in one generation mode, each followed by the
    health check and a good request."""

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def call(case):
        response = case.call(base_url=server.url, timeout=120)
        seen.append((operation.label, mode.value, response.status_code, case.body))
        assert response.status_code < 500, (case.method, case.path, case.body, response.text)
        assert_still_serving(server)

    try:
        call()
    except Unsatisfiable:  # no invalid input exists (GET /health, a free string)
        assert mode is schemathesis.GenerationMode.NEGATIVE, operation.label


def test_schema_generated_requests_never_take_the_server_down(server):
    api = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    assert {"POST /v1/completions", "POST /v1/chat/completions", "POST /v1/responses"} <= {
        op.label for op in operations}
    seen: list[tuple[str, str, int, object]] = []  # (operation, mode, status, body)
    for operation in operations:
        for mode in schemathesis.GenerationMode:
            fuzz(server, operation, mode, seen)
    assert {label for label, *_ in seen} == {op.label for op in operations}
    for label in ("POST /v1/completions", "POST /v1/chat/completions", "POST /v1/responses"):
        negative = [(status, body) for op, mode, status, body in seen
                    if op == label and mode == "negative"]
        assert negative and all(400 <= status < 500 for status, _ in negative), (label, [
            (status, body) for status, body in negative if not 400 <= status < 500])
    print(f"{len(seen)} requests, statuses {sorted({s for _, _, s, _ in seen})}")
