"""Answers of the generation routes: one JSON body, or an SSE stream of OpenAI chunks.

``respond`` admits the request (a ticket for its sequences and prompt tokens), opens its engine
streams under a ``Watchdog`` and answers; the watch aborts what is left and returns the ticket
however the response ends.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from serving.entrypoints import openai_outputs as outputs
from serving.entrypoints import openai_protocol as api
from serving.entrypoints.server_requests import (
    ApiError,
    Prompt,
    chat_echo,
    constraint_error,
    engine_error,
    reply_role,
)
from serving.entrypoints.server_state import Served, Watchdog
from serving.entrypoints.tool_calls import PLAIN, ChoiceDeltas, ToolPlan
from xds_jax.outputs import CompletionOutput, RequestOutput
from xds_jax.sampling.params import SamplingParams


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


async def respond(served: Served, raw: Request, req: Any, model: str,
                  jobs: list[tuple[Prompt, SamplingParams]], kind: str,
                  tools: ToolPlan = PLAIN):
    """Admit and run the prompts; answer with one JSON body or, for ``stream``, an SSE
    stream. ``tools``: how a chat reply is read (plain text, or tool calls)."""
    options = served.request_options(req)
    ticket = served.admit(len(jobs) * req.n, sum(len(prompt[1]) for prompt, _ in jobs))
    watch = Watchdog(raw, served, ticket)
    request_id = api.random_id("chatcmpl" if kind == "chat" else "cmpl")
    try:
        streams = await served.open(watch, jobs, request_id, options)
    except ApiError as error:  # named after the request's fields, not the engine's
        await watch.stop()
        raise constraint_error(error, req) from None
    except BaseException:
        await watch.stop()
        raise
    tok, lens = served.engine.tokenizer, [len(p[1]) for p, _ in jobs]
    if kind == "chat":
        echoes = [chat_echo(req, served.response_role)]
    else:
        echoes = [outputs.echo_text(p, tok) if req.echo else None for p, _ in jobs]
    finals: list[RequestOutput | None] = [None] * len(streams)
    names = served.token_names(req)  # how logprobs name tokens
    if req.stream:
        events = stream_events(req, model, request_id, streams, finals, echoes, kind, tools,
                               names, [p[1] for p, _ in jobs], served.response_role)
        return StreamingResponse(
            finish_stream(watch, events, req, lambda: outputs.usage(lens, finals), model,
                          request_id,
                          lambda i: outputs.choice_usage(lens, finals, i, req.n)),
            media_type="text/event-stream")
    try:
        async for i, out in merged(streams):
            finals[i] = out
    finally:
        await watch.stop()
    if watch.timed_out:
        raise watch.timeout_error()
    if kind == "chat":
        body = outputs.chat_response(request_id, model, req.top_logprobs or 0, finals[0],
                                     lens[0], names, tools.reply, echoes[0],
                                     reply_role(req, served.response_role)).model_dump()
    else:
        body = outputs.completion_response(request_id, model, req.n, echoes, finals, lens,
                                           names, req.logprobs).model_dump()
    return outputs.with_token_ids(body, finals, req.n, kind) if req.return_token_ids else body


async def stream_events(req: Any, model: str, request_id: str, streams: list, finals: list,
                        echoes: list[str | None], kind: str, tools: ToolPlan, names: Any,
                        prompts: list[list[int]], response_role: str = "assistant"
                        ) -> AsyncIterator[dict]:
    """The chunks of a stream in OpenAI's shapes (without ``usage``); one chunk per choice
    update (chat: one per delta ``tools`` makes of it). Chat opens each choice with a ``role``
    delta (``reply_role``), and leads with the echoed last message (``chat_echo``);
    completions may echo the prompt. Logprobs name tokens with ``names`` (a tokenizer, or
    ``outputs.TokenIds``); with ``return_token_ids`` (vLLM's) each choice's chunks carry its
    new ``token_ids`` and its first its ``prompt_token_ids`` (chat: on the chunk opening the
    choice)."""
    created, n, ids = api.now(), req.n, req.return_token_ids
    cursors = [[outputs.ChoiceCursor() for _ in range(n)] for _ in streams]
    offsets = [[0] * n for _ in streams]  # each choice's next text_offset
    shapers = [ChoiceDeltas(tools) for _ in range(n)]  # chat has one stream
    opened = [[False] * n for _ in streams]  # completions: prompt_token_ids sent
    if kind == "chat":
        head = dict(id=request_id, created=created, model=model)
        for j in range(n):
            chunk = api.ChatCompletionStreamResponse(**head, choices=[api.ChatStreamChoice(
                index=j, delta=api.DeltaMessage(role=reply_role(req, response_role),
                                                content=""))]).model_dump()
            if ids:  # on each choice's first chunk, as vLLM
                chunk["prompt_token_ids"] = list(prompts[0])
            yield chunk
            if echoes[0]:  # the echoed last message leads the reply
                yield api.ChatCompletionStreamResponse(**head, choices=[api.ChatStreamChoice(
                    index=j, delta=api.DeltaMessage(content=echoes[0]))]).model_dump()
    else:
        head = dict(id=request_id, created=created, model=model)
    async for i, out in merged(streams):
        if kind != "chat" and finals[i] is None and echoes[i] is not None:
            # the echo and its scored prompt, sent even when the echo is no text
            logprobs = outputs.prompt_logprobs(out, names, req.logprobs)
            offsets[i] = [outputs.next_offset(logprobs, len(echoes[i]))] * n
            for j in range(n):
                chunk = api.CompletionStreamResponse(**head, choices=[api.CompletionChoice(
                    index=i * n + j, text=echoes[i], logprobs=logprobs)]).model_dump()
                if ids:
                    chunk["choices"][0] |= {"prompt_token_ids": list(prompts[i]),
                                            "token_ids": []}
                    opened[i][j] = True
                yield chunk
        finals[i] = out
        for c in out.outputs:
            cursor = cursors[i][c.index]
            text, start, finished = cursor.advance(c)
            if not (text or finished or len(c.token_ids) > start):
                continue
            reason = dict(finish_reason=c.finish_reason if finished else None,
                          stop_reason=c.stop_reason if finished else None)
            new_ids = list(c.token_ids[start:])
            if kind == "chat":
                chunks = chat_chunks(shapers[c.index], c, text, start, finished, req, names)
                for k, choice in enumerate(chunks):
                    chunk = api.ChatCompletionStreamResponse(**head, choices=[choice]).model_dump()
                    if ids:
                        chunk["choices"][0]["token_ids"] = new_ids if k == 0 else []
                    yield chunk
            else:
                logprobs = outputs.completion_logprobs(c, start, offsets[i][c.index], names)
                offsets[i][c.index] = outputs.next_offset(logprobs, offsets[i][c.index])
                choice = api.CompletionChoice(index=i * n + c.index, text=text,
                                              logprobs=logprobs, **reason)
                chunk = api.CompletionStreamResponse(**head, choices=[choice]).model_dump()
                if ids:
                    chunk["choices"][0]["token_ids"] = new_ids
                    if not opened[i][c.index]:
                        chunk["choices"][0]["prompt_token_ids"] = list(prompts[i])
                        opened[i][c.index] = True
                yield chunk


def chat_chunks(shaper: ChoiceDeltas, c: CompletionOutput, text: str, start: int,
                finished: bool, req: Any, names: Any) -> list[api.ChatStreamChoice]:
    """A chat choice's update as stream choices: one per delta ``shaper`` makes of ``text``,
    the new tokens' logprobs on the first and the finish reason on the last. Held-back text
    sends nothing unless it carries logprobs, the end, or (``return_token_ids``) new
    tokens."""
    deltas = shaper.feed(text, finished)
    logprobs = outputs.chat_logprobs(c, start, req.top_logprobs or 0, names)
    new_ids = req.return_token_ids and len(c.token_ids) > start
    if not deltas and not (finished or (logprobs and logprobs.content) or new_ids):
        return []
    chunks = [api.ChatStreamChoice(index=c.index, delta=delta) for delta in deltas or
              [api.DeltaMessage()]]
    chunks[0].logprobs = logprobs
    if finished:
        chunks[-1].finish_reason = shaper.finish_reason(c.finish_reason)
        chunks[-1].stop_reason = c.stop_reason
    return chunks


async def finish_stream(watch: Watchdog, events: AsyncIterator[dict], req: Any,
                        usage: Callable[[], api.UsageInfo], model: str,
                        request_id: str,
                        choice_usage: Callable[[int], api.UsageInfo] | None = None
                        ) -> AsyncIterator[str]:
    """SSE lines: the chunks, the usage chunk if asked for, an error event if the request
    failed after the 200 header, then ``[DONE]``. Cut-short requests are aborted. With
    ``continuous_usage_stats`` (vLLM) every chunk carries the usage so far: its choice's
    (``choice_usage``; prompt and own tokens, as vLLM counts it), else the request's."""
    options = req.stream_options
    include_usage = bool(options and options.include_usage)
    continuous = include_usage and options.continuous_usage_stats
    created = api.now()  # every chunk, the usage chunk too, has the stream's timestamp
    try:
        try:
            async for chunk in events:
                created = chunk["created"]
                if include_usage and continuous:
                    choices = chunk.get("choices") or []
                    so_far = (choice_usage(choices[0]["index"]) if choice_usage and choices
                              else usage())
                    chunk["usage"] = so_far.model_dump()
                elif include_usage:
                    chunk["usage"] = None
                else:
                    chunk.pop("usage", None)
                yield sse(chunk)
        except Exception as error:
            yield sse(engine_error(error).body())
        else:
            if watch.timed_out:
                yield sse(watch.timeout_error().body())
            elif include_usage:
                last = {"id": request_id, "object": "chat.completion.chunk"
                        if request_id.startswith("chatcmpl") else "text_completion",
                        "created": created, "model": model, "choices": [],
                        "usage": usage().model_dump()}
                yield sse(last)
        yield sse("[DONE]")
    finally:
        await watch.stop()
