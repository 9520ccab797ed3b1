"""One bad request never takes a DP group down: validation at the door, isolation inside.

The server runs the real engine on the tiny golden Llama with a real byte tokenizer and a
ChatML template, so both endpoints take text. Every case is followed by a health check and a
good request, as a client would see the service.
"""

from __future__ import annotations

import math

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving.core.runner import ModelRunner
from tests.serving.fake_engine import wait_for
from tests.serving.real_server import text_server_fixture

POISON = 7  # a prompt starting with this id makes the patched runner raise

server = text_server_fixture()


def post(server, path: str, body) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=120)


def good_completion(server) -> list[int]:
    r = post(server, "/v1/completions", {"model": server.engine.model_name, "prompt": [5, 6, 7],
                                         "max_tokens": 4, "temperature": 0, "logprobs": 0,
                                         "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["logprobs"]["tokens"]


def assert_still_serving(server) -> None:
    assert httpx.get(server.url + "/health").status_code == 200
    assert len(good_completion(server)) == 4
    assert server.engine.stats()["healthy_groups"] == 1


@pytest.mark.parametrize("extra", [
    {"seed": -1}, {"seed": 2**32}, {"seed": 2**32 - 1, "n": 2}, {"seed": 2**70},
    {"top_k": 2**31}, {"top_k": 2**70}, {"temperature": 1e30}, {"n": 3, "seed": -(2**63)},
])
def test_extreme_but_valid_values_are_served(server, extra):
    body = {"model": server.engine.model_name, "prompt": [5, 6, 7], "max_tokens": 3,
            "ignore_eos": True, **extra}
    r = post(server, "/v1/completions", body)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert len(choices) == extra.get("n", 1)
    assert all(c["finish_reason"] == "length" for c in choices)
    assert_still_serving(server)


def test_seeded_requests_reproduce_whatever_the_seed_size(server):
    def sample(seed):
        body = {"model": server.engine.model_name, "prompt": [5, 6, 7], "max_tokens": 6,
                "temperature": 1.0, "seed": seed, "logprobs": 0, "ignore_eos": True, "n": 2}
        r = post(server, "/v1/completions", body)
        return [c["logprobs"]["tokens"] for c in r.json()["choices"]]

    for seed in (-5, 2**32 - 1, 2**64 + 3):
        assert sample(seed) == sample(seed)
    assert sample(2**32 - 1) != sample(2**64 + 3)


@pytest.mark.parametrize("extra,field", [
    ({"stop_token_ids": [10**6], "min_tokens": 2}, "stop_token_ids"),
    ({"n": 10**6}, "n"),
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"logprobs": 10**9}, "logprobs"),
    ({"prompt": [10**6]}, "prompt"),
    ({"prompt": "a \ud800 b"}, "prompt"),
])
def test_invalid_values_are_a_400_naming_the_field(server, extra, field):
    body = {"model": server.engine.model_name, "prompt": [5, 6, 7], "max_tokens": 3, **extra}
    r = httpx.post(server.url + "/v1/completions", timeout=60,
                   content=_json(body), headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field
    assert_still_serving(server)


def _json(body) -> bytes:
    import json

    return json.dumps(body).encode("utf-8", "surrogatepass")  # lone surrogates as \\ud800


def chat(server, messages, **extra) -> httpx.Response:
    body = {"model": server.engine.model_name, "messages": messages, "max_tokens": 3,
            "temperature": 0, **extra}
    return httpx.post(server.url + "/v1/chat/completions", content=_json(body), timeout=60,
                      headers={"content-type": "application/json"})


def test_chat_content_parts_equal_plain_content(server):
    plain = chat(server, [{"role": "user", "content": "hi\nthere"}])
    parts = chat(server, [{"role": "user", "content": [{"type": "text", "text": "hi"},
                                                       {"type": "text", "text": "there"}]}])
    assert plain.status_code == parts.status_code == 200, parts.text
    assert plain.json()["choices"][0]["message"] == parts.json()["choices"][0]["message"]
    assert plain.json()["usage"] == parts.json()["usage"]


@pytest.mark.parametrize("messages,extra", [
    ([{"role": "user", "content": "a \ud800 b"}], {}),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], {}),
    ([{"role": "user", "content": "hi"}], {"chat_template_kwargs": {"messages": []}}),
    ([{"role": "user", "content": "hi"}], {"chat_template_kwargs": {"conversation": []}}),
])
def test_bad_chat_input_is_a_400(server, messages, extra):
    r = chat(server, messages, **extra)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "messages"
    assert_still_serving(server)


def test_template_kwargs_may_set_add_generation_prompt(server):
    r = chat(server, [{"role": "user", "content": "hi"}],
             chat_template_kwargs={"add_generation_prompt": False})
    with_prompt = chat(server, [{"role": "user", "content": "hi"}])
    assert r.status_code == with_prompt.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] < with_prompt.json()["usage"]["prompt_tokens"]


