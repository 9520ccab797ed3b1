"""OpenAI's Responses API: ``POST /v1/responses``, ``GET`` / ``DELETE /v1/responses/{id}`` and
``GET /v1/responses/{id}/input_items``, as vLLM serves them for text models.

A request is read as the chat request it amounts to (``responses_input``) and runs through the
chat route's machinery: the chat template, tools and ``tool_choice`` (``auto`` needs the
server's tool-call parser, as in chat completions), structured output from ``text.format``,
admission, the watchdog that aborts a request whose client left or whose time ran out. The
answer is a response object, or with ``stream`` its typed events (``responses_output``).

With ``store`` (true by default, as OpenAI's) the response is kept in memory
(``responses_store``): it can be read back while it runs and after, deleted, and once finished
continued by a request naming it as ``previous_response_id`` (its conversation, its input and
output, comes before the new input; its ``instructions`` do not carry over). With
``background`` it runs detached from the request: the answer is the ``queued`` response (or,
with ``stream``, its events, which a client may leave and resume with ``GET
/v1/responses/{id}?stream=true&starting_after=N``), read back until it ends, and ``POST
/v1/responses/{id}/cancel`` stops it. ``truncation: "auto"`` drops the oldest turns of a
conversation that does not fit the context (the system message stays).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from serving.entrypoints import openai_protocol as api
from serving.entrypoints import responses_output as out
from serving.entrypoints.openai_outputs import ChoiceCursor, chat_logprobs
from serving.entrypoints.responses_input import (
    ResponsesRequest,
    chat_request,
    input_messages,
    refuse_unsupported,
    text_format,
    wants_logprobs,
)
from serving.entrypoints.responses_store import EventLog, ResponseStore, Stored
from serving.entrypoints.server_requests import (
    ApiError,
    chat_prompt,
    constraint_error,
    engine_error,
    sampling_params,
)
from serving.entrypoints.server_state import Served, Watchdog
from serving.entrypoints.tool_calls import ChoiceDeltas, ToolPlan
from xds_jax.outputs import RequestOutput

ABORTED = "the server aborted the request before it finished (it is shutting down)"
ITEM_IDS = {"message": "msg", "function_call": "fc", "function_call_output": "fco",
            "reasoning": "rs"}


def input_items(value: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A request's ``input`` as items with ids, as ``input_items`` lists them: a message's
    text content as a list of parts (``input_text``, an assistant's ``output_text``) with a
    ``status``, as OpenAI lists it and its SDK's item types read it."""
    if isinstance(value, str):
        value = [{"type": "message", "role": "user", "content": value}]
    items = []
    for item in value:
        kind = item.get("type", "message")
        item = {"id": out.new_id(ITEM_IDS.get(kind, "item")), "type": kind, **item}
        if kind == "message":
            item.setdefault("status", "completed")
            if isinstance(item.get("content"), str):
                item["content"] = [
                    {"type": "output_text", "text": item["content"], "annotations": []}
                    if item.get("role") == "assistant"
                    else {"type": "input_text", "text": item["content"]}]
        items.append(item)
    return items


def named_for_responses(error: ApiError) -> ApiError:
    """An error about the chat request's ``response_format`` named after ``text`` (its
    ``json_schema.schema`` is the format's ``schema``)."""
    if error.param == "response_format":
        error.param = "text"
        error.message = error.message.replace("response_format.json_schema.schema",
                                              "text.format.schema")
        error.message = error.message.replace("response_format", "text.format")
    return error


async def fitted_prompt(served: Served, req: ResponsesRequest, chat: api.ChatCompletionRequest):
    """The rendered prompt and its token budget; with ``truncation: "auto"`` the oldest turns
    after any leading system message go (a call's tool answers with it) until it fits."""
    while True:
        prompt = await served.off_loop(chat_prompt, chat, served.engine.tokenizer,
                                       served.trust_request_chat_template)
        try:
            return prompt, served.fit(prompt[1], req.max_output_tokens, "input",
                                      field="max_output_tokens")
        except ApiError as error:
            messages = chat.messages
            first = 1 if messages and messages[0]["role"] == "system" else 0
            if (req.truncation != "auto" or error.code != "context_length_exceeded"
                    or len(messages) - first < 2):
                raise
            end = first + 1
            while end < len(messages) - 1 and messages[end]["role"] == "tool":
                end += 1
            chat.messages = messages[:first] + messages[end:]


