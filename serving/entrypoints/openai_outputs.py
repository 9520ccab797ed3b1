"""Engine ``RequestOutput``s in the OpenAI API's shapes: usage, log-probabilities (chat and
legacy), vLLM's ``prompt_logprobs``, whole responses, and the cursor that streams a choice."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from serving.entrypoints.openai_protocol import (
    ChatChoice,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessage,
    ChatTokenLogprob,
    CompletionLogprobs,
    CompletionResponse,
    CompletionResponseChoice,
    PromptLogprob,
    PromptLogprobs,
    TopLogprob,
    UsageInfo,
)
from xds_jax.outputs import CompletionOutput, Logprob, RequestOutput


def usage(prompt_lens: list[int], finals: list[RequestOutput | None]) -> UsageInfo:
    """Prompt tokens count once per prompt; completion tokens once per sample."""
    done = sum(len(c.token_ids) for out in finals if out is not None for c in out.outputs)
    return UsageInfo(prompt_tokens=sum(prompt_lens), completion_tokens=done,
                     total_tokens=sum(prompt_lens) + done)


def choice_of(finals: list[RequestOutput | None], choice: int,
              n: int) -> tuple[int, CompletionOutput | None]:
    """Response choice ``i * n + j``: prompt ``i`` and its sample ``j`` so far (None before
    its first output; a chat response's choice ``j`` is its one prompt's sample ``j``)."""
    prompt, sample = divmod(choice, n)
    out = finals[prompt] if prompt < len(finals) else None
    return prompt, next((c for c in (out.outputs if out is not None else [])
                         if c.index == sample), None)


def choice_usage(prompt_lens: list[int], finals: list[RequestOutput | None], choice: int,
                 n: int) -> UsageInfo:
    """The usage so far of one streamed choice (``continuous_usage_stats``, as vLLM counts
    it): its prompt's tokens and its own completion tokens."""
    prompt, sample = choice_of(finals, choice, n)
    done = 0 if sample is None else len(sample.token_ids)
    size = prompt_lens[prompt] if prompt < len(prompt_lens) else 0
    return UsageInfo(prompt_tokens=size, completion_tokens=done, total_tokens=size + done)


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


class TokenIds:
    """In place of a tokenizer: logprob tokens named ``token_id:N`` (vLLM's
    ``return_tokens_as_token_ids``, for tokens whose text is no valid UTF-8 on its own);
    ``tokenizer`` still spells their text where a field holds the text (a chat token's
    ``bytes``, vLLM's ``prompt_logprobs`` ``decoded_token``)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer


def spelling(names: Any) -> Any:
    """The tokenizer behind ``names`` (a tokenizer, or ``TokenIds``)."""
    return names.tokenizer if isinstance(names, TokenIds) else names


def token_text(tokenizer: Any, entry: Logprob | None, token_id: int) -> str:
    if isinstance(tokenizer, TokenIds):
        return f"token_id:{token_id}"
    if entry is not None and entry.decoded_token is not None:
        return entry.decoded_token
    if tokenizer is None:
        return f"token_id:{token_id}"
    return tokenizer.decode([token_id], skip_special_tokens=False)  # vLLM spells specials


def echo_text(prompt: tuple[str | None, list[int]], tokenizer: Any) -> str:
    """What ``echo`` leads a completion with: the prompt's text, or its token ids decoded with
    their special tokens spelled, as vLLM decodes a token prompt for ``echo`` and as the echoed
    logprob tokens spell them ("" without a tokenizer)."""
    if prompt[0] is not None:
        return prompt[0]
    return "" if tokenizer is None else tokenizer.decode(prompt[1], skip_special_tokens=False)


def next_offset(logprobs: CompletionLogprobs | None, default: int) -> int:
    """The ``text_offset`` of the token after ``logprobs``' last: offsets count the token
    strings (as in vLLM), which need not spell the text (a token may hold part of a
    character); ``default`` when there are none."""
    if logprobs is None or not logprobs.tokens:
        return default
    return logprobs.text_offset[-1] + len(logprobs.tokens[-1])


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


def prompt_logprobs(out: RequestOutput, tokenizer: Any,
                    top: int | None = None) -> CompletionLogprobs | None:
    """The legacy ``logprobs`` object of an echoed prompt (vLLM's shape: the first token's
    ``token_logprobs`` and ``top_logprobs`` are null), or None when it was not scored. ``top``:
    the request's ``logprobs``: each token's own entry and that many likeliest alternatives,
    as vLLM trims them (``prompt_logprobs`` may have scored more); None: every entry."""
    if out.prompt_logprobs is None:
        return None
    result, offset = CompletionLogprobs(), 0
    for token_id, entries in zip(out.prompt_token_ids, out.prompt_logprobs, strict=True):
        text = token_text(tokenizer, (entries or {}).get(token_id), token_id)
        result.tokens.append(text)
        result.token_logprobs.append(None if entries is None else entries[token_id].logprob)
        result.top_logprobs.append(None if entries is None else {
            token_text(tokenizer, lp, t): lp.logprob for t, lp in entries.items()
            if top is None or t == token_id or (lp.rank or 0) <= top})
        result.text_offset.append(offset)
        offset += len(text)
    return result


def vllm_prompt_logprobs(out: RequestOutput, tokenizer: Any) -> PromptLogprobs | None:
    """vLLM's ``prompt_logprobs`` of a response: per prompt token, ``{token id: logprob, rank,
    decoded_token}`` of the token and its top alternatives (None for the first token); keyed
    by id, so ``decoded_token`` is the text whatever names the tokens elsewhere."""
    if out.prompt_logprobs is None:
        return None
    tokenizer = spelling(tokenizer)
    return [None if entries is None else {
        t: PromptLogprob(logprob=max(lp.logprob, -9999.0), rank=lp.rank,
                         decoded_token=token_text(tokenizer, lp, t))
        for t, lp in entries.items()} for entries in out.prompt_logprobs]


def echoed_logprobs(out: RequestOutput, c: CompletionOutput, echo: str | None,
                    tokenizer: Any, top: int | None = None) -> CompletionLogprobs | None:
    """A choice's ``logprobs``: the scored prompt's (``echo`` not None, even when it is no
    text: special tokens; ``top`` alternatives each), then its generated tokens'."""
    prompt = prompt_logprobs(out, tokenizer, top) if echo is not None else None
    generated = completion_logprobs(c, 0, next_offset(prompt, len(echo or "")), tokenizer)
    if prompt is None or generated is None:
        return generated
    for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        getattr(prompt, field).extend(getattr(generated, field))
    return prompt


