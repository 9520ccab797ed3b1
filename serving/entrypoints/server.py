"""OpenAI-compatible HTTP server over ``AsyncEngine`` (FastAPI + uvicorn), like ``vllm serve``.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``,
``GET /health``, ``GET /metrics`` (Prometheus text). Every error is an OpenAI error body
``{"error": {"message", "type", "param", "code"}}``; a bad request never disturbs the others.

Each request lives under a ``Watchdog``: when its client disconnects or its timeout passes, the
engine aborts it at once, which frees its KV blocks and ends its output stream.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.entrypoints import openai_protocol as api
from serving.entrypoints.metrics import ServerMetrics
from serving.entrypoints.server_requests import (
    ApiError,
    Prompt,
    chat_prompt,
    completion_prompts,
    engine_error,
    sampling_params,
)
from serving.entrypoints.tokenizer_routes import add_tokenizer_routes
from xds_jax.outputs import RequestOutput
from xds_jax.sampling.params import SamplingParams

log = logging.getLogger(__name__)

class Watchdog:
    """Aborts a request's engine streams when its client disconnects or its time is up."""

    def __init__(self, raw: Request, engine: Any, timeout_s: float | None):
        self.raw, self.engine, self.timeout_s = raw, engine, timeout_s
        self.request_ids: list[str] = []
        self.finished: set[str] = set()
        self.disconnected = self.timed_out = False
        self._task = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        try:
            async with asyncio.timeout(self.timeout_s):
                while (await self.raw.receive())["type"] != "http.disconnect":
                    pass
            self.disconnected = True
        except TimeoutError:
            self.timed_out = True
        log.info("aborting %s: %s", self.request_ids,
                 "client disconnected" if self.disconnected else "request timed out")
        self.abort()

    def abort(self) -> None:
        for request_id in self.request_ids:
            if request_id not in self.finished:
                self.finished.add(request_id)
                self.engine.abort(request_id)

    async def stop(self) -> None:
        """Stop watching and abort whatever is still running (the response was cut short)."""
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self.abort()


class Served:
    """What the routes share: the engine, its public names, the timeout and the metrics."""

    def __init__(self, engine: Any, names: list[str], timeout_s: float | None):
        self.engine, self.names, self.timeout_s = engine, names, timeout_s
        self.registry = CollectorRegistry()
        self.metrics = ServerMetrics(self.registry, engine, names[0])

    def check_model(self, model: str | None) -> str:
        if model is not None and model not in self.names:
            raise ApiError(404, f"The model `{model}` does not exist; this server serves "
                           f"{', '.join(self.names)}", "model", "model_not_found")
        return self.names[0]

    def fit(self, ids: list[int], max_tokens: int | None, where: str) -> int:
        """``max_tokens`` checked against the context (None: all the room that is left)."""
        limit = self.engine.max_model_len
        if max_tokens is not None and max_tokens < 1:
            raise ApiError(400, f"max_tokens must be at least 1, got {max_tokens}", "max_tokens",
                           "invalid_value")
        wanted = max_tokens if max_tokens is not None else max(limit - len(ids), 1)
        if len(ids) + wanted > limit or len(ids) >= limit:
            raise ApiError(
                400, f"This model's maximum context length is {limit} tokens. However, you "
                f"requested {len(ids) + wanted} tokens ({len(ids)} in the {where}, {wanted} in "
                "the completion). Please reduce the length of the prompt or completion.",
                where if len(ids) >= limit or max_tokens is None else "max_tokens",
                "context_length_exceeded")
        return wanted

    async def open(self, watch: Watchdog, jobs: list[tuple[Prompt, SamplingParams]],
                   request_id: str) -> list[AsyncIterator[RequestOutput]]:
        """Submit every prompt; on any engine error abort the others and raise it."""
        ids = [f"{request_id}-{i}" for i in range(len(jobs))]
        watch.request_ids.extend(ids)
        opened = await asyncio.gather(
            *(self._open_one(prompt, params, rid)
              for (prompt, params), rid in zip(jobs, ids, strict=True)),
            return_exceptions=True)
        errors = [e for e in opened if isinstance(e, BaseException)]
        if errors:
            watch.abort()
            raise engine_error(errors[0]) if isinstance(errors[0], Exception) else errors[0]
        return [self.metrics.track(first, gen, watch.finished) for first, gen in opened]

    async def _open_one(self, prompt: Prompt, params: SamplingParams, request_id: str):
        # The first output surfaces the engine's synchronous errors before any header is sent.
        gen = self.engine.generate(prompt[1], params, request_id, prompt=prompt[0])
        return await anext(gen), gen


