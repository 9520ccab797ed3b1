"""The requests of the chaos soak (``benchmarks/chaos.py``) and how each answer is judged.

Kinds, with their weights in the mix: plain and streamed completions, stop strings, ``n`` > 1,
client aborts (a deadline shorter than the request), disconnects (a stream closed after a few
chunks) and bad requests (each must be a 4xx with an OpenAI error body). Every request ends as
one ``Outcome``: completed, cancelled (by the client, on purpose), failed (an error answer) or
lost (anything else: the number that must stay 0).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import time

import httpx

KINDS = {"complete": 3, "stream": 3, "stop": 2, "n": 1, "abort": 2, "disconnect": 2, "bad": 2}
DEADLINE_S = 120.0  # a request still unanswered after this is lost
WORDS = "the a river stone light quick slow red blue seven over under and then".split()
BAD_BODIES = [
    b'{"prompt": "unterminated',
    {"prompt": "x", "max_tokens": -3},
    {"prompt": "x", "max_tokens": 100000},
    {"prompt": [5, 6, 99999]},
    {"prompt": "x", "temperature": -1},
    {"prompt": "x", "n": 1000},
    {"prompt": "x", "top_p": 7},
    b'{"prompt": "\\ud800 a lone surrogate"}',
    {"prompt": ""},
    {"prompt": "x", "model": "no-such-model"},
    {"prompt": "x", "logprobs": 99},
    {"prompt": "x", "stop_token_ids": [10**9]},
    {"prompt": "x", "logit_bias": {"99999": 1.0}},  # outside the vocabulary ({"5": 1.0} is valid)
]


@dataclasses.dataclass
class Outcome:
    kind: str
    result: str  # completed | cancelled | failed | lost
    detail: str = ""
    ended: float = 0.0
    unexpected: bool = False  # a bad request served, or a good one refused with a 4xx


def prompt(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))


def body_for(kind: str, rng: random.Random) -> dict | bytes:
    if kind == "bad":
        return rng.choice(BAD_BODIES)
    body: dict = {"prompt": prompt(rng), "max_tokens": rng.randint(1, 24),
                  "temperature": rng.choice([0.0, 0.8]), "ignore_eos": rng.random() < 0.5}
    if rng.random() < 0.3:
        body["seed"] = rng.randint(0, 2**40)
    if kind in ("stream", "disconnect"):
        body["stream"] = True
    if kind == "stop":
        body["stop"] = rng.sample(["a", "e", " ", "\n", "th"], rng.randint(1, 3))
        body["include_stop_str_in_output"] = rng.random() < 0.5
    if kind == "n":
        body["n"] = rng.randint(2, 4)
    if kind in ("abort", "disconnect"):
        body.update(max_tokens=rng.randint(60, 150), ignore_eos=True)
    return body


def error_detail(response: httpx.Response) -> str | None:
    """``HTTP <status> <code>`` for an OpenAI error body, None if the body is not one."""
    try:
        error = response.json()["error"]
        return f"HTTP {response.status_code} {error.get('code') or error.get('type')}"
    except (ValueError, KeyError, TypeError):
        return None


async def read_stream(response: httpx.Response, stop_after: int | None) -> Outcome:
    chunks, done = 0, False
    async for line in response.aiter_lines():
        if not line:
            continue
        if line == "data: [DONE]":
            done = True
            break
        event = json.loads(line.removeprefix("data: "))
        if "error" in event:
            return Outcome("", "failed", f"stream error {event['error'].get('code')}")
        chunks += 1
        if stop_after is not None and chunks >= stop_after:
            return Outcome("", "cancelled", "disconnected")
    if not done:
        return Outcome("", "lost", f"stream ended without [DONE] after {chunks} chunks")
    return Outcome("", "completed")


async def exchange(client: httpx.AsyncClient, kind: str, rng: random.Random) -> Outcome:
    body = body_for(kind, rng)
    kwargs = {"content": body, "headers": {"Content-Type": "application/json"}} \
        if isinstance(body, bytes) else {"json": body}
    if kind == "abort":
        try:
            async with asyncio.timeout(rng.uniform(0.05, 1.0)):
                response = await client.post("/v1/completions", **kwargs)
        except TimeoutError:
            return Outcome(kind, "cancelled", "aborted")
    elif isinstance(body, dict) and body.get("stream"):
        async with client.stream("POST", "/v1/completions", **kwargs) as response:
            if response.status_code == 200:
                stop_after = rng.randint(1, 5) if kind == "disconnect" else None
                return await read_stream(response, stop_after)
            await response.aread()
    else:
        response = await client.post("/v1/completions", **kwargs)
    if response.status_code == 200:
        choices = response.json().get("choices") or []
        if not choices or any(c.get("finish_reason") is None for c in choices):
            return Outcome(kind, "lost", f"200 without finished choices: {response.text[:120]}")
        return Outcome(kind, "completed")
    detail = error_detail(response)
    if detail is None:
        return Outcome(kind, "lost", f"HTTP {response.status_code} without an error body")
    return Outcome(kind, "failed", detail)


async def send(client: httpx.AsyncClient, kind: str, rng: random.Random) -> Outcome:
    """Send one request of ``kind`` and judge its answer."""
    try:
        async with asyncio.timeout(DEADLINE_S):
            outcome = await exchange(client, kind, rng)
    except TimeoutError:
        outcome = Outcome(kind, "lost", f"no answer within {DEADLINE_S:.0f} s")
    except (httpx.HTTPError, json.JSONDecodeError) as error:
        outcome = Outcome(kind, "lost", f"{type(error).__name__}: {error}")
    outcome.kind, outcome.ended = kind, time.monotonic()
    status = outcome.detail.split()[1] if outcome.detail.startswith("HTTP") else ""
    if kind == "bad":
        outcome.unexpected = outcome.result == "completed" or status.startswith("5")
    else:
        outcome.unexpected = status.startswith("4")
    return outcome
