"""OpenAI's Responses API: ``POST /v1/responses``, ``GET`` / ``DELETE /v1/responses/{id}`` and
``GET /v1/responses/{id}/input_items``, as vLLM serves them for text models.

A request is read as the chat request it amounts to (``responses_input``) and runs through the
chat route's machinery: the chat template, tools and ``tool_choice`` (``auto`` needs the
server's tool-call parser, as in chat completions), structured output from ``text.format``,
admission, the watchdog that aborts a request whose client left or whose time ran out. The
answer is a response object, or with ``stream`` its typed events (``responses_output``).

With ``store`` (true by default, as OpenAI's) the finished response is kept in memory, the
last ``STORED_RESPONSES`` of them: it can be read back, deleted, and continued by a request
naming it as ``previous_response_id`` (its conversation, its input and output, comes before
the new input; its ``instructions`` do not carry over). ``truncation: "auto"`` drops the
oldest turns of a conversation that does not fit the context (the system message stays).
"""

from __future__ import annotations

import dataclasses
import json
from collections import OrderedDict
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
from serving.entrypoints.server_requests import (
    ApiError,
    chat_prompt,
    constraint_error,
    engine_error,
    sampling_params,
)
from serving.entrypoints.server_state import Served, Watchdog
from serving.entrypoints.tool_calls import ChoiceDeltas, ToolPlan, tool_plan
from xds_jax.outputs import RequestOutput

STORED_RESPONSES = 1024  # finished responses kept for retrieval and previous_response_id
ITEM_IDS = {"message": "msg", "function_call": "fc", "function_call_output": "fco",
            "reasoning": "rs"}


@dataclasses.dataclass
class Stored:
    response: dict[str, Any]
    conversation: list[dict[str, Any]]  # chat messages: earlier turns, the input, the output
    input_items: list[dict[str, Any]]


class ResponseStore:
    """The last ``limit`` stored responses by id, oldest dropped first."""

    def __init__(self, limit: int = STORED_RESPONSES):
        self.limit = limit
        self.items: OrderedDict[str, Stored] = OrderedDict()

    def put(self, stored: Stored) -> None:
        self.items[stored.response["id"]] = stored
        while len(self.items) > self.limit:
            self.items.popitem(last=False)

    def get(self, response_id: str, param: str = "response_id") -> Stored:
        stored = self.items.get(response_id)
        if stored is None:
            raise ApiError(404, f"Response with id '{response_id}' not found (responses are "
                           f"kept in this server's memory, the last {self.limit}, when created "
                           "with store true)", param, "response_not_found")
        return stored

    def delete(self, response_id: str) -> None:
        self.get(response_id)
        del self.items[response_id]


def input_items(value: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A request's ``input`` as items with ids, as ``input_items`` lists them."""
    if isinstance(value, str):
        value = [{"type": "message", "role": "user",
                  "content": [{"type": "input_text", "text": value}]}]
    items = []
    for item in value:
        kind = item.get("type", "message")
        items.append({"id": out.new_id(ITEM_IDS.get(kind, "item")), "type": kind, **item})
    return items


def named_for_responses(error: ApiError) -> ApiError:
    """An error about the chat request's ``response_format`` named after ``text``."""
    if error.param == "response_format":
        error.param = "text"
        error.message = error.message.replace("response_format", "text.format")
    return error


async def fitted_prompt(served: Served, req: ResponsesRequest, chat: api.ChatCompletionRequest):
    """The rendered prompt and its token budget; with ``truncation: "auto"`` the oldest turns
    after any leading system message go (a call's tool answers with it) until it fits."""
    while True:
        prompt = await served.off_loop(chat_prompt, chat, served.engine.tokenizer)
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
        history = (store.get(req.previous_response_id, "previous_response_id").conversation
                   if req.previous_response_id else [])
        turn = input_messages(req.input)
        leading = [{"role": "system", "content": req.instructions}] if req.instructions else []
        chat = chat_request(req, leading + history + turn, fmt)
        if engine.tokenizer is None:
            raise ApiError(400, "this model has no tokenizer or chat template", "input")
        tools = tool_plan(chat, served.tool_parser)
        served.precheck(1)
        prompt, budget = await fitted_prompt(served, req, chat)
        top = chat.top_logprobs if chat.logprobs else None
        try:
            params = sampling_params(chat, budget, top, None)
        except ApiError as error:
            raise named_for_responses(error) from None
        ticket = served.admit(1, len(prompt[1]))
        watch = Watchdog(raw, served, ticket)
        response = out.skeleton(req, out.new_id("resp"), model, fmt)
        try:
            streams = await served.open(watch, [(prompt, params)], response["id"])
        except ApiError as error:
            await watch.stop()
            raise named_for_responses(constraint_error(error, chat)) from None
        except BaseException:
            await watch.stop()
            raise
        run = Run(served, req, response, len(prompt[1]), tools, history + turn, store,
                  input_items(req.input))
        if req.stream:
            return StreamingResponse(run.stream(watch, streams[0]),
                                     media_type="text/event-stream")
        return await run.whole(watch, streams[0])

    @app.get("/v1/responses/{response_id}")
    async def retrieve(response_id: str) -> dict:
        return store.get(response_id).response

    @app.delete("/v1/responses/{response_id}")
    async def delete(response_id: str) -> dict:
        store.delete(response_id)
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
    """One admitted response request: answered whole or streamed, then stored."""

    served: Served
    req: ResponsesRequest
    response: dict[str, Any]
    prompt_tokens: int
    tools: ToolPlan
    conversation: list[dict[str, Any]]  # the chat messages before the reply, no instructions
    store: ResponseStore
    items: list[dict[str, Any]]

    def logprobs(self, c, start: int) -> list[dict[str, Any]]:
        if not wants_logprobs(self.req):
            return []
        return out.logprob_list(chat_logprobs(c, start, self.req.top_logprobs or 0,
                                              self.served.engine.tokenizer))

    def keep(self) -> None:
        if self.req.store:
            reply = input_messages(self.response["output"])
            self.store.put(Stored(self.response, self.conversation + reply, self.items))

    async def whole(self, watch: Watchdog, stream: AsyncIterator[RequestOutput]) -> dict:
        final = None
        try:
            async for output in stream:  # the last output is the whole reply
                final = output
        finally:
            await watch.stop()
        if watch.timed_out:
            raise watch.timeout_error()
        c = final.outputs[0]
        message, _ = self.tools.reply(c.text, c.finish_reason)
        status = out.status_of(c)
        self.response["output"] = out.output_items(message, self.logprobs(c, 0), status)
        out.finish(self.response, status, self.prompt_tokens, len(c.token_ids))
        self.keep()
        return self.response

    async def stream(self, watch: Watchdog,
                     stream: AsyncIterator[RequestOutput]) -> AsyncIterator[str]:
        events = out.ResponseEvents(self.response)
        shaper, cursor, c = ChoiceDeltas(self.tools), ChoiceCursor(), None
        try:
            for event in events.start():
                yield sse(event)
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
                            yield sse(event)
            except Exception as error:
                failure = engine_error(error)
                for event in events.fail(failure.code or "server_error", failure.message):
                    yield sse(event)
                return
            if watch.timed_out:
                for event in events.fail("timeout", watch.timeout_error().message):
                    yield sse(event)
                return
            status = "completed" if c is None else out.status_of(c)
            for event in events.end(status, self.prompt_tokens,
                                    0 if c is None else len(c.token_ids)):
                yield sse(event)
            self.keep()
        finally:
            await watch.stop()


def sse(event: dict[str, Any]) -> str:
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"

