"""Request and response bodies of the OpenAI API, as pydantic models (vLLM's field set).

Requests accept the OpenAI fields plus vLLM's sampling extras (``top_k``, ``min_p``,
``repetition_penalty``, ``min_tokens``, ``ignore_eos``, ``stop_token_ids``...). Unknown fields
are ignored, as the OpenAI service does, and an explicit ``null`` means the field's default
(the OpenAI spec marks these nullable and vLLM declares them ``Optional``; clients that send
every field, unset ones as null, rely on it). Responses are built from these models and dumped to
JSON; streamed chunks are the ``*StreamResponse`` models. ``openai_outputs`` turns engine
``RequestOutput``s into these shapes.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

from serving.entrypoints.request_checks import check_json_types, check_text


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class OpenAIModel(BaseModel):
    """A request body: unknown fields ignored; ``null`` for a field of ``null_is_default``
    gives it its default (such fields are typed ``X | None`` for the schema, never None);
    a lone surrogate in any string is an ``InvalidTextError``; a value of another JSON type
    than the field's (``true`` or ``"5"`` for a number) an ``InvalidFieldError``
    (``request_checks``)."""

    model_config = ConfigDict(extra="ignore")
    null_is_default: ClassVar[frozenset[str]] = frozenset()

    @model_validator(mode="before")
    @classmethod
    def _nulls_to_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        check_text(data)
        check_json_types(cls, data)
        return {k: v for k, v in data.items() if v is not None or k not in cls.null_is_default}


# -- errors -----------------------------------------------------------------------------------
class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


# -- requests ---------------------------------------------------------------------------------
class StreamOptions(OpenAIModel):
    null_is_default = frozenset({"include_usage", "continuous_usage_stats"})
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False  # usage so far in every chunk (vLLM)


class SamplingFields(OpenAIModel):
    """Fields shared by both endpoints; defaults are OpenAI's where it has them, else vLLM's."""

    null_is_default = frozenset({
        "n", "stream", "presence_penalty", "frequency_penalty", "min_tokens", "ignore_eos",
        "include_stop_str_in_output", "skip_special_tokens", "use_beam_search",
        "length_penalty", "priority", "return_token_ids"})
    model: str | None = None
    n: int | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = 0
    ignore_eos: bool | None = False
    stop_token_ids: list[int] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    include_stop_str_in_output: bool | None = False
    skip_special_tokens: bool | None = True
    truncate_prompt_tokens: int | None = None  # keep the prompt's last k tokens (-1: the context)
    prompt_logprobs: int | None = None  # each prompt token's logprob and top k (not streamed)
    use_beam_search: bool | None = False  # n beams (``server_requests.beam_search_params``)
    length_penalty: float | None = 1.0  # beam search: score = logprob sum / length ** this
    priority: int | None = 0  # --scheduling-policy priority: lower first
    cache_salt: str | None = None  # share cached KV only with requests of the same salt
    return_token_ids: bool | None = False  # token ids beside the text (server_responses)
    return_tokens_as_token_ids: bool | None = None  # logprob tokens as "token_id:N"
    # Structured outputs (at most one; ``server_requests.structured_outputs``): OpenAI's
    # response_format, vLLM's structured_outputs object and its older guided_* fields
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_whitespace_pattern: str | None = None  # structured_outputs.whitespace_pattern


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``: ``prompt`` is a string, a list of strings, a list of token
    ids, or a list of lists of token ids (one choice per prompt and sample). ``max_tokens``
    null: all the room the context leaves."""

    null_is_default = SamplingFields.null_is_default | {"echo"}
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    echo: bool | None = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions``: ``messages`` rendered with the model's chat template."""

    null_is_default = SamplingFields.null_is_default | {
        "logprobs", "add_generation_prompt", "continue_final_message", "echo",
        "include_reasoning"}
    messages: list[dict[str, Any]]
    # vLLM's: the reply starts with the last message's content when it has the reply's role
    echo: bool | None = False
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    add_generation_prompt: bool | None = True
    # vLLM's: the reply continues the last message (an assistant prefill) instead of a new turn
    continue_final_message: bool | None = False
    chat_template: str | None = None  # applied with --trust-request-chat-template, else a 400
    chat_template_kwargs: dict[str, Any] | None = None
    include_reasoning: bool | None = True  # vLLM: with a --reasoning-parser
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None


# -- responses --------------------------------------------------------------------------------
class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class PromptLogprob(BaseModel):
    """vLLM's ``Logprob``: one entry of ``prompt_logprobs``, keyed by token id."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


PromptLogprobs = list[dict[int, PromptLogprob] | None]  # per prompt token; the first: None


class CompletionResponseChoice(CompletionChoice):
    prompt_logprobs: PromptLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: random_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionResponseChoice]
    usage: UsageInfo | None = None


class CompletionStreamResponse(CompletionResponse):
    """One SSE chunk; ``usage`` is present (null) only when the client asked for usage."""

    choices: list[CompletionChoice]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as the model wrote it (or as parsed and dumped again)


class ToolCall(BaseModel):
    id: str = Field(default_factory=lambda: random_id("chatcmpl-tool"))
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    """A reply; ``tool_calls`` appears only when the reply made some, ``reasoning_content``
    only when a reasoning parser found reasoning."""

    role: str = "assistant"
    content: str | None = None
    reasoning_content: str | None = None  # with a --reasoning-parser (``reasoning``)
    tool_calls: list[ToolCall] | None = None

    @model_serializer(mode="wrap")
    def _tool_calls_if_any(self, handler) -> dict:
        data = handler(self)
        for key in ("tool_calls", "reasoning_content"):
            if getattr(self, key) is None:
                data.pop(key, None)
        return data


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: random_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    prompt_logprobs: PromptLogprobs | None = None


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    """A piece of the ``index``-th tool call: its first carries ``id``, ``type`` and the
    function's ``name``; clients concatenate the ``arguments`` of the pieces."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None


class DeltaMessage(BaseModel):
    """Only the fields that changed: ``{"role", "content"}`` first, then ``{"content"}`` or
    ``{"tool_calls"}`` (each piece without its unset fields)."""

    role: str | None = None
    content: str | None = None
    reasoning_content: str | None = None  # with a --reasoning-parser
    tool_calls: list[DeltaToolCall] | None = None

    @model_serializer
    def _without_nones(self) -> dict:
        data = {k: v for k, v in (("role", self.role), ("content", self.content),
                                  ("reasoning_content", self.reasoning_content))
                if v is not None}
        if self.tool_calls is not None:
            data["tool_calls"] = [t.model_dump(exclude_none=True) for t in self.tool_calls]
        return data


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionStreamResponse(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "xds-jax"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    vocab_size: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
