"""Admission control (queue limits by sequences and prompt tokens, n counted as n, 503 with
Retry-After), the API key and the body-size limit, over the fake engine."""

from __future__ import annotations

import gzip
import json

import httpx
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from serving.core.admission import (
    DRAIN_WINDOW_S,
    RETRY_AFTER_MAX_S,
    Admission,
    OverloadedError,
    RequestTooLargeError,
)
from tests.serving.fake_engine import FakeEngine, client, serve, wait_for


def rejections(url: str, **headers) -> dict[str, float]:
    text = httpx.get(url + "/metrics", headers=headers).text
    family = next(f for f in text_string_to_metric_families(text)
                  if f.name == "xds:admission_rejections")
    return {s.labels["reason"]: s.value for s in family.samples if s.name.endswith("_total")}


# -- the bookkeeping ----------------------------------------------------------------------------
def test_admission_limits_and_release():
    admission = Admission(max_num_queued_reqs=8, max_num_queued_tokens=100)
    first = admission.admit(6, 40)
    with pytest.raises(OverloadedError) as error:
        admission.admit(4, 10)
    assert error.value.reason == "queued_reqs" and admission.slots == 6
    with pytest.raises(OverloadedError) as error:
        admission.admit(1, 61)
    assert error.value.reason == "queued_tokens" and admission.tokens == 40
    with pytest.raises(RequestTooLargeError) as too_large:
        admission.admit(9, 1)
    assert too_large.value.field == "n"
    with pytest.raises(RequestTooLargeError) as too_large:
        admission.admit(1, 101)
    assert too_large.value.field == "prompt"
    second = admission.admit(2, 60)
    first.release()
    first.release()  # idempotent
    assert (admission.slots, admission.tokens, admission.requests) == (2, 60, 1)
    second.release()
    assert (admission.slots, admission.tokens, admission.requests) == (0, 0, 0)
    with pytest.raises(ValueError, match="max_num_queued_reqs"):
        Admission(0, 10)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def retry_after(admission: Admission, slots: int, tokens: int) -> int:
    with pytest.raises(OverloadedError) as error:
        admission.admit(slots, tokens)
    return error.value.retry_after_s


def test_retry_after_follows_the_measured_drain_rate():
    """Worked by hand: 4 sequences (40 prompt tokens) released in the 10 s since the first
    admission drain at 0.4 sequences (4 tokens) per second."""
    clock = Clock()
    admission = Admission(max_num_queued_reqs=8, max_num_queued_tokens=100, clock=clock)
    tickets = [admission.admit(2, 20) for _ in range(4)]
    assert retry_after(admission, 1, 1) == 1  # nothing drained yet, the server just started
    clock.now += 10
    assert retry_after(admission, 3, 1) == 10  # nothing drained in 10 s: as long again
    for t in tickets[:2]:
        t.release()
    held = [admission.admit(2, 20) for _ in range(2)]
    # 4 sequences over the limit at 0.4/s: 10 s; 1 over: 2.5 s -> 3
    assert retry_after(admission, 4, 1) == 10 and retry_after(admission, 1, 1) == 3
    for t in tickets[2:]:
        t.release()
    more = admission.admit(2, 59)  # 99 tokens in flight; 80 released in 10 s: 8 per s
    assert retry_after(admission, 1, 100) == 13  # 99 tokens over: 12.4 s
    clock.now += 1000  # the releases are old: nothing drained in the window
    assert retry_after(admission, 3, 1) == DRAIN_WINDOW_S
    for t in (*held, more):
        t.release()
    clock.now += 1
    big = Admission(max_num_queued_reqs=1000, max_num_queued_tokens=10**6, clock=clock)
    slow = big.admit(999, 1)
    clock.now += 29
    big.admit(1, 1).release()  # one sequence in 29 s
    assert retry_after(big, 999, 1) == RETRY_AFTER_MAX_S  # bounded
    slow.release()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 5), st.integers(0, 40)), max_size=40))
def test_admission_never_exceeds_its_limits(ops):
    admission, held = Admission(10, 100), []
    for admit, slots, tokens in ops:
        if admit:
            try:
                held.append(admission.admit(slots, tokens))
            except OverloadedError:
                assert admission.slots + slots > 10 or admission.tokens + tokens > 100
        elif held:
            held.pop(tokens % len(held)).release()
        assert admission.slots == sum(t.slots for t in held) <= 10
        assert admission.tokens == sum(t.tokens for t in held) <= 100
    for ticket in held:
        ticket.release()
    assert (admission.slots, admission.tokens, admission.requests) == (0, 0, 0)


# -- through the server -------------------------------------------------------------------------
def test_n_counts_as_n_slots():
    engine = FakeEngine(delay=0.04, max_num_queued_reqs=8)  # the big stream runs 2.4 s
    with serve(engine) as server:
        c = client(server)
        big = c.completions.create(model="fake", prompt="a", max_tokens=60, n=6, stream=True)
        next(iter(big))
        assert engine.admission.slots == 6
        with pytest.raises(openai.InternalServerError) as error:
            c.completions.create(model="fake", prompt="b", max_tokens=2, n=4)
        assert error.value.status_code == 503 and error.value.body["code"] == "overloaded"
        assert int(error.value.response.headers["retry-after"]) >= 1
        # two prompts x n=2 are four sequences, one more than the room left
        with pytest.raises(openai.InternalServerError):
            c.completions.create(model="fake", prompt=["b", "c"], max_tokens=2, n=2)
        # a small request is served at once next to the big one
        assert len(c.completions.create(model="fake", prompt="b", max_tokens=2, n=2).choices) == 2
        with pytest.raises(openai.BadRequestError) as error:
            c.completions.create(model="fake", prompt="b", max_tokens=2, n=9)
        assert error.value.body["param"] == "n"
        assert error.value.body["code"] == "request_too_large"
        assert sum(len(chunk.choices) for chunk in big) > 0
        assert wait_for(lambda: engine.admission.slots == 0)
        assert rejections(server.url) == {"queued_reqs": 2.0, "queued_tokens": 0.0,
                                          "shutting_down": 0.0}


