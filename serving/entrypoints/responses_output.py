"""What ``/v1/responses`` answers: the response object, its output items, and the typed events
of a streamed one (OpenAI's Responses API shapes, as the ``openai`` SDK reads them).

A reply becomes output items: a ``message`` with one ``output_text`` part for its text, then
one ``function_call`` item per tool call. A streamed reply opens each item as its first delta
arrives (``response.output_item.added``, then ``response.content_part.added`` for text),
sends ``response.output_text.delta`` / ``response.function_call_arguments.delta`` events, and
closes it (``...done`` events) when the next item starts or the reply ends; the stream opens
with ``response.created`` and ``response.in_progress`` and ends with ``response.completed``
(its response's status ``incomplete`` where the output hit ``max_output_tokens``: vLLM and
SGLang end so, and the SDK's ``responses.stream`` helper reads only that event; OpenAI sends
``response.incomplete`` there) or ``response.failed``.
"""

from __future__ import annotations

import copy
import uuid
from typing import Any

from serving.entrypoints.openai_protocol import ChatLogprobs, ChatMessage, DeltaMessage, now


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def skeleton(req: Any, response_id: str, model: str, fmt: dict[str, Any]) -> dict[str, Any]:
    """The response object of ``req`` before any output: status ``in_progress``."""
    return {
        "id": response_id, "object": "response", "created_at": now(), "status": "in_progress",
        "background": False, "error": None, "incomplete_details": None,
        "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
        "max_tool_calls": None, "model": model, "output": [],
        "parallel_tool_calls": req.parallel_tool_calls,
        "previous_response_id": req.previous_response_id,
        "reasoning": {"effort": None, "summary": None}, "store": req.store,
        "temperature": 1.0 if req.temperature is None else req.temperature,
        "text": {"format": fmt},
        "tool_choice": req.tool_choice if req.tool_choice is not None else "auto",
        "tools": req.tools or [], "top_logprobs": req.top_logprobs or 0,
        "top_p": 1.0 if req.top_p is None else req.top_p, "truncation": req.truncation,
        "usage": None, "user": req.user, "metadata": req.metadata or {},
    }


def usage(prompt_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt_tokens + output_tokens}


def logprob_list(logprobs: ChatLogprobs | None) -> list[dict[str, Any]]:
    """Chat logprobs (token, logprob, bytes, top_logprobs) as an ``output_text``'s list."""
    return [entry.model_dump() for entry in (logprobs.content or [])] if logprobs else []


def text_part(text: str, logprobs: list[dict[str, Any]]) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs}


def message_item(item_id: str, status: str, parts: list[dict[str, Any]]) -> dict[str, Any]:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": parts}


def call_item(item_id: str, call_id: str, name: str, arguments: str,
              status: str) -> dict[str, Any]:
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}


def reasoning_item(item_id: str, status: str, text: str) -> dict[str, Any]:
    return {"type": "reasoning", "id": item_id, "summary": [], "status": status,
            "content": [{"type": "reasoning_text", "text": text}]}


def output_items(message: ChatMessage, logprobs: list[dict[str, Any]],
                 status: str) -> list[dict[str, Any]]:
    """A whole reply's items: its reasoning (with a reasoning parser), its text (when it has
    some, or has no calls), then its calls."""
    items = []
    if message.reasoning_content is not None:
        items.append(reasoning_item(new_id("rs"), "completed", message.reasoning_content))
    if message.content or not message.tool_calls:
        items.append(message_item(new_id("msg"), "completed",
                                  [text_part(message.content or "", logprobs)]))
    for call in message.tool_calls or []:
        items.append(call_item(new_id("fc"), call.id, call.function.name,
                               call.function.arguments, "completed"))
    items[-1]["status"] = status  # what max_output_tokens cut is the last item
    return items


def status_of(c: Any) -> str:
    """A reply's response status: ``incomplete`` where it hit ``max_output_tokens``."""
    return "incomplete" if c.finish_reason == "length" else "completed"


def finish(response: dict[str, Any], status: str, prompt_tokens: int,
           output_tokens: int) -> dict[str, Any]:
    """``response`` ended: its status (``incomplete`` when the output hit its limit), usage
    and end time."""
    response["status"] = status
    response["incomplete_details"] = ({"reason": "max_output_tokens"}
                                      if status == "incomplete" else None)
    response["usage"] = usage(prompt_tokens, output_tokens)
    response["completed_at"] = now() if status == "completed" else None
    return response


