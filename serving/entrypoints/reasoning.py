"""Reasoning parsers (vLLM's ``--reasoning-parser``): a thinking model's chat reply split into
its reasoning (``message.reasoning_content``, streamed as ``delta.reasoning_content``) and its
answer (``content``, where tool calls are then looked for).

The parsers read the ``<think> ... </think>`` block a reply opens with:

- ``deepseek_r1`` (DeepSeek-R1 and its distillations, whose chat template opens the block in the
  prompt): the reply is reasoning up to ``</think>`` (a ``<think>`` it starts with dropped), the
  answer after it; a reply that never closes the block is reasoning only.
- ``qwen3`` (Qwen3, whose thinking a template switch may turn off) and ``glm45`` (GLM-4.5,
  4.6): only a reply that opens with ``<think>`` has reasoning (up to ``</think>``); any
  other is all answer.
- ``deepseek_v3`` (DeepSeek-V3.1 and later, hybrid): as ``deepseek_r1`` where the request's
  ``chat_template_kwargs`` set ``thinking`` (the template then opens the block), else no
  reasoning at all.

``ReasoningSplit`` splits a streamed reply as it comes, holding back text that may be the start
of a tag, so that no tag is ever sent.
"""

from __future__ import annotations

import dataclasses

from serving.entrypoints.tool_parsers import partial_marker
from xds_jax.errors import ConfigError

START, END = "<think>", "</think>"


@dataclasses.dataclass(frozen=True)
class ReasoningParser:
    """``opens_in_prompt``: the template opens the block, so a reply starts inside it."""

    name: str
    opens_in_prompt: bool
    switch: tuple[str, ...] = ()  # template kwargs that turn thinking on (else: no thought)

    def for_template(self, kwargs: dict | None) -> ReasoningParser | None:
        """The parser for a request's ``chat_template_kwargs``: none where thinking needs a
        switch the request did not turn on."""
        if not self.switch:
            return self
        return self if any((kwargs or {}).get(key) for key in self.switch) else None

    def split(self, text: str) -> tuple[str | None, str]:
        """A whole reply as (reasoning or None, answer)."""
        body = text.lstrip()
        opened = body.startswith(START)
        if opened:
            body = body[len(START):]
        elif not self.opens_in_prompt:
            return None, text
        else:
            body = text
        if END not in body:
            return (body, "") if self.opens_in_prompt or opened else (None, text)
        reasoning, answer = body.split(END, 1)
        return reasoning, answer


PARSERS = {"deepseek_r1": ReasoningParser("deepseek_r1", opens_in_prompt=True),
           "qwen3": ReasoningParser("qwen3", opens_in_prompt=False),
           "glm45": ReasoningParser("glm45", opens_in_prompt=False),  # GLM-4.5's, as Qwen3's
           # DeepSeek-V3.1 / V3.2: the template thinks only with ``thinking`` set
           "deepseek_v3": ReasoningParser("deepseek_v3", opens_in_prompt=True,
                                          switch=("thinking", "enable_thinking"))}


def reasoning_parser(name: str | None) -> ReasoningParser | None:
    if name is None:
        return None
    if name not in PARSERS:
        raise ConfigError(f"--reasoning-parser must be one of {', '.join(sorted(PARSERS))}, "
                          f"got {name!r}")
    return PARSERS[name]


class ReasoningSplit:
    """One streamed reply: ``feed`` each piece of new text; it answers the (reasoning,
    answer) text that may be sent now."""

    def __init__(self, parser: ReasoningParser):
        self.parser = parser
        self.state = "start"  # start (may open with <think>), reasoning, answer
        self.held = ""

    def feed(self, text: str, finished: bool) -> tuple[str, str]:
        self.held += text
        reasoning = answer = ""
        if self.state == "start":
            body = self.held.lstrip()
            if body.startswith(START):
                self.state, self.held = "reasoning", body[len(START):]
            elif START.startswith(body) and not finished:
                return "", ""  # may still be the opening tag
            elif self.parser.opens_in_prompt:
                self.state = "reasoning"
            else:
                self.state = "answer"
        if self.state == "reasoning":
            if END in self.held:
                reasoning, self.held = self.held.split(END, 1)
                self.state = "answer"
            else:
                keep = 0 if finished else partial_marker(self.held, END)
                reasoning = self.held[:len(self.held) - keep]
                self.held = self.held[len(self.held) - keep:]
                return reasoning, ""
        if self.state == "answer":
            answer, self.held = self.held, ""
        return reasoning, answer