def test_prompt_tokens_are_limited():
    engine = FakeEngine(delay=0.02, max_num_queued_tokens=40)
    with serve(engine) as server:
        c = client(server)
        stream = c.completions.create(model="fake", prompt="x" * 24, max_tokens=100, stream=True)
        next(iter(stream))
        assert engine.admission.tokens == 25  # BOS and 24 bytes
        with pytest.raises(openai.InternalServerError) as error:
            c.chat.completions.create(model="fake", max_tokens=2,
                                      messages=[{"role": "user", "content": "y" * 20}])
        assert error.value.status_code == 503
        assert c.completions.create(model="fake", prompt="short", max_tokens=2).choices
        with pytest.raises(openai.BadRequestError) as error:
            c.completions.create(model="fake", prompt="z" * 50, max_tokens=2)
        assert error.value.body["param"] == "prompt"
        stream.close()
        assert wait_for(lambda: engine.admission.tokens == 0 and not engine.active)
        assert rejections(server.url)["queued_tokens"] == 1


def test_disconnects_and_errors_give_tickets_back():
    engine = FakeEngine(delay=0.02, max_num_queued_reqs=4)
    body = {"model": "fake", "prompt": "Hi", "max_tokens": 100, "n": 4}
    with serve(engine) as server:
        for _ in range(3):
            with httpx.stream("POST", server.url + "/v1/completions",
                              json={**body, "stream": True}) as response:
                next(response.iter_lines())
            assert wait_for(lambda: engine.admission.slots == 0)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/completions", json=body, timeout=0.2)
        assert wait_for(lambda: engine.admission.slots == 0)
        bad = httpx.post(server.url + "/v1/completions", json={**body, "max_tokens": 500})
        assert bad.status_code == 400 and engine.admission.slots == 0
        assert httpx.post(server.url + "/v1/completions",
                          json={**body, "max_tokens": 2}).status_code == 200


# -- API key and body size ----------------------------------------------------------------------
def test_api_key():
    with serve(FakeEngine(), api_key="s3cret") as server:
        assert httpx.get(server.url + "/health").status_code == 200
        assert httpx.get(server.url + "/metrics").status_code == 200
        assert httpx.post(server.url + "/ping").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            response = httpx.get(server.url + "/v1/models", headers=headers)
            assert response.status_code == 401, headers
            assert response.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            client(server).models.list()
        good = openai.OpenAI(base_url=server.url + "/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model="fake", prompt="a", max_tokens=2).choices
        # as vLLM: the key guards the /v1 API (and the scoring routes), not the tokenizer's
        # routes or /version, which vLLM users' scripts call without one
        assert httpx.post(server.url + "/tokenize", json={"prompt": "a"}).status_code == 200
        assert httpx.get(server.url + "/version").status_code == 200
        for path in ("/score", "/rerank", "/v2/rerank", "/v1/score"):
            assert httpx.post(server.url + path, json={}).status_code == 401, path


def test_response_role_max_logprobs_and_request_log(caplog):
    """--response-role names chat replies (streamed and not), --max-logprobs caps what a
    request may ask (400 naming the field), --enable-log-requests logs each request."""
    import logging

    caplog.set_level(logging.INFO, logger="serving.entrypoints.server_state")
    with serve(FakeEngine(), response_role="bot", max_logprobs=2, log_requests=True) as server:
        sdk = client(server)
        chat = dict(model="fake", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert sdk.chat.completions.create(**chat).choices[0].message.role == "bot"
        first = next(iter(sdk.chat.completions.create(**chat, stream=True)))
        assert first.choices[0].delta.role == "bot"
        with pytest.raises(openai.BadRequestError, match="logprobs 3 is more than"):
            sdk.completions.create(model="fake", prompt="a", max_tokens=2, logprobs=3)
        assert sdk.completions.create(model="fake", prompt="a", max_tokens=2, logprobs=2)
    assert "prompt(s) of" in caplog.text


def test_body_size_limit():
    with serve(FakeEngine(), max_request_bytes=2000) as server:
        url = server.url + "/v1/completions"
        big = {"model": "fake", "prompt": "x" * 3000, "max_tokens": 2}
        response = httpx.post(url, json=big)
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "request_too_large"

        def chunks():  # no Content-Length: the limit applies as the body streams in
            yield b'{"model": "fake", "prompt": "'
            for _ in range(10):
                yield b"y" * 500
            yield b'", "max_tokens": 2}'

        response = httpx.post(url, content=chunks(), headers={"Content-Type": "application/json"})
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "request_too_large"
        assert httpx.post(url, json={**big, "prompt": "x" * 100}).status_code == 200
        # a compressed body: said so (it was "not UTF-8 JSON")
        packed = gzip.compress(json.dumps({**big, "prompt": "x"}).encode())
        response = httpx.post(url, content=packed, headers={
            "Content-Type": "application/json", "Content-Encoding": "gzip"})
        assert response.status_code == 415 and "Content-Encoding gzip" in response.text
