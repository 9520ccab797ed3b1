"""The event loop never blocks: a huge prompt is tokenized (and its chat template rendered) on a
thread, so a concurrent stream keeps its pace while it is encoded (issue 17: one 10 MB prompt
froze every stream for 10 s)."""

from __future__ import annotations

import asyncio
import contextlib
import time

import httpx
import pytest

from tests.serving.fake_engine import FakeEngine, serve
from tests.serving.real_server import CHATML

HUGE_CHARS = 3 << 20


@pytest.fixture(scope="module")
def server():
    from tests.helpers import GOLDEN
    from xds_jax.model.config_hf import load_model_config
    from xds_jax.text.byte_tokenizer import byte_tokenizer

    engine = FakeEngine(delay=0.01, max_model_len=1000)
    engine.tokenizer = byte_tokenizer(load_model_config(GOLDEN / "llama"))  # the real Tokenizer
    engine.tokenizer.chat_template = CHATML
    with serve(engine) as running:
        yield running


async def largest_gap_during_huge_request(url: str, endpoint: str) -> tuple[float, float, int]:
    """Stream one request; while it streams, send a huge prompt. Returns the stream's largest
    gap between chunks while the huge request ran, how long that ran (s), and its status."""
    stamps: list[float] = []
    started = asyncio.Event()

    async def stream(client: httpx.AsyncClient) -> None:
        body = {"model": "fake", "prompt": "Hi", "max_tokens": 900, "stream": True}
        async with client.stream("POST", url + "/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    stamps.append(time.perf_counter())
                    if len(stamps) == 20:
                        started.set()

    async def huge(client: httpx.AsyncClient) -> tuple[float, float, int]:
        await started.wait()
        text = "lorem ipsum " * (HUGE_CHARS // 12)
        body = ({"model": "fake", "prompt": text, "max_tokens": 4} if endpoint == "completions"
                else {"model": "fake", "max_tokens": 4,
                      "messages": [{"role": "user", "content": text}]})
        begin = time.perf_counter()
        response = await client.post(f"{url}/v1/{endpoint}", json=body)
        return begin, time.perf_counter(), response.status_code

    async with httpx.AsyncClient(timeout=120) as client:
        streaming = asyncio.create_task(stream(client))
        begin, end, status = await huge(client)
        while not streaming.done() and (not stamps or stamps[-1] <= end):
            await asyncio.sleep(0.01)  # a chunk after the request closes its last gap
        streaming.cancel()  # the rest of the 900 tokens would only take the test's time
        with contextlib.suppress(asyncio.CancelledError):
            await streaming
    during = [b - a for a, b in zip(stamps, stamps[1:], strict=False) if b > begin and a < end]
    return max(during), end - begin, status


@pytest.mark.parametrize("endpoint", ["completions", "chat/completions"])
def test_huge_prompt_does_not_stall_streams(server, endpoint):
    gap, took, status = asyncio.run(largest_gap_during_huge_request(server.url, endpoint))
    assert status == 400  # tokenized in full, then too long for the context
    # Encoding on the loop would stall the stream for about as long as the request took;
    # off the loop, the stream keeps a pace of ~10 ms a chunk (bounds generous for CI).
    assert took > 0.3, f"the huge prompt took {took:.2f} s: too fast to tell"
    assert gap < max(0.25, took / 3), f"a stream stalled {gap:.2f} s during a {took:.2f} s request"
