"""OpenAI's Responses API requests (``POST /v1/responses``) read as chat requests.

A Responses request names its conversation as ``input`` (a string, or a list of items:
messages whose content is a string or ``input_text`` / ``output_text`` parts, earlier
``function_call`` items and the ``function_call_output`` items that answer them), an optional
``instructions`` (a leading system message, not carried over to a follow-up) and optionally
``previous_response_id`` (a stored response whose conversation comes first). Its tools are
flat (``{"type": "function", "name", "parameters"}``), its output format is
``text.format`` and its token limit ``max_output_tokens``. ``chat_request`` turns all of it into
the ``ChatCompletionRequest`` the chat route would get, so the chat template, tool choice,
structured output and sampling fields work as they do there (vLLM's sampling extras too).
Anything this server cannot serve (images, files, built-in tools) is a 400
naming the field.
"""

from __future__ import annotations

from typing import Any

from serving.entrypoints import openai_protocol as api
from serving.entrypoints.api_error import ApiError
from xds_jax.sampling.params import MAX_LOGPROBS

ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
TEXT_PARTS = {"input_text": "text", "output_text": "text", "text": "text", "refusal": "refusal"}
LOGPROBS_INCLUDE = "message.output_text.logprobs"
# OpenAI's ``include`` values: the logprobs one adds them; the others name outputs of tools
# and inputs this server has none of, so they add nothing. Anything else is a 400, as OpenAI.
INCLUDABLE = {LOGPROBS_INCLUDE, "web_search_call.action.sources", "web_search_call.results",
              "code_interpreter_call.outputs", "computer_call_output.output.image_url",
              "file_search_call.results", "message.input_image.image_url",
              "reasoning.encrypted_content"}


class ResponsesRequest(api.SamplingFields):
    """``POST /v1/responses``: OpenAI's fields, and the chat route's vLLM sampling extras."""

    null_is_default = api.SamplingFields.null_is_default | {
        "store", "parallel_tool_calls", "truncation", "background"}
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    previous_response_id: str | None = None
    max_output_tokens: int | None = None
    top_logprobs: int | None = None
    include: list[str] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = True
    text: dict[str, Any] | None = None
    store: bool | None = True
    background: bool | None = False
    metadata: dict[str, Any] | None = None
    truncation: str | None = "disabled"
    chat_template_kwargs: dict[str, Any] | None = None


def refuse_unsupported(req: ResponsesRequest) -> None:
    """A 400 for what this server does not do with a Responses request."""
    if req.background and not req.store:
        raise ApiError(400, "a background response must be stored: background needs store "
                       "true (it is read back with GET /v1/responses/{id})", "store",
                       "invalid_value")
    if req.truncation not in ("disabled", "auto"):
        raise ApiError(400, f"truncation must be 'disabled' or 'auto', got {req.truncation!r}",
                       "truncation", "invalid_value")
    if req.n not in (None, 1):
        raise ApiError(400, "a response has one output; n must be 1", "n", "invalid_value")
    if not 0 <= (req.top_logprobs or 0) <= MAX_LOGPROBS:
        raise ApiError(400, f"top_logprobs must be in 0..{MAX_LOGPROBS}, got {req.top_logprobs}",
                       "top_logprobs", "invalid_value")
    unknown = sorted(set(req.include or []) - INCLUDABLE)
    if unknown:
        raise ApiError(400, f"include: unknown value(s) {', '.join(map(repr, unknown))}; "
                       f"supported: {', '.join(sorted(INCLUDABLE))}", "include",
                       "invalid_value")
    if req.max_output_tokens is not None and req.max_output_tokens < 1:
        raise ApiError(400, f"max_output_tokens must be at least 1, got "
                       f"{req.max_output_tokens}", "max_output_tokens", "invalid_value")


