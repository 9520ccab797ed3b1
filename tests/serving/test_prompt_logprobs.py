"""Prompt log-probabilities (``echo`` + ``logprobs``, vLLM's ``prompt_logprobs``) against an
independent computation: the log-softmax of ``xds_jax.model.reference`` logits of the same
prompt on the tiny golden Llama, in process and over HTTP."""

from __future__ import annotations

import asyncio

import httpx
import jax
import numpy as np
import pytest

from tests.serving.fake_engine import client, sse_events
from tests.serving.real_server import text_server_fixture
from xds_jax.model.reference import reference_logits
from xds_jax.sampling.params import SamplingParams

server = text_server_fixture()
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [40, 41, 3, 3, 90, 12, 200, 7, 1, 64, 30, 31]]


def reference_logprobs(engine, ids: list[int]) -> np.ndarray:
    """``[T - 1, V]``: log-softmax of the reference logits predicting tokens ``1..``."""
    logits = reference_logits(engine.llm.params, engine.cfg, np.asarray(ids, np.int32))
    return np.asarray(jax.nn.log_softmax(logits, axis=-1))[:-1]


def in_process(engine, ids: list[int], top_n: int, max_tokens: int = 0):
    async def run():
        params = SamplingParams(max_tokens=max_tokens, temperature=0, prompt_logprobs=top_n,
                                logprobs=top_n)
        return [out async for out in engine.generate(ids, params)][-1]

    return asyncio.run(run())


@pytest.mark.parametrize("ids", PROMPTS)
def test_prompt_logprobs_equal_the_reference(server, ids):
    out = in_process(server.engine, ids, top_n=3)
    want = reference_logprobs(server.engine, ids)
    assert out.outputs[0].token_ids == [] and out.outputs[0].finish_reason == "length"
    assert len(out.prompt_logprobs) == len(ids) and out.prompt_logprobs[0] is None
    for i, token in enumerate(ids[1:]):
        entries = out.prompt_logprobs[i + 1]
        np.testing.assert_allclose(entries[token].logprob, want[i, token], atol=2e-5)
        assert entries[token].rank == 1 + int(np.sum(want[i] > want[i, token]))
        top = {t for t, lp in entries.items() if lp.rank <= 3}
        assert top == set(np.argsort(-want[i])[:3].tolist())


def test_http_echo_equals_in_process(server):
    body = {"model": server.engine.model_name, "prompt": PROMPTS, "echo": True, "logprobs": 2,
            "max_tokens": 0, "temperature": 0}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    choices = sorted(r.json()["choices"], key=lambda c: c["index"])
    for choice, ids in zip(choices, PROMPTS, strict=True):
        lp = choice["logprobs"]
        out = in_process(server.engine, ids, top_n=2)
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        want = [None] + [e[t].logprob for e, t in zip(out.prompt_logprobs[1:], ids[1:],
                                                          strict=True)]
        assert lp["token_logprobs"] == want  # bit-equal: the same program on the same device
        assert len(lp["tokens"]) == len(ids) == len(lp["text_offset"])
        assert all(len(top) in (2, 3) for top in lp["top_logprobs"][1:])
        assert choice["text"] == server.engine.tokenizer.decode(ids, skip_special_tokens=False)
        assert choice["text"] == "".join(lp["tokens"])  # special tokens spelled in both


def test_echo_with_one_generated_token_appends_it(server):
    c = client(server)
    ids = PROMPTS[0]
    reply = c.completions.create(model=server.engine.model_name, prompt=ids, echo=True,
                                 logprobs=1, max_tokens=1, temperature=0,
                                 extra_body={"ignore_eos": True})
    lp = reply.choices[0].logprobs
    assert len(lp.token_logprobs) == len(ids) + 1 and lp.token_logprobs[0] is None
    want = reference_logprobs(server.engine, ids + [0])  # the last row scores the new token
    greedy = int(np.argmax(want[-1]))
    np.testing.assert_allclose(lp.token_logprobs[-1], want[-1, greedy], atol=1e-4)
    assert reply.usage.completion_tokens == 1 and reply.usage.prompt_tokens == len(ids)


def test_streamed_echo_carries_the_prompt_logprobs(server):
    body = {"model": server.engine.model_name, "prompt": PROMPTS[0], "echo": True,
            "logprobs": 1, "max_tokens": 2, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as r:
        events = sse_events(r)
    first = events[0]["choices"][0]["logprobs"]
    assert first["token_logprobs"][0] is None and len(first["tokens"]) == len(PROMPTS[0])
    generated = [t for e in events[1:] for t in e["choices"][0]["logprobs"]["tokens"]]
    assert len(generated) == 2 and events[-1]["choices"][0]["finish_reason"] == "length"


def test_max_tokens_zero_without_logprobs_echoes_text_only(server):
    body = {"model": server.engine.model_name, "prompt": "hi there", "echo": True,
            "max_tokens": 0}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()
    assert r["choices"][0]["text"] == "hi there" and r["choices"][0]["logprobs"] is None
    assert r["usage"]["completion_tokens"] == 0
    bad = httpx.post(server.url + "/v1/completions", timeout=60,
                     json={"prompt": "x", "max_tokens": -1})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"


def test_echo_trims_the_prompt_s_alternatives_to_logprobs(server):
    """``prompt_logprobs: 3`` scores three alternatives a prompt token; the echoed legacy
    ``logprobs`` still holds each token and ``logprobs`` (1) alternatives, as vLLM trims
    them (it held four), while vLLM's own ``prompt_logprobs`` field keeps all (not
    available when streaming, as in vLLM)."""
    ids = PROMPTS[1]
    body = {"model": server.engine.model_name, "prompt": ids, "echo": True, "logprobs": 1,
            "prompt_logprobs": 3, "max_tokens": 1, "temperature": 0}
    reply = httpx.post(server.url + "/v1/completions", json=body, timeout=120).json()
    echoed = reply["choices"][0]["logprobs"]
    assert all(len(entries) >= 3 for entries in reply["choices"][0]["prompt_logprobs"][1:])
    want = reference_logprobs(server.engine, ids)
    assert echoed["top_logprobs"][0] is None
    for i, top in enumerate(echoed["top_logprobs"][1:len(ids)]):
        assert 1 <= len(top) <= 2 and echoed["tokens"][i + 1] in top
        assert any(abs(lp - float(want[i].max())) < 1e-4 for lp in top.values())  # the likeliest
