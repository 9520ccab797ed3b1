"""Request and response bodies of the OpenAI API, as pydantic models (vLLM's field set).

Requests accept the OpenAI fields plus vLLM's sampling extras (``top_k``, ``min_p``,
``repetition_penalty``, ``min_tokens``, ``ignore_eos``, ``stop_token_ids``...). Unknown fields
are ignored, as the OpenAI service does. Responses are built from these models and dumped to
JSON; streamed chunks are the ``*StreamResponse`` models. The functions at the end turn engine
``RequestOutput``s into these shapes.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

from xds_jax.outputs import CompletionOutput, Logprob, RequestOutput


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


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
    include_usage: bool = False
    continuous_usage_stats: bool = False


class SamplingFields(OpenAIModel):
    """Fields shared by both endpoints; defaults are OpenAI's where it has them, else vLLM's."""

    model: str | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # Structured output; refused with a 400 naming the field until constrained decoding exists
    response_format: dict[str, Any] | None = None


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``: ``prompt`` is a string, a list of strings, a list of token
    ids, or a list of lists of token ids (one choice per prompt and sample)."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions``: ``messages`` rendered with the model's chat template."""

    messages: list[dict[str, Any]]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
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


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: random_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class CompletionStreamResponse(CompletionResponse):
    """One SSE chunk; ``usage`` is present (null) only when the client asked for usage."""


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
        CompletionChoice(index=i * n + c.index, text=echoes[i] + c.text,
                         logprobs=echoed_logprobs(out, c, echoes[i], tokenizer),
                         finish_reason=c.finish_reason, stop_reason=c.stop_reason)
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
                                  usage=usage([prompt_len], [final]))
