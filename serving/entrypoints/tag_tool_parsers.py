"""Tool-call parsers whose arguments are written one by one in tags, their values as text:

- ``glm45`` (GLM-4.5, 4.6): ``<tool_call>NAME`` then ``<arg_key>K</arg_key>`` and
  ``<arg_value>V</arg_value>`` pairs (whitespace between), then ``</tool_call>``;
- ``qwen3_coder`` (Qwen3-Coder): ``<tool_call><function=NAME>`` then ``<parameter=K>V
  </parameter>`` items, then ``</function></tool_call>``; a value ends at the first
  ``</parameter>`` followed by the next item or the end (so a value may hold either tag),
  and where there is none at the next ``<parameter=`` (a closing tag left out). As vLLM's
  parser, a block may hold several functions (whitespace between), and a reply with no
  ``<tool_call>`` at all has its calls read from its first ``<function=`` on (the model left
  the wrapper out): once the reply ends, the text after its last function staying content.

Blocks are found as ``hermes`` finds them (``tool_parsers.HermesParser``: the same growing-text
contract). Each value is typed by the request's tool schema for its parameter (the parser is
bound per request: ``for_tools``): a string is the text as written, any other type the text
read as JSON, else as a Python literal (``True``, ``None``), else the text; where the schema
allows a string and other types, the text unless it reads as one of those. A parameter the
schema does not type is read so by ``glm45`` and kept as text by ``qwen3_coder``, as vLLM's
parsers do. Non-string values lose surrounding whitespace; a ``qwen3_coder`` string loses the
newline that opens and closes it. Values that would not be JSON (NaN, infinities) stay text.
Parsing is linear in the block: tags are matched where they must be, never searched
backwards.
"""

from __future__ import annotations

import ast
import json
import re
from typing import Any

from serving.entrypoints.tool_parsers import HermesParser, ParsedCall, Piece, partial_marker, shaped

MAX_REMEMBERED_BLOCKS = 64  # per bound parser (one request's reply)
NAME = re.compile(r"[^\s<>]+")  # a function or parameter name: no spaces, no tags
FUNCTION, FUNCTION_END = "<function=", "</function>"
CLOSE = HermesParser.CLOSE  # </tool_call>
JSON_TYPES = {type(None): "null", bool: "boolean", int: "integer", float: "number",
              str: "string", dict: "object", list: "array"}


def schema_types(schema: Any) -> set[str]:
    """The JSON types a parameter's schema allows (``anyOf`` / ``oneOf`` branches too; an
    ``enum``'s values'); empty where it says none (or is malformed)."""
    if not isinstance(schema, dict):
        return set()
    kind = schema.get("type")
    types = {kind} if isinstance(kind, str) else {k for k in kind if isinstance(k, str)} \
        if isinstance(kind, list) else set()
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list):
            for branch in schema[key]:
                types |= schema_types(branch)
    if isinstance(schema.get("enum"), list):
        types |= {JSON_TYPES.get(type(v), "other") for v in schema["enum"]}
    return types


def _decoded(raw: str) -> tuple[bool, Any]:
    """The text read as JSON, else as a Python literal: (True, value), or (False, None)."""
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError, MemoryError):  # JSONDecodeError, 4300+ digit ints
        try:
            value = ast.literal_eval(raw)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            return False, None
    try:
        json.dumps(value, allow_nan=False)  # no NaN, no Infinity, nothing but JSON types
    except (ValueError, TypeError, RecursionError):
        return False, None
    return True, value


def typed_value(raw: str, schema: Any, untyped_json: bool) -> Any:
    """A value written as text, typed by its parameter's schema (the module docstring)."""
    types = schema_types(schema)
    if (not types and not untyped_json) or types == {"string"}:
        return raw
    ok, value = _decoded(raw.strip())
    if "string" in types:  # an optional string: the text unless it reads as another type
        kind = JSON_TYPES.get(type(value)) if ok else None
        other = kind in types or (kind == "integer" and "number" in types)
        return value if ok and other and kind != "string" else raw
    return value if ok else raw.strip()


class XmlArgsParser(HermesParser):
    """``glm45`` or ``qwen3_coder`` (the module docstring); ``for_tools`` binds a request's
    functions, whose parameter schemas type the values. GLM's markers are read with special
    tokens kept (vLLM's parser asks for it too)."""

    def __init__(self, name: str, functions: dict[str, Any] | None = None):
        self.name, self.functions = name, functions or {}
        self.keeps_special_tokens = name == "glm45"
        self._calls: dict[str, ParsedCall | None] = {}  # closed blocks: parsed once

    def for_tools(self, functions: dict[str, Any]) -> XmlArgsParser:
        return XmlArgsParser(self.name, functions)

    def call(self, block: str) -> ParsedCall | None:
        if block not in self._calls:  # a stream parses its closed blocks at every token
            if len(self._calls) >= MAX_REMEMBERED_BLOCKS:
                self._calls.clear()
            self._calls[block] = self._call(block)
        return self._calls[block]

    def calls(self, block: str) -> list[ParsedCall]:
        if self.name != "qwen3_coder":
            return super().calls(block)
        items, end = functions_in(block)
        found = [self.call(item) for item in items]
        return found if found and all(found) and not block[end:].strip() else []

    def parse(self, text: str, final: bool) -> list[Piece]:
        if self.name != "qwen3_coder" or self.OPEN in text:
            return super().parse(text, final)
        start = text.find(FUNCTION)
        if start < 0:  # a wrapper or a bare function may be starting
            held = max(partial_marker(text, self.OPEN), partial_marker(text, FUNCTION))
            return shaped([text if final else text[:len(text) - held]], final)
        if not final:  # bare functions: read once the reply is whole
            return shaped([text[:start]], final)
        items, end = functions_in(text, start)
        found = [self.call(item) for item in items]
        if not found or not all(found):
            return shaped([text], final)
        return shaped([text[:start], *found, text[end:]], final)

    def _call(self, block: str) -> ParsedCall | None:
        found = glm_call(block) if self.name == "glm45" else qwen3_coder_call(block)
        if found is None or not NAME.fullmatch(found[0]):
            return None
        name, raw = found
        schema = self.functions.get(name)
        properties = schema.get("properties") if isinstance(schema, dict) else None
        properties = properties if isinstance(properties, dict) else {}
        glm = self.name == "glm45"
        arguments = {k: typed_value(v, properties.get(k), glm) for k, v in raw}
        return ParsedCall(name, json.dumps(arguments, ensure_ascii=False))