async def merged(streams: list[AsyncIterator[RequestOutput]]):
    """Yield ``(stream index, output)`` from several streams as outputs arrive."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in stream:
                await queue.put((i, out, None))
            await queue.put((i, None, None))
        except Exception as error:
            await queue.put((i, None, error))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        for _ in range(len(tasks)):
            while (item := await queue.get())[1] is not None:
                yield item[:2]
            if item[2] is not None:
                raise item[2]
    finally:
        for task in tasks:
            task.cancel()


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def build_app(engine: Any, served_model_names: list[str] | None = None,
              request_timeout_s: float | None = None) -> FastAPI:
    """The FastAPI app serving ``engine``, which the caller starts and shuts down."""
    served = Served(engine, served_model_names or [engine.model_name], request_timeout_s)
    app = FastAPI(title="xds-jax OpenAI-compatible server")
    app.state.served = served

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, error: ApiError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        first = (error.errors() or [{}])[0]
        if first.get("type") == "json_invalid":
            detail = first.get("ctx", {}).get("error", first.get("msg"))
            return ApiError(400, f"malformed JSON body: {detail}", None, "invalid_json").response()
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        return ApiError(400, f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid value')}",
                        loc[0] if loc else None, "invalid_value").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, error: StarletteHTTPException) -> JSONResponse:
        return ApiError(error.status_code, str(error.detail)).response()

    @app.exception_handler(Exception)
    async def _crash(_: Request, error: Exception) -> JSONResponse:
        return engine_error(error).response()

    @app.get("/health")
    async def health() -> Response:
        if engine.stats().get("healthy_groups", 1) == 0:
            raise ApiError(503, "no engine group is healthy", None, "unhealthy")
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models() -> dict:
        vocab = getattr(getattr(engine, "cfg", None), "vocab_size", None)
        return api.ModelList(data=[
            api.ModelCard(id=name, root=engine.model_name, max_model_len=engine.max_model_len,
                          vocab_size=vocab) for name in served.names]).model_dump()

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(served.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions")
    async def completions(req: api.CompletionRequest, raw: Request):
        model = served.check_model(req.model)
        if req.suffix:
            raise ApiError(400, "suffix is not supported", "suffix", "unsupported")
        prompts = completion_prompts(req.prompt, engine.tokenizer)
        jobs = [(p, sampling_params(req, served.fit(p[1], req.max_tokens, "prompt"),
                                    req.logprobs)) for p in prompts]
        return await respond(served, raw, req, model, jobs, "completion")

    @app.post("/v1/chat/completions")
    async def chat(req: api.ChatCompletionRequest, raw: Request):
        model = served.check_model(req.model)
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs set to true", "top_logprobs")
        prompt = chat_prompt(req, engine.tokenizer)
        limit = req.max_tokens if req.max_completion_tokens is None else req.max_completion_tokens
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = sampling_params(req, served.fit(prompt[1], limit, "messages"), logprobs)
        return await respond(served, raw, req, model, [(prompt, params)], "chat")

    add_tokenizer_routes(app, served)
    return app


async def respond(served: Served, raw: Request, req: Any, model: str,
                  jobs: list[tuple[Prompt, SamplingParams]], kind: str):
    """Run the prompts; answer with one JSON body or, for ``stream``, an SSE stream."""
    watch = Watchdog(raw, served.engine, served.timeout_s)
    request_id = api.random_id("chatcmpl" if kind == "chat" else "cmpl")
    try:
        streams = await served.open(watch, jobs, request_id)
    except BaseException:
        await watch.stop()
        raise
    tok, lens = served.engine.tokenizer, [len(p[1]) for p, _ in jobs]
    echoes = [(p[0] or tok.decode(p[1])) if getattr(req, "echo", False) else "" for p, _ in jobs]
    finals: list[RequestOutput | None] = [None] * len(streams)
    if req.stream:
        events = stream_events(served, req, model, request_id, streams, finals, echoes, kind)
        return StreamingResponse(
            finish_stream(watch, events, req, lambda: api.usage(lens, finals), model, request_id),
            media_type="text/event-stream")
    try:
        async for i, out in merged(streams):
            finals[i] = out
    finally:
        await watch.stop()
    if watch.timed_out:
        raise ApiError(504, f"the request timed out after {watch.timeout_s} s", None, "timeout")
    if kind == "chat":
        return api.chat_response(request_id, model, req.top_logprobs or 0, finals[0], lens[0],
                                 tok).model_dump()
    return api.completion_response(request_id, model, req.n, echoes, finals, lens,
                                   tok).model_dump()


async def stream_events(served: Served, req: Any, model: str, request_id: str,
                        streams: list, finals: list, echoes: list[str],
                        kind: str) -> AsyncIterator[dict]:
    """The chunks of a stream in OpenAI's shapes (without ``usage``); one chunk per choice
    update. Chat opens each choice with a ``role`` delta; completions may echo the prompt."""
    tok, created, n = served.engine.tokenizer, api.now(), req.n
    cursors = [[api.ChoiceCursor() for _ in range(n)] for _ in streams]
    if kind == "chat":
        head = dict(id=request_id, created=created, model=model)
        for j in range(n):
            yield api.ChatCompletionStreamResponse(**head, choices=[api.ChatStreamChoice(
                index=j, delta=api.DeltaMessage(role="assistant", content=""))]).model_dump()
    else:
        head = dict(id=request_id, created=created, model=model)
        for i, echo in enumerate(echoes):
            for j in range(n if echo else 0):
                yield api.CompletionStreamResponse(**head, choices=[api.CompletionChoice(
                    index=i * n + j, text=echo)]).model_dump()
    async for i, out in merged(streams):
        finals[i] = out
        for c in out.outputs:
            cursor = cursors[i][c.index]
            offset = cursor.chars + len(echoes[i])
            text, start, finished = cursor.advance(c)
            if not (text or finished or len(c.token_ids) > start):
                continue
            reason = dict(finish_reason=c.finish_reason if finished else None,
                          stop_reason=c.stop_reason if finished else None)
            if kind == "chat":
                choice = api.ChatStreamChoice(
                    index=c.index, delta=api.DeltaMessage(content=text),
                    logprobs=api.chat_logprobs(c, start, req.top_logprobs or 0, tok), **reason)
                yield api.ChatCompletionStreamResponse(**head, choices=[choice]).model_dump()
            else:
                choice = api.CompletionChoice(
                    index=i * n + c.index, text=text,
                    logprobs=api.completion_logprobs(c, start, offset, tok), **reason)
                yield api.CompletionStreamResponse(**head, choices=[choice]).model_dump()


async def finish_stream(watch: Watchdog, events: AsyncIterator[dict], req: Any,
                        usage: Callable[[], api.UsageInfo], model: str,
                        request_id: str) -> AsyncIterator[str]:
    """SSE lines: the chunks, the usage chunk if asked for, an error event if the request
    failed after the 200 header, then ``[DONE]``. Cut-short requests are aborted."""
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    try:
        try:
            async for chunk in events:
                if include_usage:
                    chunk["usage"] = None
                else:
                    chunk.pop("usage", None)
                yield sse(chunk)
        except Exception as error:
            yield sse(engine_error(error).body())
        else:
            if watch.timed_out:
                yield sse(ApiError(504, f"the request timed out after {watch.timeout_s} s",
                                   None, "timeout").body())
            elif include_usage:
                last = {"id": request_id, "object": "chat.completion.chunk"
                        if request_id.startswith("chatcmpl") else "text_completion",
                        "created": api.now(), "model": model, "choices": [],
                        "usage": usage().model_dump()}
                yield sse(last)
        yield sse("[DONE]")
    finally:
        await watch.stop()


def run_server(args: Any, engine: Any = None) -> None:
    """Serve until interrupted. ``args``: the ``xds serve`` options (``host``, ``port``,
    ``served_model_name``, ``request_timeout``, ``log_level``, and the engine's when
    ``engine`` is None)."""
    import uvicorn

    if engine is None:
        from serving.entrypoints.launch import load_engine

        engine = load_engine(args)
    names = args.served_model_name or [engine.model_name]
    app = build_app(engine, names, args.request_timeout)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=5)
    log.info("serving %s at http://%s:%d/v1", names[0], args.host, args.port)
    try:
        uvicorn.Server(config).run()
    finally:
        engine.shutdown()
