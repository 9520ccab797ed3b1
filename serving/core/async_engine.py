"""The engine for asyncio callers (the HTTP server): streaming generation, aborts, a queue limit.

Each DP group runs in its own thread; outputs travel from the group straight to the request's
asyncio queue (``loop.call_soon_threadsafe``), never through a central loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from collections.abc import AsyncIterator

from serving.core.request import Request
from xds_jax.engine_config import EngineConfig
from xds_jax.llm import LLM
from xds_jax.outputs import RequestOutput
from xds_jax.sampling.params import SamplingParams


class QueueFullError(RuntimeError):
    """Too many requests are waiting; the caller should retry later (HTTP 429)."""


class RequestFailedError(RuntimeError):
    """The engine failed this one request (it kept serving the others)."""


@dataclasses.dataclass(frozen=True)
class EngineArgs(EngineConfig):
    """How to build an ``AsyncEngine`` (the server's and CLI's options): the engine's
    configuration and the server's queue limit."""

    max_queue: int = 256


class AsyncEngine:
    """Streams ``RequestOutput``s (cumulative) for requests submitted from asyncio."""

    def __init__(self, llm: LLM, max_queue: int = 256):
        self.llm = llm
        self.engine = llm.engine
        self.max_queue = max_queue
        self.model_name = llm.model_name
        self.tokenizer = llm.tokenizer
        self.max_model_len = llm.max_model_len
        self.cfg = llm.cfg
        self._ids = itertools.count()
        self._active: set[str] = set()

    @classmethod
    def from_args(cls, args: EngineArgs) -> AsyncEngine:
        config = {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)}
        return cls(LLM(config=EngineConfig(**config)), args.max_queue)

    def start(self) -> None:
        self.engine.start()

    def shutdown(self) -> None:
        self.engine.shutdown()

    def stats(self) -> dict:
        return self.engine.stats()

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       request_id: str | None = None,
                       prompt: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield cumulative outputs until the request finishes or is aborted.

        Raises (before yielding) ``PromptTooLongError``/``InvalidPromptError`` for bad input and
        ``QueueFullError`` when ``max_queue`` requests are already in flight.
        """
        self.llm.check_prompt(prompt_ids, params)
        if len(self._active) >= self.max_queue:
            raise QueueFullError(
                f"{len(self._active)} requests are in flight (limit {self.max_queue}); retry later"
            )
        request_id = request_id or f"req-{next(self._ids)}"
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()
        request = Request(
            request_id, prompt, list(prompt_ids), params,
            self.llm.make_sequences(prompt_ids, params),
            on_output=lambda out: loop.call_soon_threadsafe(outputs.put_nowait, out),
        )
        self._active.add(request_id)
        try:
            self.engine.submit(request)
            while True:
                out = await outputs.get()
                if out.error is not None:
                    raise RequestFailedError(f"request {request_id} failed: {out.error}")
                yield out
                if out.finished:
                    return
        finally:
            self._active.discard(request_id)
            if not request.finished:
                self.engine.abort(request_id)
            else:
                self.engine.release(request_id)

    def abort(self, request_id: str) -> None:
        """Stop a request now and free its KV blocks; its stream ends with "abort"."""
        self.engine.abort(request_id)