def _tagged(text: str, pos: int, open_tag: str, close_tag: str) -> tuple[str, int] | None:
    """``open_tag`` ... ``close_tag`` at ``pos`` (after whitespace): its inner text and the
    index past it; None where it is not there."""
    pos = _skip_space(text, pos)
    if not text.startswith(open_tag, pos):
        return None
    end = text.find(close_tag, pos + len(open_tag))
    if end < 0:
        return None
    return text[pos + len(open_tag):end], end + len(close_tag)


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def glm_call(block: str) -> tuple[str, list[tuple[str, str]]] | None:
    """``NAME`` then ``<arg_key>``/``<arg_value>`` pairs: (name, [(key, value)]); None for
    anything else (text between pairs, a repeated key, a pair left open)."""
    start = block.find("<arg_key>")
    name = (block if start < 0 else block[:start]).strip()
    pairs: list[tuple[str, str]] = []
    seen: set[str] = set()
    pos = len(block) if start < 0 else start
    while _skip_space(block, pos) < len(block):
        key = _tagged(block, pos, "<arg_key>", "</arg_key>")
        value = key and _tagged(block, key[1], "<arg_value>", "</arg_value>")
        if not value or key[0].strip() in seen:
            return None
        seen.add(key[0].strip())
        pairs.append((key[0].strip(), value[0]))
        pos = value[1]
    return name, pairs


def qwen3_coder_call(block: str) -> tuple[str, list[tuple[str, str]]] | None:
    """``<function=NAME>`` items ``</function>``: (name, [(key, value)]); None for anything
    else. A value ends at the first ``</parameter>`` followed by the next item or the end;
    only where there is none does it end at the next ``<parameter=`` (its closing tag left
    out)."""
    body = block.strip()
    if not body.startswith("<function=") or not body.endswith("</function>"):
        return None
    head = body.find(">")
    if head < 0 or head > len(body) - len("</function>"):
        return None
    name, body = body[len("<function="):head], body[head + 1:-len("</function>")]
    params: list[tuple[str, str]] = []
    pos = _skip_space(body, 0)
    while pos < len(body):
        if not body.startswith("<parameter=", pos):
            return None
        head = body.find(">", pos)
        key = body[pos + len("<parameter="):head].strip() if head >= 0 else ""
        if not NAME.fullmatch(key) or any(key == k for k, _ in params):
            return None
        end, after = _parameter_end(body, head + 1)
        value = body[head + 1:end]
        value = value[1:] if value.startswith("\n") else value
        params.append((key, value[:-1] if value.endswith("\n") else value))
        pos = _skip_space(body, after)
    return name.strip(), params


def functions_in(text: str, pos: int = 0) -> tuple[list[str], int]:
    """The ``<function=...>...</function>`` items from ``pos`` on, whitespace between them (and
    a ``</tool_call>`` left without its open, in a bare reply), and where the text after the
    last one starts. An item ends at the first ``</function>`` followed by the next item,
    ``</tool_call>`` or the end (a value may hold the tag), else at the first."""
    items: list[str] = []
    pos = _skip_space(text, pos)
    while text.startswith(FUNCTION, pos):
        close = _closing(text, pos, FUNCTION_END, (FUNCTION, CLOSE))
        close = text.find(FUNCTION_END, pos) if close < 0 else close
        if close < 0:
            break
        items.append(text[pos:close + len(FUNCTION_END)])
        pos = _skip_space(text, close + len(FUNCTION_END))
        if text.startswith(CLOSE, pos):
            pos = _skip_space(text, pos + len(CLOSE))
    return items, pos if items else 0


def _closing(text: str, start: int, tag: str, nexts: tuple[str, ...]) -> int:
    """The first ``tag`` from ``start`` on followed (after whitespace) by one of ``nexts`` or
    the end of ``text``; -1 where none is."""
    close = text.find(tag, start)
    while close >= 0:
        after = _skip_space(text, close + len(tag))
        if after == len(text) or text.startswith(nexts, after):
            return close
        close = text.find(tag, close + 1)
    return -1


def _parameter_end(body: str, start: int) -> tuple[int, int]:
    """Where a value opening at ``start`` ends, and where the next item may start."""
    close = _closing(body, start, "</parameter>", ("<parameter=",))
    if close >= 0:
        return close, _skip_space(body, close + len("</parameter>"))
    following = body.find("<parameter=", start)
    return (len(body), len(body)) if following < 0 else (following, following)
