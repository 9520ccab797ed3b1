"""vLLM's ``return_token_ids`` (the prompt's and each choice's token ids beside the text; in a
stream each chunk's new ids, the prompt's once) and ``return_tokens_as_token_ids`` (logprob
tokens named ``token_id:N``, per request or by ``--return-tokens-as-token-ids``), on the tiny
Llama with a byte tokenizer: ids checked against ``/tokenize``, the text and the usage."""

from __future__ import annotations

import httpx
import pytest

from tests.serving.fake_engine import serve, sse_events
from tests.serving.real_server import text_server_fixture

server = text_server_fixture()
GREEDY = {"max_tokens": 6, "temperature": 0, "ignore_eos": True, "skip_special_tokens": False}
CHAT = {"messages": [{"role": "user", "content": "hi there"}]}


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def tokenize(http, **body) -> list[int]:
    return http.post("/tokenize", json=body).json()["tokens"]


def detokenize(http, ids: list[int]) -> str:
    return http.post("/detokenize", json={"tokens": ids}).json()["prompt"]


def streamed(http, route: str, body: dict) -> list[dict]:
    with http.stream("POST", route, json=body | {"stream": True}) as reply:
        assert reply.status_code == 200
        return sse_events(reply)


def test_completions_answer_the_prompt_and_output_ids(http):
    prompts = ["abc", "hello"]
    body = http.post("/v1/completions", json=GREEDY | {
        "prompt": prompts, "n": 2, "temperature": 0.8, "seed": 3,
        "return_token_ids": True}).json()
    assert len(body["choices"]) == 4
    for choice in body["choices"]:
        prompt = prompts[choice["index"] // 2]
        assert choice["prompt_token_ids"] == tokenize(http, prompt=prompt)
        assert len(choice["token_ids"]) == 6 and detokenize(http, choice["token_ids"]) == \
            choice["text"]
    assert sum(len(c["token_ids"]) for c in body["choices"]) == \
        body["usage"]["completion_tokens"]
    plain = http.post("/v1/completions", json=GREEDY | {"prompt": "abc"}).json()
    assert "token_ids" not in plain["choices"][0] and "prompt_token_ids" not in plain["choices"][0]


def test_a_completion_stream_sends_each_chunk_s_new_ids_and_the_prompt_s_once(http):
    whole = http.post("/v1/completions", json=GREEDY | {
        "prompt": "abc", "return_token_ids": True}).json()["choices"][0]
    for echo in (False, True):
        chunks = streamed(http, "/v1/completions", GREEDY | {
            "prompt": "abc", "return_token_ids": True, "echo": echo})
        choices = [c["choices"][0] for c in chunks if c["choices"]]
        assert [c["prompt_token_ids"] for c in choices if "prompt_token_ids" in c] == \
            [whole["prompt_token_ids"]]
        assert "prompt_token_ids" in choices[0]
        assert [t for c in choices for t in c["token_ids"]] == whole["token_ids"]


def test_chat_answers_the_rendered_prompt_s_ids_whole_and_streamed(http):
    body = http.post("/v1/chat/completions", json=GREEDY | CHAT | {
        "return_token_ids": True}).json()
    assert body["prompt_token_ids"] == tokenize(http, **CHAT)
    [choice] = body["choices"]
    assert detokenize(http, choice["token_ids"]) == choice["message"]["content"]
    chunks = streamed(http, "/v1/chat/completions", GREEDY | CHAT | {"return_token_ids": True})
    assert chunks[0]["prompt_token_ids"] == body["prompt_token_ids"]
    assert not any("prompt_token_ids" in c for c in chunks[1:])
    ids = [t for c in chunks for ch in c["choices"] for t in ch.get("token_ids", [])]
    assert ids == choice["token_ids"]
    two = streamed(http, "/v1/chat/completions", GREEDY | CHAT | {
        "return_token_ids": True, "n": 2, "temperature": 0.9, "seed": 1})
    opening = [c for c in two if "prompt_token_ids" in c]  # each choice's first chunk, as vLLM
    assert [c["choices"][0]["index"] for c in opening] == [0, 1]
    assert all(c["prompt_token_ids"] == body["prompt_token_ids"] for c in opening)


def test_logprob_tokens_as_token_ids_per_request_and_by_the_server_flag(server, http):
    asked = GREEDY | {"prompt": "abc", "logprobs": 2, "return_token_ids": True}
    body = http.post("/v1/completions", json=asked | {"return_tokens_as_token_ids": True})
    choice = body.json()["choices"][0]
    assert choice["logprobs"]["tokens"] == [f"token_id:{t}" for t in choice["token_ids"]]
    assert all(k.startswith("token_id:") for top in choice["logprobs"]["top_logprobs"]
               for k in top)
    named = http.post("/v1/completions", json=asked).json()["choices"][0]["logprobs"]
    assert not any(t.startswith("token_id:") for t in named["tokens"])
    scored = http.post("/v1/completions", json=asked | {
        "return_tokens_as_token_ids": True, "prompt_logprobs": 1}).json()["choices"][0]
    first, *rest = scored["prompt_logprobs"]  # keyed by id: decoded_token stays the text
    assert first is None and all(not e["decoded_token"].startswith("token_id:")
                                 for entries in rest for e in entries.values())
    chat = GREEDY | CHAT | {"logprobs": True, "top_logprobs": 2, "return_token_ids": True}
    with serve(server.engine, return_tokens_as_token_ids=True) as flagged, \
            httpx.Client(base_url=flagged.url, timeout=60) as other:
        choice = other.post("/v1/chat/completions", json=chat).json()["choices"][0]
        content = choice["logprobs"]["content"]
        assert [c["token"] for c in content] == [f"token_id:{t}" for t in choice["token_ids"]]
        assert all(alt["token"].startswith("token_id:") for c in content
                   for alt in c["top_logprobs"])
        # as vLLM: a token's bytes spell its text, an alternative's its name
        assert bytes(b for c in content for b in c["bytes"]).decode() == detokenize(
            other, choice["token_ids"]) == choice["message"]["content"]
        assert all(bytes(alt["bytes"]).decode() == alt["token"] for c in content
                   for alt in c["top_logprobs"])
        reply = other.post("/v1/responses", json={"input": "hi", "max_output_tokens": 3,
                                                  "top_logprobs": 2,
                                                  "include": ["message.output_text.logprobs"]})
        logprobs = reply.json()["output"][0]["content"][0]["logprobs"]
        assert logprobs and all(e["token"].startswith("token_id:") for e in logprobs)
        overridden = other.post("/v1/chat/completions", json=chat | {
            "return_tokens_as_token_ids": False}).json()["choices"][0]["logprobs"]["content"]
        assert not any(c["token"].startswith("token_id:") for c in overridden)
