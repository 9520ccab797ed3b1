"""Request and response bodies of the OpenAI API, as pydantic models (vLLM's field set).

Requests accept the OpenAI fields plus vLLM's sampling extras (``top_k``, ``min_p``,
``repetition_penalty``, ``min_tokens``, ``ignore_eos``, ``stop_token_ids``...). Unknown fields
are ignored, as the OpenAI service does, and an explicit ``null`` means the field's default
(the OpenAI spec marks these nullable and vLLM declares them ``Optional``; clients that send
every field, unset ones as null, rely on it). Responses are built from these models and dumped to
JSON; streamed chunks are the ``*StreamResponse`` models. The functions at the end turn engine
``RequestOutput``s into these shapes.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

from xds_jax.outputs import CompletionOutput, Logprob, RequestOutput


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class OpenAIModel(BaseModel):
    """A request body: unknown fields ignored; ``null`` for a field of ``null_is_default``
    gives it its default (such fields are typed ``X | None`` for the schema, never None)."""

    model_config = ConfigDict(extra="ignore")
    null_is_default: ClassVar[frozenset[str]] = frozenset()

    @model_validator(mode="before")
    @classmethod
    def _nulls_to_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
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
        "include_stop_str_in_output", "skip_special_tokens"})
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
    include_stop_str_in_output: bool | None = False
    skip_special_tokens: bool | None = True
    truncate_prompt_tokens: int | None = None  # keep the prompt's last k tokens (-1: the context)
    prompt_logprobs: int | None = None  # each prompt token's logprob and top k (not streamed)
    # Structured outputs (at most one; ``server_requests.structured_outputs``): OpenAI's
    # response_format, vLLM's structured_outputs object and its older guided_* fields
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None


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
        "logprobs", "add_generation_prompt", "continue_final_message"}
    messages: list[dict[str, Any]]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    add_generation_prompt: bool | None = True
    # vLLM's: the reply continues the last message (an assistant prefill) instead of a new turn
    continue_final_message: bool | None = False
    chat_template_kwargs: dict[str, Any] | None = None
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


class ChatMessage(BaseModel):
    role: str = "assistant"
    content: str | None = None


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


class DeltaMessage(BaseModel):
    """Only the fields that changed: ``{"role", "content"}`` first, then ``{"content"}``."""

    role: str | None = None
    content: str | None = None

    @model_serializer
    def _without_nones(self) -> dict:
        return {k: v for k, v in (("role", self.role), ("content", self.content)) if v is not None}


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


# -- engine outputs to API shapes -------------------------------------------------------------
def usage(prompt_lens: list[int], finals: list[RequestOutput | None]) -> UsageInfo:
    """Prompt tokens count once per prompt; completion tokens once per sample."""
    done = sum(len(c.token_ids) for out in finals if out is not None for c in out.outputs)
    return UsageInfo(prompt_tokens=sum(prompt_lens), completion_tokens=done,
                     total_tokens=sum(prompt_lens) + done)


class ChoiceCursor:
    """How much of one choice's text and tokens were already streamed."""

    def __init__(self) -> None:
        self.chars = self.tokens = 0
        self.done = False

    def advance(self, c: CompletionOutput) -> tuple[str, int, bool]:
        """New text, index of the first new token, and whether ``c`` just finished."""
        text, start = c.text[self.chars:], self.tokens
        self.chars, self.tokens = len(c.text), len(c.token_ids)
        finished = c.finish_reason is not None and not self.done
        self.done = self.done or finished
        return text, start, finished


def token_text(tokenizer: Any, entry: Logprob | None, token_id: int) -> str:
    if entry is not None and entry.decoded_token is not None:
        return entry.decoded_token
    return tokenizer.decode([token_id]) if tokenizer is not None else f"token_id:{token_id}"


def completion_logprobs(c: CompletionOutput, start: int, offset: int,
                        tokenizer: Any) -> CompletionLogprobs | None:
    """The legacy ``logprobs`` object of tokens ``start:`` of ``c``, text offsets from
    ``offset`` characters."""
    if c.logprobs is None:
        return None
    result = CompletionLogprobs()
    for token_id, entries in zip(c.token_ids[start:], c.logprobs[start:], strict=False):
        text = token_text(tokenizer, entries.get(token_id), token_id)
        result.tokens.append(text)
        result.token_logprobs.append(entries[token_id].logprob if token_id in entries else None)
        result.top_logprobs.append({token_text(tokenizer, lp, t): lp.logprob
                                    for t, lp in entries.items()})
        result.text_offset.append(offset)
        offset += len(text)
    return result