def add_responses_routes(app: FastAPI, served: Served) -> None:
    store = ResponseStore()
    engine = served.engine

    @app.post("/v1/responses")
    async def create(req: ResponsesRequest, raw: Request):
        model = served.check_model(req.model)
        refuse_unsupported(req)
        fmt = text_format(req.text)
        history = store.conversation(req.previous_response_id) if req.previous_response_id else []
        req.input = store.resolve(req.input)
        turn = input_messages(req.input)
        leading = [{"role": "system", "content": req.instructions}] if req.instructions else []
        if not (leading or history or turn):
            raise ApiError(400, "input holds no message or function call output (reasoning "
                           "items alone are dropped)", "input", "invalid_value")
        chat = chat_request(req, leading + history + turn, fmt)
        if engine.tokenizer is None:
            raise ApiError(400, "this model has no tokenizer or chat template", "input")
        tools = served.reply_plan(chat)
        served.precheck(1)
        prompt, budget = await fitted_prompt(served, req, chat)
        top = chat.top_logprobs if chat.logprobs else None
        try:
            params = sampling_params(chat, budget, top, None, served.sampling_defaults)
        except ApiError as error:
            raise named_for_responses(error) from None
        options = served.request_options(req)
        ticket = served.admit(1, len(prompt[1]))
        # a background request runs on when its client leaves: only its time is watched
        watch = Watchdog(None if req.background else raw, served, ticket)
        response = out.skeleton(req, out.new_id("resp"), model, fmt)
        run = Run(served, req, response, len(prompt[1]), tools, history + turn, store,
                  Stored(response, input_items(req.input), watch=watch), watch, chat)
        if req.background:  # answered now; the engine takes it in the background
            return run.detach([(prompt, params)])
        try:
            streams = await served.open(watch, [(prompt, params)], response["id"], options)
        except ApiError as error:
            await watch.stop()
            raise named_for_responses(constraint_error(error, chat)) from None
        except BaseException:
            await watch.stop()
            raise
        if req.store:
            store.put(run.stored)  # readable while it runs
        if req.stream:
            return StreamingResponse(run.stream(streams[0]), media_type="text/event-stream")
        return await run.whole(streams[0])

    @app.get("/v1/responses/{response_id}")
    async def retrieve(response_id: str, stream: bool = False, starting_after: int = -1):
        stored = store.get(response_id)
        if not stream:
            return stored.response
        if stored.log is None:
            raise ApiError(400, "only a background response can be streamed again: this one "
                           "was created without background", "stream", "invalid_value")
        return StreamingResponse(sse_stream(stored.log.follow(starting_after)),
                                 media_type="text/event-stream")

    @app.post("/v1/responses/{response_id}/cancel")
    async def cancel(response_id: str) -> dict:
        stored = store.get(response_id)
        if stored.log is None:
            raise ApiError(400, "only a background response can be cancelled: this one was "
                           "created without background", "response_id", "invalid_value")
        await stored.cancel()
        return stored.response

    @app.delete("/v1/responses/{response_id}")
    async def delete(response_id: str) -> dict:
        await store.delete(response_id)
        return {"id": response_id, "object": "response.deleted", "deleted": True}

    @app.get("/v1/responses/{response_id}/input_items")
    async def list_input_items(response_id: str, limit: int = 20, order: str = "desc",
                               after: str | None = None) -> dict:
        items = store.get(response_id).input_items
        if order not in ("asc", "desc"):
            raise ApiError(400, f"order must be 'asc' or 'desc', got {order!r}", "order")
        if not 1 <= limit <= 100:
            raise ApiError(400, f"limit must be in 1..100, got {limit}", "limit")
        items = items if order == "asc" else items[::-1]
        if after is not None:
            ids = [item["id"] for item in items]
            if after not in ids:
                raise ApiError(400, f"after: no input item {after!r} in this response", "after")
            items = items[ids.index(after) + 1:]
        page = items[:limit]
        return {"object": "list", "data": page, "has_more": len(items) > limit,
                "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None}


@dataclasses.dataclass
class Run:
    """One admitted response request: answered whole, streamed or run in the background; kept
    in the store (with ``store``) from its start, its conversation once it finished."""

    served: Served
    req: ResponsesRequest
    response: dict[str, Any]
    prompt_tokens: int
    tools: ToolPlan
    conversation: list[dict[str, Any]]  # the chat messages before the reply, no instructions
    store: ResponseStore
    stored: Stored
    watch: Watchdog
    chat: api.ChatCompletionRequest  # what the request amounts to (its errors' names)
    shaping: out.ResponseEvents | None = None  # a streamed or background run's events
    ended: bool = False  # the stream's last event was sent

    def logprobs(self, c, start: int) -> list[dict[str, Any]]:
        if not wants_logprobs(self.req):
            return []
        return out.logprob_list(chat_logprobs(c, start, self.req.top_logprobs or 0,
                                              self.served.token_names(self.req)))

    def keep(self) -> None:
        """The reply finished: a follow-up may continue its conversation."""
        if self.req.store and not self.watch.disconnected:
            reply = input_messages(self.response["output"])
            self.stored.conversation = self.conversation + reply

    async def end(self, keep_failed: bool = False) -> None:
        """Stop watching. A foreground response that did not finish is forgotten where its
        client left, or (``keep_failed`` False) never saw it; a streamed one that failed stays
        readable, ``failed``; a background one always stays (``failed``, ``cancelled``). The
        request itself is let go (``Stored.left`` keeps whether its client left: a stream closed
        before its last event counts). The store is settled before the first await: a closed
        stream's cleanup is cancelled at it."""
        stored = self.stored
        if stored.log is None:
            left = self.watch.disconnected or (keep_failed and not self.ended)
            stored.left, stored.watch = left, None
            if stored.conversation is None and (left or not keep_failed):
                self.store.discard(self.response["id"])
        await self.watch.stop()

    async def whole(self, stream: AsyncIterator[RequestOutput]) -> dict:
        try:
            final = None
            async for output in stream:  # the last output is the whole reply
                final = output
            if self.watch.timed_out:
                raise self.watch.timeout_error()
            c = final.outputs[0]
            if c.finish_reason == "abort":
                raise ApiError(503, ABORTED, None, "aborted")
            message, _ = self.tools.reply(c.text, c.finish_reason)
            status = out.status_of(c)
            self.response["output"] = out.output_items(message, self.logprobs(c, 0), status)
            out.finish(self.response, status, self.prompt_tokens, len(c.token_ids))
            self.keep()
            return self.response
        finally:
            await self.end()

    async def stream(self, stream: AsyncIterator[RequestOutput]) -> AsyncIterator[str]:
        async with contextlib.aclosing(self.events(stream)) as events:
            async for event in events:
                yield sse(event)

    def detach(self, jobs: list):
        """Run in the background, submitted to the engine there: the events go to the stored
        response's log. The answer is the queued response, or with ``stream`` the log
        followed from its start."""
        self.response["status"], self.response["background"] = "queued", True
        self.stored.log = EventLog()
        self.shaping = out.ResponseEvents(self.response)
        for event in self.shaping.queue():  # followers see it made and queued at once
            self.stored.log.add(event)
        self.store.put(self.stored)
        self.store.start(self.stored, self.background(jobs))
        if self.req.stream:
            return StreamingResponse(sse_stream(self.stored.log.follow()),
                                     media_type="text/event-stream")
        return copy.deepcopy(self.response)

    async def background(self, jobs: list) -> None:
        """A background run: open the engine stream (a refusal ends the response ``failed``),
        log its events; a cancel closes the open item; the log always closes."""
        log = self.stored.log
        try:
            try:
                streams = await self.served.open(self.watch, jobs, self.response["id"],
                                                 self.served.request_options(self.req))
            except Exception as error:
                failure = error if isinstance(error, ApiError) else engine_error(error)
                failure = named_for_responses(constraint_error(failure, self.chat))
                for event in self.shaping.start() + self.shaping.failed_by(failure):
                    log.add(event)
                return
            async with contextlib.aclosing(self.events(streams[0])) as events:
                async for event in events:
                    log.add(event)
        except asyncio.CancelledError:  # POST .../cancel: the open item ends as it stands
            for event in self.shaping.close("incomplete"):
                log.add(event)
            raise
        except Exception as error:  # a bug of ours: the response fails, its followers end
            for event in self.shaping.failed_by(engine_error(error)):
                log.add(event)
        finally:
            log.close()
            await self.watch.stop()

    async def events(self, stream: AsyncIterator[RequestOutput]) -> AsyncIterator[dict]:
        """The response's stream events as its reply comes (``responses_output``)."""
        events = self.shaping = self.shaping or out.ResponseEvents(self.response)
        shaper, cursor, c = ChoiceDeltas(self.tools), ChoiceCursor(), None
        try:
            for event in events.start():
                yield event
            try:
                async for final in stream:
                    c = final.outputs[0]
                    text, start, finished = cursor.advance(c)
                    deltas = shaper.feed(text, finished) if text or finished else []
                    logprobs = self.logprobs(c, start)
                    if not deltas:
                        events.pending += logprobs
                    for k, delta in enumerate(deltas):
                        for event in events.feed(delta, logprobs if k == 0 else []):
                            yield event
            except Exception as error:
                self.ended = True
                for event in events.failed_by(engine_error(error)):
                    yield event
                return
            self.ended = True
            if self.watch.timed_out or (c is not None and c.finish_reason == "abort"):
                failure = (("timeout", self.watch.timeout_error().message)
                           if self.watch.timed_out else ("aborted", ABORTED))
                for event in events.fail(*failure):
                    yield event
                return
            status = "completed" if c is None else out.status_of(c)
            for event in events.end(status, self.prompt_tokens,
                                    0 if c is None else len(c.token_ids)):
                yield event
            self.keep()
        finally:
            await self.end(keep_failed=True)


def sse(event: dict[str, Any]) -> str:
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"


async def sse_stream(events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    async for event in events:
        yield sse(event)
