"""Integration tests of the OpenAI-compatible server over the fake engine: real uvicorn on a
loopback port, the ``openai`` client and ``httpx``."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.serving.fake_engine import REPLY, FakeEngine, client, serve, sse_events, wait_for


@pytest.fixture(scope="module")
def fake():
    engine = FakeEngine()
    with serve(engine, served_model_names=["fake", "alias"]) as server:
        server.engine = engine
        yield server


# -- the happy paths ---------------------------------------------------------------------------
def test_models_and_health(fake):
    assert httpx.get(fake.url + "/health").status_code == 200
    assert httpx.get(fake.url + "/ping").status_code == 200  # vLLM's SageMaker route
    assert httpx.post(fake.url + "/ping").status_code == 200
    models = client(fake).models.list()
    assert [m.id for m in models.data] == ["fake", "alias"]
    assert models.data[0].max_model_len == 128


def test_completion(fake):
    out = client(fake).completions.create(model="alias", prompt="Hi", max_tokens=6)
    assert out.object == "text_completion" and out.model == "alias"  # as asked, like vLLM
    assert out.choices[0].text == REPLY[:6] and out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (
        3, 6, 9)


def test_chat(fake):
    out = client(fake).chat.completions.create(
        model="fake", messages=[{"role": "user", "content": "Hi"}], max_completion_tokens=4)
    assert out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == REPLY[:4]
    assert out.usage.prompt_tokens == len("<user>Hi\n<assistant>")


def test_n_prompts_stop_echo(fake):
    out = client(fake).completions.create(model="fake", prompt=["a", "b"], n=2, max_tokens=20,
                                          stop=["42"], echo=True)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert out.choices[0].text == "a" + "The answer is "
    assert out.choices[0].finish_reason == "stop" and out.choices[0].stop_reason == "42"
    assert out.choices[3].text.startswith("b" + REPLY[1:5])
    # each sample's tokens: its text after the echoed prompt, and the stop string "42"
    assert out.usage.prompt_tokens == 4 and out.usage.completion_tokens == sum(
        len(c.text) - 1 + 2 for c in out.choices)


def test_token_id_prompts(fake):
    out = client(fake).completions.create(model="fake", prompt=[[5, 6], [7]], max_tokens=2)
    assert len(out.choices) == 2 and out.usage.prompt_tokens == 3


def test_logprobs(fake):
    out = client(fake).completions.create(model="fake", prompt="x", max_tokens=3, logprobs=1)
    lp = out.choices[0].logprobs
    assert lp.tokens == list(REPLY[:3]) and lp.token_logprobs == [-0.5] * 3
    assert lp.text_offset == [0, 1, 2] and lp.top_logprobs[0] == {"T": -0.5, "?": -2.0}
    chat = client(fake).chat.completions.create(
        model="fake", messages=[{"role": "user", "content": "x"}], max_tokens=2, logprobs=True,
        top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert [c.token for c in content] == ["T", "h"] and content[0].bytes == [ord("T")]
    assert [t.token for t in content[0].top_logprobs] == ["T", "?"]


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_streaming_matches_non_streamed(fake, endpoint):
    c = client(fake)
    if endpoint == "chat":
        kwargs = dict(model="fake", messages=[{"role": "user", "content": "Hi"}], max_tokens=9,
                      n=2)
        full = c.chat.completions.create(**kwargs)
        chunks = list(c.chat.completions.create(**kwargs, stream=True,
                                                stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        texts = ["".join(ch.choices[0].delta.content or "" for ch in chunks
                         if ch.choices and ch.choices[0].index == i) for i in range(2)]
        assert texts == [ch.message.content for ch in full.choices]
    else:
        kwargs = dict(model="fake", prompt="Hi", max_tokens=9, n=2)
        full = c.completions.create(**kwargs)
        chunks = list(c.completions.create(**kwargs, stream=True,
                                           stream_options={"include_usage": True}))
        texts = ["".join(ch.choices[0].text for ch in chunks
                         if ch.choices and ch.choices[0].index == i) for i in range(2)]
        assert texts == [ch.text for ch in full.choices]
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
    assert finishes.count("length") == 2
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 18
    assert all(ch.usage is None for ch in chunks[:-1])


def test_sse_wire_format(fake):
    body = {"model": "fake", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
            "stream": True}
    with httpx.stream("POST", fake.url + "/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[0]["object"] == "chat.completion.chunk" and "usage" not in events[0]
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[1]["choices"][0]["delta"] == {"content": "T"}
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert len({e["id"] for e in events}) == 1


def test_stream_chunks_share_the_timestamp():
    """OpenAI: "each chunk has the same timestamp"; the usage chunk of a stream longer than a
    second had a later one."""
    with serve(FakeEngine(delay=0.05)) as server:
        chunks = list(client(server).chat.completions.create(
            model="fake", messages=[{"role": "user", "content": "Hi"}], max_tokens=25,
            stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 25
    assert len({chunk.created for chunk in chunks}) == 1


def test_concurrent_streams():
    engine = FakeEngine(delay=0.01)

    async def one(c: openai.AsyncOpenAI, i: int) -> str:
        stream = await c.completions.create(model="fake", prompt=f"p{i}", max_tokens=20,
                                            stream=True)
        return "".join([chunk.choices[0].text async for chunk in stream])

    async def run(url: str) -> list[str]:
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as c:
            return await asyncio.gather(*(one(c, i) for i in range(8)))

    with serve(engine) as server:
        started = time.monotonic()
        texts = asyncio.run(run(server.url))
    assert texts == [REPLY[:20]] * 8
    assert time.monotonic() - started < 8 * 20 * 0.01  # they overlapped
    assert not engine.active


# -- aborts, overload and timeouts -------------------------------------------------------------
def test_disconnect_aborts():
    engine = FakeEngine(delay=0.02)
    body = {"model": "fake", "prompt": "Hi", "max_tokens": 100}
    with serve(engine) as server:
        with httpx.stream("POST", server.url + "/v1/completions",
                          json={**body, "stream": True}) as response:
            next(response.iter_lines())
        assert wait_for(lambda: len(engine.aborted) == 1 and not engine.active)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/completions", json=body, timeout=0.2)
        assert wait_for(lambda: len(engine.aborted) == 2 and not engine.active)
        assert httpx.post(server.url + "/v1/completions",
                          json={**body, "max_tokens": 2}).status_code == 200


def test_queue_full_is_503_with_retry_after():
    engine = FakeEngine(delay=0.04, max_num_queued_reqs=1)  # the stream runs 2 s
    with serve(engine) as server:
        c = client(server)
        stream = c.completions.create(model="fake", prompt="a", max_tokens=50, stream=True)
        with pytest.raises(openai.InternalServerError) as error:
            c.completions.create(model="fake", prompt="b", max_tokens=5)
        assert error.value.status_code == 503
        assert error.value.body["code"] == "overloaded"
        assert error.value.response.headers["retry-after"] == "1"
        assert "".join(chunk.choices[0].text for chunk in stream) == (REPLY * 2)[:50]
        assert c.completions.create(model="fake", prompt="b", max_tokens=2).choices[0].text


def test_request_timeout():
    engine = FakeEngine(delay=0.05)
    with serve(engine, request_timeout_s=0.3) as server:
        body = {"model": "fake", "prompt": "Hi", "max_tokens": 100}
        timed = httpx.post(server.url + "/v1/completions", json=body)
        assert (timed.status_code, timed.headers["x-should-retry"]) == (504, "false")
        with httpx.stream("POST", server.url + "/v1/completions",
                          json={**body, "stream": True}) as response:
            events = sse_events(response)
        assert events[-1]["error"]["code"] == timed.json()["error"]["code"] == "timeout"
        assert len(engine.aborted) == 2 and not engine.active


# -- bad input ----------------------------------------------------------------------------------
CHAT = {"model": "fake", "messages": [{"role": "user", "content": "Hi"}]}
BAD_REQUESTS = [
    ("completions", b'{"model": "fake", "prompt": ', 400, None),
    ("completions", {"model": "gpt-9", "prompt": "x"}, 404, "model"),
    ("chat/completions", {**CHAT, "model": "gpt-9"}, 404, "model"),
    ("completions", {"model": "fake", "prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ("completions", {"model": "fake", "prompt": 3.5}, 400, "prompt"),
    ("completions", {"model": "fake"}, 400, "prompt"),
    ("completions", {"model": "fake", "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("completions", {"model": "fake", "prompt": "x", "max_tokens": 10**9}, 400, "max_tokens"),
    ("completions", {"model": "fake", "prompt": "x" * 200}, 400, "prompt"),
    ("completions", {"model": "fake", "prompt": ""}, 400, "prompt"),
    ("completions", {"model": "fake", "prompt": "x", "temperature": -1}, 400, "temperature"),
    ("completions", {"model": "fake", "prompt": "x", "n": 0}, 400, "n"),
    ("completions", {"model": "fake", "prompt": "x", "logprobs": 99}, 400, "logprobs"),
    ("chat/completions", {**CHAT, "messages": []}, 400, "messages"),
    ("chat/completions", {**CHAT, "messages": "Hi"}, 400, "messages"),
    ("chat/completions", {**CHAT, "messages": [{"content": "no role"}]}, 400, "messages"),
    ("chat/completions", {**CHAT, "messages": [{"role": "user", "content": "x" * 200}]}, 400,
     "messages"),
    ("chat/completions", {**CHAT, "top_logprobs": 2}, 400, "top_logprobs"),
    ("chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ("chat/completions", {**CHAT, "logprobs": True, "top_logprobs": -1}, 400, "top_logprobs"),
    ("chat/completions", {**CHAT, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    ("chat/completions", {**CHAT, "max_completion_tokens": 10 ** 6}, 400,
     "max_completion_tokens"),
    ("chat/completions", {**CHAT, "stream_options": {"include_usage": True}}, 400,
     "stream_options"),
    ("completions", {"model": "fake", "prompt": "x", "stream": False,
                     "stream_options": {"include_usage": True}}, 400, "stream_options"),
    # a lone surrogate anywhere (JSON's "\ud800") is a 400 naming its field; it was a 500 and
    # a closed connection where the string reached an error message or llguidance
    ("completions", b'{"model": "\\ud800", "prompt": "x"}', 400, "model"),
    ("completions", b'{"model": "fake", "prompt": "x", "user": "\\ud800"}', 400, "user"),
    ("completions", b'{"model": "fake", "prompt": "x", "logit_bias": {"\\ud800": 1}}', 400,
     "logit_bias"),
    ("completions", b'{"model": "fake", "prompt": "x", "\\udc00": 1}', 400, None),
    ("chat/completions", b'{"model": "fake", "messages": [{"role": "user", "content": "Hi"}], '
     b'"guided_regex": "a\\ud800"}', 400, "guided_regex"),
    ("chat/completions", b'{"model": "fake", "messages": [{"role": "user", "content": "Hi"}], '
     b'"tools": [{"type": "function", "function": {"name": "\\ud800"}}], "tool_choice": '
     b'"none"}', 400, "tools"),
    ("chat/completions", b'{"model": "fake", "messages": [{"role": "user", "content": "Hi", '
     b'"name": {"\\ud800": [1]}}]}', 400, "messages"),
    # a value of another JSON type than the schema's, which pydantic's lax mode would coerce
    # (schemathesis' negative cases got a 200 for token ids of booleans): true/false or "0.5"
    # for a number, ["1", 2] for token ids, 1 for a boolean
    ("completions", {"model": "fake", "prompt": [[True, False], [1, 2]]}, 400, "prompt"),
    ("completions", {"model": "fake", "prompt": [True, 5]}, 400, "prompt"),
    ("completions", {"model": "fake", "prompt": "x", "max_tokens": True}, 400, "max_tokens"),
    ("completions", {"model": "fake", "prompt": "x", "logit_bias": {"5": False}}, 400,
     "logit_bias"),
    ("chat/completions", {**CHAT, "temperature": False}, 400, "temperature"),
    ("chat/completions", {**CHAT, "temperature": "0.5"}, 400, "temperature"),
    ("completions", {"model": "fake", "prompt": ["1", 2]}, 400, "prompt"),
    ("completions", {"model": "fake", "prompt": "x", "stream": 1}, 400, "stream"),
    ("completions", {"model": "fake", "prompt": "x", "stop_token_ids": ["7"]}, 400,
     "stop_token_ids"),
    ("completions", {"model": "fake", "prompt": "x", "stream": True,
                     "stream_options": {"include_usage": "yes"}}, 400, "stream_options"),
    ("completions", b'{"model": "fake", "prompt": "caf\xe9"}', 400, None),  # not UTF-8
    ("completions", b'{"model": "fake", "prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400,
     None),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD_REQUESTS)
def test_bad_input(fake, path, body, status, param):
    kwargs = {"content": body, "headers": {"Content-Type": "application/json"}} if isinstance(
        body, bytes) else {"json": body}
    response = httpx.post(f"{fake.url}/v1/{path}", **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    assert httpx.post(fake.url + "/v1/completions",
                      json={"model": "fake", "prompt": "ok", "max_tokens": 1}).status_code == 200


def test_bad_prompt_keeps_the_connection(fake):
    """A request error is answered without closing the keep-alive connection (found by
    benchmarks/chaos.py: the next request on it failed with a ReadError)."""
    with httpx.Client(base_url=fake.url) as c:
        for _ in range(3):
            bad = c.post("/v1/completions", content=b'{"model": "fake", "prompt": "\\ud800"}',
                         headers={"Content-Type": "application/json"})
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt"
            assert c.post("/v1/completions", json={"model": "fake", "prompt": "ok",
                                                   "max_tokens": 1}).status_code == 200


def test_surrogates_are_400s_on_every_route(fake):
    """A lone surrogate in a field the server echoes back (``model``: it was a 500, then the
    keep-alive connection closed) is a 400 naming the field, the connection kept."""
    with httpx.Client(base_url=fake.url, headers={"Content-Type": "application/json"}) as c:
        for path, body in [("/v1/completions", b'{"model": "\\ud800", "prompt": "x"}'),
                           ("/tokenize", b'{"model": "fake", "prompt": "a\\udfff"}'),
                           ("/detokenize", b'{"model": "\\ud800", "tokens": [70]}')]:
            bad = c.post(path, content=body)
            assert bad.status_code == 400, bad.text
            error = bad.json()["error"]
            assert error["code"] == "invalid_value" and "surrogate" in error["message"]
            assert c.post("/v1/completions", json={"model": "fake", "prompt": "ok",
                                                   "max_tokens": 1}).status_code == 200


def test_body_that_is_no_json_object_says_so(fake):
    """Not UTF-8, or JSON without its Content-Type (curl -d sends a form's): an
    ``invalid_json`` 400 that says what to send (it said "body: Input should be a valid
    dictionary")."""
    for content, headers in [(b'{"prompt": "caf\xe9"}', {"Content-Type": "application/json"}),
                             (b'{"prompt": "x"}', {"Content-Type": "text/plain"}),
                             (b'{"prompt": "x"}', {})]:
        response = httpx.post(fake.url + "/v1/completions", content=content, headers=headers)
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "invalid_json"
    assert "Content-Type: application/json" in response.json()["error"]["message"]
    empty = httpx.post(fake.url + "/v1/chat/completions", content=b"",
                       headers={"Content-Type": "application/json"})
    assert empty.status_code == 400 and empty.json()["error"]["code"] == "invalid_json"
    assert "the body is empty" in empty.json()["error"]["message"]


def test_tokenize_takes_nulls_as_defaults(fake):
    """As the generation routes do: clients that send every field send unset ones as null
    (they were 400s on /tokenize)."""
    nulls = {"add_generation_prompt": None, "continue_final_message": None,
             "return_token_strs": None, "add_special_tokens": None}
    prompt = httpx.post(fake.url + "/tokenize", json={"prompt": "ab", **nulls})
    assert prompt.status_code == 200 and prompt.json()["tokens"] == [1, 100, 101]
    chat = httpx.post(fake.url + "/tokenize", json={"messages": CHAT["messages"], **nulls})
    assert chat.status_code == 200, chat.text
    assert chat.json()["tokens"] == [ord(c) + 3 for c in "<user>Hi\n<assistant>"]


def test_unknown_route_has_error_body(fake):
    response = httpx.get(fake.url + "/v1/nothing")
    assert response.status_code == 404 and "error" in response.json()


def test_client_errors_are_invalid_request_errors(fake):
    """Every 4xx is the client's fault, typed so by OpenAI (a 405 said "server_error")."""
    response = httpx.get(fake.url + "/v1/completions")
    assert response.status_code == 405
    assert response.json()["error"]["type"] == "invalid_request_error"


# -- metrics ------------------------------------------------------------------------------------
def test_metrics(fake):
    client(fake).completions.create(model="fake", prompt="m", max_tokens=5)
    text = httpx.get(fake.url + "/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}

    def value(family: str, sample: str, **labels) -> float:
        return next(s.value for s in families[family].samples if s.name == sample
                    and all(s.labels.get(k) == v for k, v in labels.items()))

    for name in ("ttft", "tpot", "e2e"):
        family = {"ttft": "xds:time_to_first_token_seconds",
                  "tpot": "xds:time_per_output_token_seconds",
                  "e2e": "xds:e2e_request_latency_seconds"}[name]
        assert families[family].type == "histogram"
        assert value(family, family + "_count", model_name="fake") >= 1
    assert value("xds:inter_token_latency_seconds", "xds:inter_token_latency_seconds_count") >= 4
    assert value("xds:kv_cache_usage_perc", "xds:kv_cache_usage_perc") == 0.25
    assert value("xds:prefix_cache_hit_rate", "xds:prefix_cache_hit_rate") == 0.5
    assert value("xds:num_requests_running", "xds:num_requests_running") == 0
    assert value("xds:num_requests_waiting", "xds:num_requests_waiting") == 0
    assert value("xds:generation_tokens", "xds:generation_tokens_total") == 20
    assert value("xds:collective_latency_seconds", "xds:collective_latency_seconds",
                 collective="all_to_all") == 0.002
    assert value("xds:expert_load", "xds:expert_load", layer="0", expert="1") == 1
    assert value("xds:request_success", "xds:request_success_total",
                 finished_reason="length") >= 1
    # vLLM's names of the same metrics, for dashboards and autoscalers written for vLLM
    for ours, sample, labels in (
            ("xds:num_requests_waiting", "", {}), ("xds:kv_cache_usage_perc", "", {}),
            ("xds:generation_tokens", "_total", {}), ("xds:num_preemptions", "_total", {}),
            ("xds:time_to_first_token_seconds", "_count", {"model_name": "fake"}),
            ("xds:request_success", "_total", {"finished_reason": "length"})):
        theirs = "vllm:" + ours[4:]
        assert families[theirs].type == families[ours].type
        assert value(theirs, theirs + sample, **labels) == value(ours, ours + sample, **labels)


class DownEngine(FakeEngine):
    """Every DP group out of service (crashed, fenced): the engine places nothing."""

    async def generate(self, prompt_ids, params, request_id, prompt=None, priority=0,
                       cache_salt=None):
        from serving.core.balancer import NoHealthyGroupError

        raise NoHealthyGroupError("no healthy DP group is available")
        yield  # an async generator, as the engine's


def test_no_healthy_group_is_a_503_to_retry_not_an_internal_error():
    with serve(DownEngine()) as running:
        for stream in (False, True):
            reply = httpx.post(running.url + "/v1/completions", json={
                "model": "fake", "prompt": "hi", "max_tokens": 2, "stream": stream})
            assert reply.status_code == 503, reply.text
            assert reply.json()["error"]["code"] == "unavailable"
            assert reply.headers["retry-after"] == "5"
