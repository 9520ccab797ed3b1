"""Test doubles for the server tests: a fake engine with the ``AsyncEngine`` interface (fixed
tokens, adjustable speed and admission limits) and a real uvicorn server on a loopback port."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from types import SimpleNamespace

import httpx
import openai
import uvicorn

from serving.core.admission import Admission
from serving.entrypoints.server import build_app
from xds_jax.errors import PromptTooLongError
from xds_jax.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from xds_jax.text.tokenizer import TokenizerError, check_unicode

REPLY = "The answer is 42. Then it repeats. "


class ByteTokenizer:
    """Token id = byte + 3; 1 is BOS, 2 is EOS."""

    eos_token_ids = frozenset({2})
    chat_template = "<role>content"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        check_unicode(text, "text")
        return [1] * add_special_tokens + [b + 3 for b in text.encode()]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(i - 3 for i in ids if i >= 3).decode(errors="replace")

    def apply_chat_template(self, messages, add_generation_prompt=True, **kwargs) -> str:
        if any(not isinstance(m, dict) or "role" not in m for m in messages):
            raise TokenizerError("each message needs a 'role'")
        turns = "".join(f"<{m['role']}>{m.get('content')}\n" for m in messages)
        return turns + "<assistant>" * add_generation_prompt


class FakeEngine:
    """Writes ``REPLY`` (sample i starting i characters in) one byte-token per ``delay`` s."""

    def __init__(self, delay: float = 0.0, max_num_queued_reqs: int = 64,
                 max_model_len: int = 128, max_num_queued_tokens: int = 1 << 20):
        self.model_name, self.tokenizer = "fake", ByteTokenizer()
        self.cfg = SimpleNamespace(vocab_size=259)
        self.scheduling_policy = "fcfs"  # AsyncEngine's: a priority other than 0 is a 400
        self.sampling_defaults: dict = {}  # AsyncEngine's: the model's generation config
        self.delay, self.max_model_len = delay, max_model_len
        self.admission = Admission(max_num_queued_reqs, max_num_queued_tokens)
        self.active: set[str] = set()
        self.aborted: list[str] = []

    async def generate(self, prompt_ids, params, request_id, prompt=None, priority=0,
                       cache_salt=None):
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise PromptTooLongError("prompt too long")
        self.active.add(request_id)
        metrics = RequestMetrics(arrival_time=time.monotonic())
        samples = [CompletionOutput(i, "", [], logprobs=[] if params.logprobs is not None
                                    else None) for i in range(params.n)]
        try:
            for step in range(params.max_tokens):
                await asyncio.sleep(self.delay)
                if request_id in self.aborted:
                    for s in samples:
                        s.finish_reason = s.finish_reason or "abort"
                    yield self._out(request_id, prompt, prompt_ids, samples, metrics)
                    return
                for s in samples:
                    if s.finish_reason is None:
                        self._step(s, step, params)
                metrics.first_token_time = metrics.first_token_time or time.monotonic()
                metrics.last_token_time = time.monotonic()
                done = all(s.finish_reason for s in samples)
                if done:
                    metrics.finished_time = time.monotonic()
                yield self._out(request_id, prompt, prompt_ids, samples, metrics, done)
                if done:
                    return
        finally:
            self.active.discard(request_id)

    def _step(self, s: CompletionOutput, step: int, params) -> None:
        char = REPLY[(step + s.index) % len(REPLY)]
        token = ord(char) + 3
        s.token_ids.append(token)
        s.text += char
        if s.logprobs is not None:
            s.logprobs.append({token: Logprob(-0.5, 1, char), 3 + ord("?"): Logprob(-2.0, 2, "?")})
        hit = next((stop for stop in params.stop if stop in s.text), None)
        if hit:
            s.text = s.text[:s.text.index(hit)]
            s.finish_reason, s.stop_reason = "stop", hit
        elif step + 1 == params.max_tokens:
            s.finish_reason = "length"

    @staticmethod
    def _out(request_id, prompt, ids, samples, metrics, finished=True) -> RequestOutput:
        copies = [CompletionOutput(s.index, s.text, list(s.token_ids), None,
                                   list(s.logprobs) if s.logprobs is not None else None,
                                   s.finish_reason, s.stop_reason) for s in samples]
        return RequestOutput(request_id, prompt, list(ids), copies, finished, metrics)

    def expect(self, request_ids: list[str]) -> None:
        pass

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def start(self) -> None:
        self.started = True

    def shutdown(self) -> None:
        self.started = False

    def can_serve(self) -> bool:
        return True

    def stats(self) -> dict:
        return {"num_running": len(self.active), "num_waiting": 0, "kv_usage": 0.25,
                "prefix_hit_rate": 0.5, "num_preemptions": 0, "prompt_tokens_total": 10,
                "generation_tokens_total": 20, "collective_latency_s": {"all_to_all": 0.002},
                "expert_load": {0: [3, 1], 1: [2, 2]}}


class ServerThread:
    """uvicorn serving ``app`` on a free 127.0.0.1 port in a daemon thread."""

    def __init__(self, app):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                return self
            time.sleep(0.02)
        raise RuntimeError("server did not start")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def serve(engine, **kwargs) -> ServerThread:
    return ServerThread(build_app(engine, **kwargs))



def client(server: ServerThread, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, **kwargs)


def sse_events(response: httpx.Response) -> list:
    lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines), lines
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


def wait_for(predicate, seconds: float = 5.0) -> bool:
    for _ in range(int(seconds / 0.02)):
        if predicate():
            return True
        time.sleep(0.02)
    return False