def prompt_logprobs(out: RequestOutput, tokenizer: Any) -> CompletionLogprobs | None:
    """The legacy ``logprobs`` object of an echoed prompt (vLLM's shape: the first token's
    ``token_logprobs`` and ``top_logprobs`` are null), or None when it was not scored."""
    if out.prompt_logprobs is None:
        return None
    result, offset = CompletionLogprobs(), 0
    for token_id, entries in zip(out.prompt_token_ids, out.prompt_logprobs, strict=True):
        text = token_text(tokenizer, (entries or {}).get(token_id), token_id)
        result.tokens.append(text)
        result.token_logprobs.append(None if entries is None else entries[token_id].logprob)
        result.top_logprobs.append(None if entries is None else {
            token_text(tokenizer, lp, t): lp.logprob for t, lp in entries.items()})
        result.text_offset.append(offset)
        offset += len(text)
    return result


def vllm_prompt_logprobs(out: RequestOutput, tokenizer: Any) -> PromptLogprobs | None:
    """vLLM's ``prompt_logprobs`` of a response: per prompt token, ``{token id: logprob, rank,
    decoded_token}`` of the token and its top alternatives (None for the first token)."""
    if out.prompt_logprobs is None:
        return None
    return [None if entries is None else {
        t: PromptLogprob(logprob=max(lp.logprob, -9999.0), rank=lp.rank,
                         decoded_token=token_text(tokenizer, lp, t))
        for t, lp in entries.items()} for entries in out.prompt_logprobs]


def echoed_logprobs(out: RequestOutput, c: CompletionOutput, echo: str,
                    tokenizer: Any) -> CompletionLogprobs | None:
    """A choice's ``logprobs``: the scored prompt's (echo), then its generated tokens'."""
    generated = completion_logprobs(c, 0, len(echo), tokenizer)
    prompt = prompt_logprobs(out, tokenizer) if echo else None
    if prompt is None or generated is None:
        return generated
    for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        getattr(prompt, field).extend(getattr(generated, field))
    return prompt


def chat_logprobs(c: CompletionOutput, start: int, top: int,
                  tokenizer: Any) -> ChatLogprobs | None:
    """The chat ``logprobs`` object of tokens ``start:`` of ``c``, ``top`` alternatives each."""
    if c.logprobs is None:
        return None
    content = []
    for token_id, entries in zip(c.token_ids[start:], c.logprobs[start:], strict=False):
        text = token_text(tokenizer, entries.get(token_id), token_id)
        ranked = sorted((lp.rank, t) for t, lp in entries.items() if lp.rank)
        tops = []
        for _, t in ranked[:top]:
            alt = token_text(tokenizer, entries[t], t)
            tops.append(TopLogprob(token=alt, logprob=entries[t].logprob, bytes=list(alt.encode())))
        logprob = entries[token_id].logprob if token_id in entries else -9999.0
        content.append(ChatTokenLogprob(token=text, logprob=max(logprob, -9999.0),
                                        bytes=list(text.encode()), top_logprobs=tops))
    return ChatLogprobs(content=content)


def completion_response(request_id: str, model: str, n: int, echoes: list[str],
                        finals: list[RequestOutput], prompt_lens: list[int],
                        tokenizer: Any) -> CompletionResponse:
    """One choice per prompt and sample, indexed ``prompt * n + sample``."""
    choices = [
        CompletionResponseChoice(index=i * n + c.index, text=echoes[i] + c.text,
                                 logprobs=echoed_logprobs(out, c, echoes[i], tokenizer),
                                 finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                                 prompt_logprobs=vllm_prompt_logprobs(out, tokenizer))
        for i, out in enumerate(finals) for c in out.outputs
    ]
    return CompletionResponse(id=request_id, model=model, choices=choices,
                              usage=usage(prompt_lens, finals))


def chat_response(request_id: str, model: str, top: int, final: RequestOutput,
                  prompt_len: int, tokenizer: Any) -> ChatCompletionResponse:
    choices = [ChatChoice(index=c.index, message=ChatMessage(content=c.text),
                          logprobs=chat_logprobs(c, 0, top, tokenizer),
                          finish_reason=c.finish_reason, stop_reason=c.stop_reason)
               for c in final.outputs]
    return ChatCompletionResponse(id=request_id, model=model, choices=choices,
                                  usage=usage([prompt_len], [final]),
                                  prompt_logprobs=vllm_prompt_logprobs(final, tokenizer))