def text_of(content: Any, where: str) -> str:
    """A message's content (``where``: its path in the request) as text: a string, or its
    text parts joined (other parts: 400)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ApiError(400, f"{where} must be a string or a list of content parts, got "
                       f"{type(content).__name__}", "input", "invalid_value")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        key = TEXT_PARTS.get(kind)
        if key is None:
            raise ApiError(400, f"{where}[{j}]: part type {kind!r} is not supported; "
                           f"this server takes text parts ({', '.join(TEXT_PARTS)})", "input",
                           "unsupported")
        if not isinstance(part.get(key), str):
            raise ApiError(400, f"{where}[{j}].{key} must be a string", "input",
                           "invalid_value")
        texts.append(part[key])
    return "".join(texts)


def input_messages(items: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``input`` as chat messages: function calls join the assistant turn they follow, their
    outputs become ``tool`` messages, reasoning items are dropped."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    if not items:
        raise ApiError(400, "input must be a non-empty string or list of items", "input",
                       "invalid_value")
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise ApiError(400, f"{where} must be an object", "input", "invalid_value")
        kind = item.get("type", "message")
        if kind == "message":
            role = ROLES.get(item.get("role"))
            if role is None:
                raise ApiError(400, f"{where}.role must be one of {', '.join(ROLES)}, got "
                               f"{item.get('role')!r}", "input", "invalid_value")
            messages.append({"role": role, "content": text_of(item.get("content"),
                                                                     f"{where}.content")})
        elif kind == "function_call":
            call = function_call(item, where)
            last = messages[-1] if messages else None
            if last is None or last["role"] != "assistant":
                last = {"role": "assistant", "content": ""}
                messages.append(last)
            last.setdefault("tool_calls", []).append(call)
        elif kind == "function_call_output":
            call_id, output = item.get("call_id"), item.get("output")
            if not isinstance(call_id, str):
                raise ApiError(400, f"{where}.call_id must be a string", "input", "invalid_value")
            messages.append({"role": "tool", "tool_call_id": call_id,
                             "content": text_of(output, f"{where}.output")})
        elif kind != "reasoning":
            raise ApiError(400, f"{where}: item type {kind!r} is not supported; this server "
                           "takes message, function_call, function_call_output and reasoning "
                           "items", "input", "unsupported")
    return messages


def function_call(item: dict[str, Any], where: str) -> dict[str, Any]:
    """A ``function_call`` input item as a chat tool call."""
    for key in ("call_id", "name", "arguments"):
        if not isinstance(item.get(key), str):
            raise ApiError(400, f"{where}.{key} must be a string", "input", "invalid_value")
    return {"id": item["call_id"], "type": "function",
            "function": {"name": item["name"], "arguments": item["arguments"]}}


def chat_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Flat function tools in the chat completions' shape; other tool types are a 400."""
    if not tools:
        return None
    result = []
    for i, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            raise ApiError(400, f"tools[{i}].type must be 'function' (this server runs no "
                           f"built-in tools), got {kind!r}", "tools", "unsupported")
        function = {k: tool[k] for k in ("name", "description", "parameters") if k in tool}
        result.append({"type": "function", "function": function})
    return result


def chat_tool_choice(choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    """``tool_choice``: the same strings; ``{"type": "function", "name": f}`` as chat's."""
    if not isinstance(choice, dict):
        return choice
    if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
        raise ApiError(400, "tool_choice must be 'none', 'auto', 'required' or {\"type\": "
                       f"\"function\", \"name\": ...}}, got {choice!r:.80}", "tool_choice",
                       "invalid_value")
    return {"type": "function", "function": {"name": choice["name"]}}


def text_format(text: dict[str, Any] | None) -> dict[str, Any]:
    """``text.format`` (default ``{"type": "text"}``), checked."""
    fmt = (text or {}).get("format") or {"type": "text"}
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object",
                                                             "json_schema"):
        raise ApiError(400, "text.format.type must be 'text', 'json_object' or 'json_schema', "
                       f"got {fmt.get('type') if isinstance(fmt, dict) else fmt!r:.80}",
                       "text", "invalid_value")
    if fmt["type"] == "json_schema" and not isinstance(fmt.get("schema"), dict):
        raise ApiError(400, "text.format.schema is required with type 'json_schema': the JSON "
                       "schema the output must match", "text", "invalid_value")
    return fmt


def response_format(fmt: dict[str, Any]) -> dict[str, Any] | None:
    """``text.format`` as chat's ``response_format``."""
    if fmt["type"] == "text":
        return None
    if fmt["type"] == "json_object":
        return {"type": "json_object"}
    return {"type": "json_schema",
            "json_schema": {"name": fmt.get("name", "output"), "schema": fmt["schema"]}}


def wants_logprobs(req: ResponsesRequest) -> bool:
    return LOGPROBS_INCLUDE in (req.include or []) or bool(req.top_logprobs)


def chat_request(req: ResponsesRequest, messages: list[dict[str, Any]],
                 fmt: dict[str, Any]) -> api.ChatCompletionRequest:
    """The chat request ``req`` amounts to, over ``messages`` (the whole conversation), with
    ``fmt`` its checked ``text.format`` (``text_format``)."""
    shared = req.model_dump(include=set(api.SamplingFields.model_fields) - {
        "n", "stream", "stream_options", "response_format"}, exclude_none=True)
    if req.response_format is not None:
        raise ApiError(400, "the Responses API takes the output format as text.format, not "
                       "response_format", "response_format", "invalid_value")
    logprobs = wants_logprobs(req)
    return api.ChatCompletionRequest(
        **shared, messages=messages, tools=chat_tools(req.tools),
        tool_choice=chat_tool_choice(req.tool_choice),
        parallel_tool_calls=req.parallel_tool_calls,
        response_format=response_format(fmt),
        max_completion_tokens=req.max_output_tokens, logprobs=logprobs,
        top_logprobs=(req.top_logprobs or 0) if logprobs else None,
        chat_template_kwargs=req.chat_template_kwargs)