def test_a_request_failing_inside_fails_alone(server, monkeypatch):
    """The runner raises for any batch holding the poison prompt: that request gets an error,
    requests batched with it are recomputed and finish exactly as without it."""
    launch = ModelRunner.launch

    def poisoned(self, scheduled, after=None):
        if any(s.seq.prompt_ids[0] == POISON for s in scheduled):
            raise RuntimeError("injected failure")
        return launch(self, scheduled, after)

    monkeypatch.setattr(ModelRunner, "launch", poisoned)
    group = server.engine.llm.engine.groups[0]
    rollbacks = group.rollbacks
    expected = {p: _greedy(server, [p, 9, 10]) for p in (5, 6)}

    import concurrent.futures as cf
    prompts = [[5, 9, 10], [POISON, 9, 10], [6, 9, 10]]
    with cf.ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda p: _greedy_response(server, p), prompts))
    assert answers[1].status_code == 500
    assert "injected failure" in answers[1].json()["error"]["message"]
    assert [_tokens(answers[0]), _tokens(answers[2])] == [expected[5], expected[6]]
    assert group.rollbacks > rollbacks and group.healthy
    assert wait_for(lambda: server.engine.stats()["kv_usage"] == 0.0, seconds=10)
    assert_still_serving(server)


def _greedy_response(server, prompt) -> httpx.Response:
    return post(server, "/v1/completions", {"model": server.engine.model_name, "prompt": prompt,
                                            "max_tokens": 6, "temperature": 0, "logprobs": 0,
                                            "ignore_eos": True})


def _tokens(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["logprobs"]["tokens"]


def _greedy(server, prompt) -> list[str]:
    return _tokens(_greedy_response(server, prompt))


# -- fuzz: any body a client may send -----------------------------------------------------------
def _any_number():
    return st.one_of(st.integers(min_value=-(2**80), max_value=2**80),
                     st.floats(allow_nan=False, allow_infinity=False, width=64),
                     st.none())


def _token_ids():
    return st.lists(st.integers(min_value=-5, max_value=400), max_size=6)


FIELDS = {
    "n": st.one_of(st.integers(-3, 5), st.integers(-(2**70), 2**70)),
    "seed": _any_number(), "top_k": _any_number(), "top_p": _any_number(),
    "min_p": _any_number(), "temperature": _any_number(), "repetition_penalty": _any_number(),
    "presence_penalty": _any_number(), "frequency_penalty": _any_number(),
    "max_tokens": st.one_of(st.integers(-3, 8), st.integers(2**31, 2**64), st.none()),
    "min_tokens": st.one_of(st.integers(-3, 10), st.integers(2**31, 2**64)),
    "logprobs": st.one_of(st.integers(-3, 25), st.none(), st.booleans()),
    "stop_token_ids": st.one_of(_token_ids(), st.none()),
    "stop": st.one_of(st.text(max_size=4), st.lists(st.text(max_size=3), max_size=3), st.none()),
    "ignore_eos": st.booleans(), "echo": st.booleans(), "stream": st.booleans(),
    "prompt": st.one_of(st.text(max_size=12), _token_ids(), st.lists(_token_ids(), max_size=2),
                        st.lists(st.text(max_size=5), max_size=2)),
}


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=st.fixed_dictionaries({}, optional=FIELDS))
def test_fuzzed_completion_bodies_never_take_the_server_down(server, body):
    body = {"model": server.engine.model_name, "prompt": [5, 6], "max_tokens": 2, **body}
    body = {k: v for k, v in body.items() if not (isinstance(v, float) and math.isinf(v))}
    r = httpx.post(server.url + "/v1/completions", content=_json(body), timeout=120,
                   headers={"content-type": "application/json"})
    assert r.status_code < 500, (body, r.text)
    assert_still_serving(server)


@pytest.mark.parametrize("extra,field,code", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format", "invalid_value"),
    ({"response_format": {"type": "xml"}}, "response_format", "unsupported"),
    ({"response_format": {}}, "response_format", "invalid_value"),  # no type (was ignored)
    # tools default tool_choice to "auto", which needs --enable-auto-tool-choice (as in vLLM)
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
     "tool_choice", "unsupported"),
    ({"tools": [{"type": "function", "function": {"parameters": {}}}]}, "tools", "invalid_value"),
])
def test_bad_response_format_and_tools_are_refused_not_ignored(server, extra, field, code):
    r = chat(server, [{"role": "user", "content": "hi"}], **extra)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field and r.json()["error"]["code"] == code


def test_tool_call_histories_are_accepted(server):
    history = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "w", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    r = chat(server, history, response_format={"type": "text"},
             tools=[{"type": "function", "function": {"name": "w", "parameters": {}}}],
             tool_choice="none")
    assert r.status_code == 200, r.text
