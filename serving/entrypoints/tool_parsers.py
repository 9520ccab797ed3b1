"""Tool-call parsers for ``tool_choice: "auto"`` (``--tool-call-parser NAME``, as in vLLM):
each reads a model's reply text as content and the function calls it wrote.

``parse(text, final)`` returns the reply as a list of content strings and ``ParsedCall``s in
order. With ``final`` False the text is still growing: what might still become a call (an
opening marker, partly written; a call not yet closed) and trailing whitespace are held back,
so the list only ever grows at its end as text arrives, which is what lets a stream emit the
difference. Whitespace that separates content from calls is dropped; text after a call is put
on its own line. A block that does not parse as a call stays content, verbatim, and a reply
without calls is returned unchanged.

- ``hermes`` (Qwen2.5, Hermes): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
  blocks anywhere in the reply (the last one may be left unclosed).
- ``llama3_json`` (Llama 3.1/3.2 JSON tool calls): the reply, optionally after
  ``<|python_tag|>``, is ``{"name": ..., "parameters": {...}}``, or several separated by
  ``;``; text after the calls is content.
- ``deepseek_v3`` / ``deepseek_v31`` (DeepSeek-V3 and R1 / V3.1): the calls section between
  DeepSeek's special markers (``DeepSeekParser``).
- ``glm45`` (GLM-4.5, 4.6) and ``qwen3_coder`` (Qwen3-Coder): ``<tool_call>`` blocks whose
  arguments are written one by one in tags (``tag_tool_parsers.XmlArgsParser``), each value
  typed by the request's tool schema.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Protocol


@dataclasses.dataclass(frozen=True)
class ParsedCall:
    """One function call: its name and its arguments as JSON text."""

    name: str
    arguments: str


Piece = str | ParsedCall


class ToolParser(Protocol):
    name: str

    def parse(self, text: str, final: bool) -> list[Piece]: ...


def object_end(text: str, start: int) -> int | None:
    """The index just past the JSON object that opens at ``text[start]`` (a ``{``), by its
    balanced braces outside strings; None while it is unclosed."""
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        char = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def call_from_json(text: str, keys: tuple[str, ...]) -> ParsedCall | None:
    """``{"name": str, <one of keys>: {...}}`` as a call; None for anything else."""
    try:
        value: Any = json.loads(text)
    except (ValueError, RecursionError):  # not JSON; a 4300+ digit integer; too deep
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = next((value[k] for k in keys if k in value), None)
    if not isinstance(arguments, dict):
        return None
    return ParsedCall(value["name"], json.dumps(arguments, ensure_ascii=False))


def partial_marker(text: str, marker: str) -> int:
    """How many characters at the end of ``text`` could be the start of ``marker``."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


def shaped(pieces: list[Piece], final: bool) -> list[Piece]:
    """``pieces`` with adjacent strings merged, whitespace next to a call dropped, text after
    a call on a new line (when content came before), empty strings gone, and, while
    ``final`` is False, the last string's trailing whitespace held back."""
    merged: list[Piece] = []
    for piece in pieces:
        if isinstance(piece, str) and merged and isinstance(merged[-1], str):
            merged[-1] += piece
        else:
            merged.append(piece)
    result: list[Piece] = []
    for i, piece in enumerate(merged):
        if isinstance(piece, str):
            after_call = i > 0
            if after_call:
                piece = piece.lstrip()
            if i + 1 < len(merged) or not final:
                piece = piece.rstrip()
            if after_call and piece and any(isinstance(p, str) for p in result):
                piece = "\n" + piece
            if not piece:
                continue
        result.append(piece)
    return result


class HermesParser:
    """``<tool_call>`` JSON ``</tool_call>`` blocks (``arguments``; ``parameters`` too)."""

    name = "hermes"
    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def call(self, block: str) -> ParsedCall | None:
        return call_from_json(block, ("arguments", "parameters"))

    def calls(self, block: str) -> list[ParsedCall]:
        """The calls one block holds (none: the block stays text)."""
        call = self.call(block)
        return [call] if call else []

    def parse(self, text: str, final: bool) -> list[Piece]:
        pieces: list[Piece] = []
        pos = 0
        while (start := text.find(self.OPEN, pos)) >= 0:
            pieces.append(text[pos:start])
            end = text.find(self.CLOSE, start)
            if end < 0 and not final:
                return shaped(pieces, final)
            stop = len(text) if end < 0 else end + len(self.CLOSE)
            block = text[start + len(self.OPEN):end if end >= 0 else len(text)]
            pieces.extend(self.calls(block) or [text[start:stop]])
            pos = stop
        rest = text[pos:]
        if not final:
            rest = rest[:len(rest) - partial_marker(rest, self.OPEN)]
        return shaped([*pieces, rest], final)


class Llama3JsonParser:
    """A reply of ``{"name", "parameters"}`` objects joined by ``;`` (``arguments`` too),
    optionally after ``<|python_tag|>``."""

    name = "llama3_json"
    TAG = "<|python_tag|>"

    def parse(self, text: str, final: bool) -> list[Piece]:
        start = len(text) - len(text.lstrip())
        if text.startswith(self.TAG, start):
            start = len(text) - len(text[start + len(self.TAG):].lstrip())
        elif not final and self.TAG.startswith(text[start:]):
            return []  # nothing but whitespace, or the tag so far
        if start == len(text) and not final:
            return []
        if not text.startswith("{", start):
            return shaped([text], final)
        calls: list[Piece] = []
        pos = start
        while True:
            end = object_end(text, pos)
            if end is None and not final:
                return calls
            call = None if end is None else call_from_json(text[pos:end], ("parameters",
                                                                          "arguments"))
            if call is None:
                break
            calls.append(call)
            after = text[end:].lstrip()
            if not after.startswith(";"):
                if not after and not final:
                    return calls  # a ';' may follow
                pos = end
                break
            pos = len(text) - len(after[1:].lstrip())
            if pos == len(text) and not final:
                return calls
            if not text.startswith("{", pos):
                break
        if not calls:
            return shaped([text], final)
        rest = text[pos:].lstrip().lstrip(";")
        return shaped([*calls, rest], final)


class DeepSeekParser:
    """DeepSeek's tool-call section: ``<｜tool▁calls▁begin｜>``, then per call
    ``<｜tool▁call▁begin｜>`` ... ``<｜tool▁call▁end｜>``, then ``<｜tool▁calls▁end｜>``; text
    before and after is content. A call is ``function<｜tool▁sep｜>NAME`` and its arguments in a
    fenced ``json`` block (V3, R1: ``deepseek_v3``) or ``NAME<｜tool▁sep｜>`` and the arguments'
    JSON (V3.1: ``deepseek_v31``). The markers are special tokens, so a request read with it
    keeps special tokens in its text (``keeps_special_tokens``)."""

    BEGIN, END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
    CALL, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
    keeps_special_tokens = True

    def __init__(self, name: str, fenced: bool):
        self.name, self.fenced = name, fenced

    def call(self, block: str) -> ParsedCall | None:
        head, sep, body = block.partition(self.SEP)
        if not sep:
            return None
        if self.fenced:  # function<sep>NAME\n```json\n{...}\n```
            name, _, body = body.partition("\n")
            body = body.strip()
            if not (body.startswith("```json") and body.endswith("```")):
                return None
            body = body[len("```json"):-3]
        else:  # NAME<sep>{...}
            name = head
        try:
            arguments = json.loads(body)
        except (ValueError, RecursionError):
            return None
        if not isinstance(arguments, dict) or not name.strip():
            return None
        return ParsedCall(name.strip(), json.dumps(arguments, ensure_ascii=False))

    def parse(self, text: str, final: bool) -> list[Piece]:
        pieces = self._pieces(text, final)
        if final and not any(isinstance(p, ParsedCall) for p in pieces):
            return shaped([text], final)  # no call: the reply as it is, markers and all
        return pieces

    def _pieces(self, text: str, final: bool) -> list[Piece]:
        start = text.find(self.BEGIN)
        if start < 0:
            rest = text if final else text[:len(text) - partial_marker(text, self.BEGIN)]
            return shaped([rest], final)
        pieces: list[Piece] = [text[:start]]
        pos = start + len(self.BEGIN)
        while True:
            rest = text[pos:].lstrip()
            pos = len(text) - len(rest)
            if rest.startswith(self.END):
                if not final and not any(isinstance(p, ParsedCall) for p in pieces):
                    return shaped(pieces, final)  # no call: all of it content, at the end
                pieces.append(text[pos + len(self.END):])
                return shaped(pieces, final)
            if not rest.startswith(self.CALL):
                if not final:  # a marker still being written, or the text so far
                    return shaped(pieces, final)
                pieces.append(text[pos:])
                return shaped(pieces, final)
            end = text.find(self.CALL_END, pos)
            if end < 0:
                if not final:
                    return shaped(pieces, final)
                pieces.append(text[pos:])
                return shaped(pieces, final)
            call = self.call(text[pos + len(self.CALL):end])
            if call is None and not final:  # content only if no call ever parses: hold it
                return shaped(pieces, final)
            pieces.append(call or text[pos:end + len(self.CALL_END)])
            pos = end + len(self.CALL_END)


BUILT_IN: tuple[ToolParser, ...] = (
    HermesParser(), Llama3JsonParser(), DeepSeekParser("deepseek_v3", fenced=True),
    DeepSeekParser("deepseek_v31", fenced=False))  # tool_calls.PARSERS adds the tagged ones