class ResponseEvents:
    """The events of one streamed response: ``start``, ``feed`` each chat delta of the reply
    (with the logprobs of its new tokens), then ``end`` or ``fail``."""

    def __init__(self, response: dict[str, Any]):
        self.response = response
        self.seq = 0
        self.created = False  # response.created sent
        self.item: dict[str, Any] | None = None  # the open output item
        self.pending: list[dict[str, Any]] = []  # logprobs of tokens not sent with a delta yet

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        self.seq += 1
        return {"type": kind, "sequence_number": self.seq - 1, **fields}

    def lifecycle(self, kind: str) -> dict[str, Any]:
        return self.event(kind, response=copy.deepcopy(self.response))

    def queue(self) -> list[dict[str, Any]]:
        """A background response's first events, sent at once: ``response.created`` and
        ``response.queued`` (status ``queued``); ``start`` then only moves it on."""
        self.created = True
        return [self.lifecycle("response.created"), self.lifecycle("response.queued")]

    def start(self) -> list[dict[str, Any]]:
        """``response.created`` (unless ``queue`` sent it) and ``response.in_progress``."""
        events = [] if self.created else [self.lifecycle("response.created")]
        self.created = True
        self.response["status"] = "in_progress"
        return [*events, self.lifecycle("response.in_progress")]

    def feed(self, delta: DeltaMessage, logprobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        self.pending += logprobs
        events = []
        if delta.reasoning_content:
            if self.item is None or self.item["type"] != "reasoning":
                events += self.close("completed")
                self.item = reasoning_item(new_id("rs"), "in_progress", "")
                events += self.opened()
            self.item["content"][0]["text"] += delta.reasoning_content
            events.append(self.event("response.reasoning_text.delta", **self.where(),
                                     content_index=0, delta=delta.reasoning_content))
        if delta.content:
            if self.item is None or self.item["type"] != "message":
                events += self.close("completed") + self.open_message()
            part = self.item["content"][0]
            part["text"] += delta.content
            sent, self.pending = self.pending, []
            part["logprobs"] += sent
            events.append(self.event("response.output_text.delta", **self.where(),
                                     content_index=0, delta=delta.content, logprobs=sent))
        for call in delta.tool_calls or []:
            function = call.function
            if call.id is not None:  # a new call opens
                events += self.close("completed")
                self.item = call_item(new_id("fc"), call.id, function.name, "", "in_progress")
                events += self.opened()
            if function is not None and function.arguments:
                self.item["arguments"] += function.arguments
                events.append(self.event("response.function_call_arguments.delta",
                                         **self.where(), delta=function.arguments))
        return events

    def where(self) -> dict[str, Any]:
        return {"item_id": self.item["id"], "output_index": len(self.response["output"])}

    def open_message(self) -> list[dict[str, Any]]:
        self.item = message_item(new_id("msg"), "in_progress", [])
        events = self.opened()
        part = text_part("", [])
        self.item["content"].append(part)
        return events + [self.event("response.content_part.added", **self.where(),
                                    content_index=0, part=copy.deepcopy(part))]

    def opened(self) -> list[dict[str, Any]]:
        return [self.event("response.output_item.added", output_index=len(self.response["output"]),
                           item=copy.deepcopy(self.item))]

    def close(self, status: str) -> list[dict[str, Any]]:
        """Close the open item (its ``done`` events) and add it to the response's output."""
        item, events = self.item, []
        if item is None:
            return events
        if item["type"] == "message":
            part = item["content"][0]
            part["logprobs"] += self.pending
            self.pending = []
            events += [self.event("response.output_text.done", **self.where(), content_index=0,
                                  text=part["text"], logprobs=part["logprobs"]),
                       self.event("response.content_part.done", **self.where(),
                                  content_index=0, part=copy.deepcopy(part))]
        elif item["type"] == "reasoning":
            status = "completed"  # the thought ended where the answer began
            events.append(self.event("response.reasoning_text.done", **self.where(),
                                     content_index=0, text=item["content"][0]["text"]))
        else:  # a call cut by max_output_tokens keeps "incomplete", as a message does
            events.append(self.event("response.function_call_arguments.done", **self.where(),
                                     name=item["name"], arguments=item["arguments"]))
        item["status"] = status
        events.append(self.event("response.output_item.done",
                                 output_index=len(self.response["output"]),
                                 item=copy.deepcopy(item)))
        self.response["output"].append(item)
        self.item = None
        return events

    def end(self, status: str, prompt_tokens: int, output_tokens: int) -> list[dict[str, Any]]:
        """The reply ended: close its last item (a reply of nothing, or of reasoning only,
        still answers an empty message, as a whole response does) and send the response's
        final event."""
        answered = any(i["type"] != "reasoning" for i in self.response["output"]) or (
            self.item is not None and self.item["type"] != "reasoning")
        events = [] if answered else self.close("completed") + self.open_message()
        events += self.close("incomplete" if status == "incomplete" else "completed")
        finish(self.response, status, prompt_tokens, output_tokens)
        return events + [self.lifecycle("response.completed")]

    def failed_by(self, error: Any) -> list[dict[str, Any]]:
        """``fail`` with an ``ApiError``'s code (without one: ``server_error`` for a 5xx,
        else ``invalid_request``) and message."""
        code = error.code or ("server_error" if error.status >= 500 else "invalid_request")
        return self.fail(code, error.message)

    def fail(self, code: str, message: str) -> list[dict[str, Any]]:
        """The response failed after its stream began (engine error, timeout)."""
        events = self.close("incomplete")
        self.response["status"] = "failed"
        self.response["error"] = {"code": code, "message": message}
        return events + [self.lifecycle("response.failed")]
