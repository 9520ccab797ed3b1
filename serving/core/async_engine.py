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
from xds_jax.llm import LLM
from xds_jax.outputs import RequestOutput
from xds_jax.sampling.params import SamplingParams


class QueueFullError(RuntimeError):
    """Too many requests are waiting; the caller should retry later (HTTP 429)."""


class RequestFailedError(RuntimeError):
    """The engine failed this one request (it kept serving the others)."""


@dataclasses.dataclass(frozen=True)
class EngineArgs:
    """How to build an ``AsyncEngine`` (the server's and CLI's options)."""

    model: str = "smollm2"
    dtype: str | None = None
    deployment: str | None = None
    max_model_len: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_queue: int = 256
    num_dp_groups: int = 1
    kv_cache_bytes: int = 1 << 30
    seed: int = 0
    micro_batches: int = 2
    trace: bool = False
    enable_eplb: bool = False
    eplb_config: str | None = None  # JSON (serving.disagg.eplb_config)
    dispatch_dtype: str | None = None  # "auto" / "int8": MA expert dispatch payload


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
        llm = LLM(args.model, dtype=args.dtype, max_model_len=args.max_model_len,
                  seed=args.seed, num_dp_groups=args.num_dp_groups,
                  max_num_seqs=args.max_num_seqs,
                  max_num_batched_tokens=args.max_num_batched_tokens,
                  kv_cache_bytes=args.kv_cache_bytes, deployment=args.deployment,
                  micro_batches=args.micro_batches, trace=args.trace,
                  enable_eplb=args.enable_eplb, eplb_config=args.eplb_config,
                  dispatch_dtype=args.dispatch_dtype)
        return cls(llm, args.max_queue)

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
