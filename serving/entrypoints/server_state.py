"""What the server's routes share (``Served``) and the watch over each request (``Watchdog``).

``Served`` holds the engine, the served names, the metrics, the admission limits (each request
takes a ``Ticket`` for its sequences and prompt tokens, given back when it ends), the drain state
of a graceful shutdown, and the thread pool that tokenizes and renders chat templates, so the
event loop keeps streaming while a long prompt is encoded.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import Request
from prometheus_client import CollectorRegistry

from serving.core.admission import OverloadedError, RequestTooLargeError, Ticket
from serving.entrypoints.metrics import ServerMetrics
from serving.entrypoints.openai_outputs import TokenIds
from serving.entrypoints.server_requests import ApiError, Prompt, engine_error, reasoning_for
from serving.entrypoints.tool_calls import ToolPlan, tool_plan
from serving.entrypoints.tool_parsers import ToolParser
from xds_jax.engine_config import check_priority
from xds_jax.errors import SamplingParamsError
from xds_jax.outputs import RequestOutput
from xds_jax.sampling.beam_search import BeamSearchParams
from xds_jax.sampling.params import MAX_LOGPROBS, SamplingParams
from xds_jax.sequence import salt_bytes

log = logging.getLogger(__name__)

TOKENIZER_THREADS = 4  # tokenization and template rendering run here, off the event loop


class Watchdog:
    """Aborts a request's engine streams when its client disconnects or its time is up, and
    gives its admission ticket back when it ends (``abort`` runs at the end of every path).
    ``raw`` None: a request that runs on without its client (a background response)."""

    def __init__(self, raw: Request | None, served: Served, ticket: Ticket | None = None):
        self.raw, self.served, self.engine = raw, served, served.engine
        self.timeout_s, self.ticket = served.timeout_s, ticket
        self.request_ids: list[str] = []
        self.finished: set[str] = set()
        self.disconnected = self.timed_out = False
        served.watches.add(self)
        self._task = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        try:
            async with asyncio.timeout(self.timeout_s):
                if self.raw is None:  # a background request: no client to lose, only time
                    await asyncio.get_running_loop().create_future()
                while (await self.raw.receive())["type"] != "http.disconnect":
                    pass
            self.disconnected = True
        except TimeoutError:
            self.timed_out = True
        log.info("aborting %s: %s", self.request_ids,
                 "client disconnected" if self.disconnected else "request timed out")
        self.abort()

    def timeout_error(self) -> ApiError:
        """The 504 a request whose time ran out answers (or sends as its stream's last event),
        telling the ``openai`` SDK not to retry it (it retries a 5xx twice by default, each
        try running until the same timeout)."""
        return ApiError(504, f"the request timed out after {self.timeout_s} s", None, "timeout",
                        headers={"x-should-retry": "false"})

    def finish(self, request_id: str) -> None:
        """``request_id`` finished in the engine; once all have, the ticket goes back (before
        the last chunk is sent, so a client that saw the end finds its room free)."""
        self.finished.add(request_id)
        if self.ticket is not None and self.finished.issuperset(self.request_ids):
            self.ticket.release()

    def abort(self) -> None:
        """Abort what still runs and give the admission ticket back."""
        for request_id in self.request_ids:
            if request_id not in self.finished:
                self.finished.add(request_id)
                self.engine.abort(request_id)
        if self.ticket is not None:
            self.ticket.release()
        self.served.watches.discard(self)

    async def stop(self) -> None:
        """Stop watching and abort whatever is still running (the response was cut short)."""
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self.abort()


class Served:
    """What the routes share: the engine, its public names, the timeout, the metrics, the
    admission limits (``engine.admission``), the drain state, the tokenizer threads and the
    tool-call parser of ``tool_choice`` "auto" (None: "auto" is refused) and the reasoning
    parser of chat replies (``reasoning``; None: none)."""

    def __init__(self, engine: Any, names: list[str], timeout_s: float | None,
                 tool_parser: ToolParser | None = None, reasoning_parser: Any = None,
                 tokens_as_ids: bool = False, trust_request_chat_template: bool = False):
        self.engine, self.names, self.timeout_s = engine, names, timeout_s
        # --trust-request-chat-template: a template a request sends is applied (else a 400)
        self.trust_request_chat_template = trust_request_chat_template
        self.tool_parser, self.reasoning_parser = tool_parser, reasoning_parser
        self.tokens_as_ids = tokens_as_ids  # --return-tokens-as-token-ids
        self.response_role = "assistant"  # --response-role: the role of chat replies
        self.max_logprobs = MAX_LOGPROBS  # --max-logprobs: most a request may ask
        self.log_requests = False  # --enable-log-requests
        self.admission = engine.admission
        # the model's sampling defaults (generation_config.json), for fields a request leaves
        self.sampling_defaults: dict = engine.sampling_defaults
        self.registry = CollectorRegistry()
        self.metrics = ServerMetrics(self.registry, engine, names[0])
        self.watches: set[Watchdog] = set()
        self.drain_deadline: float | None = None
        self.pool = ThreadPoolExecutor(TOKENIZER_THREADS, thread_name_prefix="xds-tokenize")

    # -- tokenizer threads ------------------------------------------------------------------
    async def off_loop(self, fn: Callable, *args: Any) -> Any:
        """``fn(*args)`` on a tokenizer thread (tokenizing, chat templates), awaited."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, functools.partial(fn, *args))

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    # -- admission and drain ----------------------------------------------------------------
    @property
    def draining(self) -> bool:
        return self.drain_deadline is not None

    def start_drain(self, timeout_s: float) -> None:
        """Refuse new requests (503) from now on; those in flight may run ``timeout_s``."""
        if not self.draining:
            log.info("draining %d requests in flight (up to %.0f s); new ones get 503",
                     self.admission.requests, timeout_s)
            self.drain_deadline = time.monotonic() + timeout_s

    def abort_all(self) -> None:
        """Abort every request in flight (the drain ran out of time)."""
        for watch in list(self.watches):
            watch.abort()

    def _check_draining(self) -> None:
        if self.drain_deadline is not None:
            left = max(self.drain_deadline - time.monotonic(), 0.0)
            raise OverloadedError("shutting_down", "the server is shutting down and takes no "
                                  "new requests; retry on another replica or later",
                                  retry_after_s=max(math.ceil(left), 1))

    def precheck(self, slots: int) -> None:
        """Turn a request away before tokenizing it when it could not be admitted now."""
        try:
            self._check_draining()
            self.admission.check_room(slots)
        except (OverloadedError, RequestTooLargeError) as error:
            raise self._rejected(error) from None

    def admit(self, slots: int, tokens: int) -> Ticket:
        """A ticket for ``slots`` sequences and ``tokens`` prompt tokens, or an ``ApiError``:
        503 with ``Retry-After`` when overloaded (counted by reason), 400 when too large."""
        try:
            self._check_draining()
            return self.admission.admit(slots, tokens)
        except (OverloadedError, RequestTooLargeError) as error:
            raise self._rejected(error) from None

    def _rejected(self, error: OverloadedError | RequestTooLargeError) -> ApiError:
        if isinstance(error, OverloadedError):
            self.metrics.rejections.labels(self.names[0], error.reason).inc()
        return engine_error(error)

    # -- requests ---------------------------------------------------------------------------
    def reply_plan(self, req: Any) -> ToolPlan:
        """How a chat request's reply is read (``tool_calls.ToolPlan``): its tools and choice,
        the reasoning parser where it applies (``reasoning_for``), and special tokens kept in
        the text where the tool parser's markers are special."""
        plan = tool_plan(req, self.tool_parser).with_reasoning(
            reasoning_for(req, self.reasoning_parser), req.include_reasoning)
        plan.keep_special_tokens(req)
        return plan

    def check_model(self, model: str | None) -> str:
        """The served name a request asked for (the first when it named none), as vLLM
        answers with it."""
        if model is not None and model not in self.names:
            raise ApiError(404, f"The model `{model}` does not exist; this server serves "
                           f"{', '.join(self.names)}", "model", "model_not_found")
        return model or self.names[0]

    def fit(self, ids: list[int], max_tokens: int | None, where: str, least: int = 1,
            field: str = "max_tokens") -> int:
        """``max_tokens`` checked against the context (None: all the room that is left) and
        against ``least`` (0 for completions: score or echo the prompt only), then capped by
        the model's ``max_new_tokens`` (its generation config, as vLLM); ``field``: the
        request field that gave it, named in errors."""
        limit = self.engine.max_model_len
        if max_tokens is not None and max_tokens < least:
            raise ApiError(400, f"{field} must be at least {least}, got {max_tokens}",
                           field, "invalid_value")
        wanted = max_tokens if max_tokens is not None else max(limit - len(ids), 1)
        if len(ids) + wanted > limit or (len(ids) >= limit and wanted > 0):
            raise ApiError(
                400, f"This model's maximum context length is {limit} tokens. However, you "
                f"requested {len(ids) + wanted} tokens ({len(ids)} in the {where}, {wanted} in "
                "the completion). Please reduce the length of the prompt or completion.",
                where if len(ids) >= limit or max_tokens is None else field,
                "context_length_exceeded")
        cap = self.sampling_defaults.get("max_tokens")
        return wanted if cap is None else min(wanted, cap)

    def output_tokens(self, max_tokens: int | None) -> int | None:
        """The output a request asking for ``max_tokens`` must find room for in the context:
        its own number (``fit`` checks that one against the context, as vLLM does, before
        capping it), else the model's ``max_new_tokens``; None where neither is set."""
        return self.sampling_defaults.get("max_tokens") if max_tokens is None else max_tokens

    def token_names(self, req: Any) -> Any:
        """What names a response's logprob tokens: the tokenizer, or ``"token_id:N"``
        (``openai_outputs.TokenIds``) where the request's ``return_tokens_as_token_ids``,
        else the server's flag, says so."""
        as_ids = req.return_tokens_as_token_ids
        if as_ids is None:
            as_ids = self.tokens_as_ids
        tokenizer = self.engine.tokenizer
        return TokenIds(tokenizer) if as_ids else tokenizer

    def request_options(self, req: Any) -> dict[str, Any]:
        """The engine's per-request options a generation request names, checked before it is
        admitted (a 400 naming the field): ``priority``, refused where the engine does not
        schedule by priority, and ``cache_salt`` (a non-empty string, or absent)."""
        try:
            salt_bytes(req.cache_salt)
            return {"priority": check_priority(req.priority, self.engine.scheduling_policy),
                    "cache_salt": req.cache_salt}
        except SamplingParamsError as error:
            raise engine_error(error) from None

    async def open(self, watch: Watchdog, jobs: list[tuple[Prompt, SamplingParams]],
                   request_id: str, options: dict[str, Any] | None = None
                   ) -> list[AsyncIterator[RequestOutput]]:
        """Submit every prompt (with the request's ``request_options``); on any engine error
        abort the others and raise it."""
        self.check_logprobs([params for _, params in jobs])
        ids = [f"{request_id}-{i}" for i in range(len(jobs))]
        if self.log_requests:
            log.info("request %s: %d prompt(s) of %s tokens, %s", request_id, len(jobs),
                     [len(prompt[1]) for prompt, _ in jobs], jobs[0][1])
        self.engine.expect(ids)  # an abort before a generate submits its id still holds
        watch.request_ids.extend(ids)
        opened = await asyncio.gather(
            *(self._open_one(prompt, params, rid, options or {})
              for (prompt, params), rid in zip(jobs, ids, strict=True)),
            return_exceptions=True)
        errors = [e for e in opened if isinstance(e, BaseException)]
        if errors:
            watch.abort()
            raise engine_error(errors[0]) if isinstance(errors[0], Exception) else errors[0]
        return [self.metrics.track(first, gen, watch.finish) for first, gen in opened]

    def check_logprobs(self, each: list[SamplingParams]) -> None:
        """A 400 for a request asking more logprobs than ``--max-logprobs`` allows."""
        for params in each:
            for field in ("logprobs", "prompt_logprobs"):
                asked = getattr(params, field, None)
                if asked is not None and asked > self.max_logprobs:
                    raise ApiError(400, f"{field} {asked} is more than this server returns "
                                   f"({self.max_logprobs}; --max-logprobs)", field,
                                   "invalid_value")

    async def _open_one(self, prompt: Prompt, params: SamplingParams, request_id: str,
                        options: dict[str, Any]):
        # The first output surfaces the engine's synchronous errors before any header is sent.
        run = (self.engine.beam_search if isinstance(params, BeamSearchParams)
               else self.engine.generate)
        gen = run(prompt[1], params, request_id, prompt=prompt[0], **options)
        return await anext(gen), gen
