"""The server over the real engine: a tiny Llama with token-id prompts, and SmolLM2 chat."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.serving.fake_engine import client, serve, wait_for
from tests.serving.real_server import text_server_fixture

# -- the real engine (tiny random Llama, no tokenizer: token-id prompts) -------------------------
real = text_server_fixture()  # token-id prompts below; text prompts work too
# The same engine as a slow group: every step after the first blocks 0.2 s, so a request is
# still running when its client goes away, however fast the machine.
slow = text_server_fixture(faults=["group_stall:group=0:seconds=0.2:after_steps=1:times=1000000"])


def token_ids(choice) -> list[str]:
    return choice.logprobs.tokens


def test_real_engine_streaming_equals_non_streamed(real):
    c = client(real)
    kwargs = dict(model=real.engine.model_name, prompt=[5, 6, 7, 8, 9], max_tokens=12,
                  temperature=0, logprobs=0, extra_body={"ignore_eos": True})
    full = c.completions.create(**kwargs)
    assert full.usage.completion_tokens == 12 and full.choices[0].finish_reason == "length"
    chunks = list(c.completions.create(**kwargs, stream=True))
    streamed = [t for ch in chunks for t in ch.choices[0].logprobs.tokens]
    assert streamed == token_ids(full.choices[0]) and len(streamed) == 12
    assert chunks[-1].choices[0].finish_reason == "length"


def test_real_engine_concurrent_greedy_streams(real):
    async def one(c, prompt):
        stream = await c.completions.create(model=real.engine.model_name, prompt=prompt,
                                            max_tokens=8, temperature=0, logprobs=0,
                                            stream=True, extra_body={"ignore_eos": True})
        return [t async for ch in stream for t in ch.choices[0].logprobs.tokens]

    async def run():
        async with openai.AsyncOpenAI(base_url=real.url + "/v1", api_key="x",
                                      max_retries=0) as c:
            return await asyncio.gather(*(one(c, [3 + i % 2, 4, 5]) for i in range(4)))

    results = asyncio.run(run())
    assert results[0] == results[2] and results[1] == results[3]
    assert all(len(r) == 8 for r in results)


def test_real_engine_disconnect_frees_kv(slow, caplog):
    body = {"model": slow.engine.model_name, "prompt": [5, 6, 7], "max_tokens": 200,
            "ignore_eos": True, "stream": True}
    caplog.set_level("INFO", logger="serving")
    with httpx.stream("POST", slow.url + "/v1/completions", json=body) as response:
        # The line iterator is kept: dropped after next(), its generators (httpcore's body
        # stream among them, in a reference cycle) were closed whenever the cyclic GC ran, and
        # closing an unread body closes the connection: the server saw a real disconnect and
        # aborted the request (this test's flake, three times in CI: "client disconnected").
        lines = response.iter_lines()
        first = next(lines)
        chunk = json.loads(first.removeprefix("data: "))
        assert "error" not in chunk and chunk["choices"][0]["finish_reason"] is None, first
        # Running and holding KV while the stream is open (polled: the counters are read from
        # another thread than the group's loop). On failure: the stalls injected so far and the
        # server's log.
        faults = slow.engine.llm.engine.faults
        assert wait_for(lambda: slow.engine.stats()["num_running"] == 1
                        and slow.engine.stats()["kv_usage"] > 0.0, seconds=5), \
            (first, slow.engine.stats(), faults.fired[-3:], caplog.text[-2000:])
    assert wait_for(lambda: slow.engine.stats()["num_running"] == 0
                    and slow.engine.stats()["num_waiting"] == 0, seconds=20)
    assert wait_for(lambda: slow.engine.stats()["kv_usage"] == 0.0, seconds=5)
    assert slow.engine.stats()["admitted_seqs"] == 0
    families = {f.name for f in text_string_to_metric_families(
        httpx.get(slow.url + "/metrics").text)}
    assert {"xds:time_to_first_token_seconds", "xds:kv_cache_usage_perc"} <= families


@pytest.mark.slow
def test_smollm2_chat_streaming_equals_non_streamed():
    engines = pytest.importorskip("serving.core.async_engine")
    try:
        engine = engines.AsyncEngine.from_args(engines.EngineArgs(
            model="smollm2", max_num_seqs=4, kv_cache_bytes=32 << 20))
    except FileNotFoundError as error:
        pytest.skip(str(error))
    engine.start()
    try:
        with serve(engine) as server:
            c = client(server)
            kwargs = dict(model="smollm2", temperature=0, max_tokens=12,
                          messages=[{"role": "user", "content": "What is the capital of France?"}])
            full = c.chat.completions.create(**kwargs)
            chunks = list(c.chat.completions.create(**kwargs, stream=True))
    finally:
        engine.shutdown()
    assert "Paris" in full.choices[0].message.content
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == \
        full.choices[0].message.content
    assert 0 < full.usage.completion_tokens <= 12