def chat_logprobs(c: CompletionOutput, start: int, top: int,
                  tokenizer: Any) -> ChatLogprobs | None:
    """The chat ``logprobs`` object of tokens ``start:`` of ``c``, ``top`` alternatives each
    (as vLLM: a token's ``bytes`` spell its text also where ``TokenIds`` name it, an
    alternative's its name)."""
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
        spelt = token_text(spelling(tokenizer), entries.get(token_id), token_id)
        content.append(ChatTokenLogprob(token=text, logprob=max(logprob, -9999.0),
                                        bytes=list(spelt.encode()), top_logprobs=tops))
    return ChatLogprobs(content=content)


def completion_response(request_id: str, model: str, n: int, echoes: list[str | None],
                        finals: list[RequestOutput], prompt_lens: list[int],
                        tokenizer: Any, top: int | None = None) -> CompletionResponse:
    """One choice per prompt and sample, indexed ``prompt * n + sample``; ``echoes``: each
    prompt's ``echo_text``, None when not echoed; ``top``: the request's ``logprobs``."""
    choices = [
        CompletionResponseChoice(index=i * n + c.index, text=(echoes[i] or "") + c.text,
                                 logprobs=echoed_logprobs(out, c, echoes[i], tokenizer, top),
                                 finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                                 prompt_logprobs=vllm_prompt_logprobs(out, tokenizer))
        for i, out in enumerate(finals) for c in out.outputs
    ]
    return CompletionResponse(id=request_id, model=model, choices=choices,
                              usage=usage(prompt_lens, finals))


def with_token_ids(body: dict, finals: list[RequestOutput], n: int, kind: str) -> dict:
    """A whole response with vLLM's ``return_token_ids`` fields: each choice's ``token_ids``
    and, per prompt, its ``prompt_token_ids`` (completions: on each of its choices; chat: on
    the response)."""
    for choice in body["choices"]:
        i, sample = choice_of(finals, choice["index"], n)
        choice["token_ids"] = list(sample.token_ids)
        if kind != "chat":
            choice["prompt_token_ids"] = list(finals[i].prompt_token_ids)
    if kind == "chat":
        body["prompt_token_ids"] = list(finals[0].prompt_token_ids)
    return body


def plain_reply(text: str, finish_reason: str | None) -> tuple[ChatMessage, str | None]:
    """A reply without tool calls: the text as the message's content."""
    return ChatMessage(content=text), finish_reason


Reply = Callable[[str, str | None], tuple[ChatMessage, str | None]]


def chat_response(request_id: str, model: str, top: int, final: RequestOutput,
                  prompt_len: int, tokenizer: Any,
                  reply: Reply = plain_reply, echo: str = "",
                  role: str = "assistant") -> ChatCompletionResponse:
    """One choice per sample; ``reply`` reads its text and finish reason as the message and
    the finish reason to answer (tool calls: ``tool_calls.ToolPlan.reply``); ``echo`` leads
    each message's content (vLLM's chat ``echo``); ``role``: the messages' role."""
    choices = []
    for c in final.outputs:
        message, reason = reply(c.text, c.finish_reason)
        message.role = role
        if echo:
            message.content = echo + (message.content or "")
        choices.append(ChatChoice(index=c.index, message=message,
                                  logprobs=chat_logprobs(c, 0, top, tokenizer),
                                  finish_reason=reason, stop_reason=c.stop_reason))
    return ChatCompletionResponse(id=request_id, model=model, choices=choices,
                                  usage=usage([prompt_len], [final]),
                                  prompt_logprobs=vllm_prompt_logprobs(final, tokenizer))
