"""Tool calling in chat completions: OpenAI's ``tools`` and ``tool_choice``, served as vLLM
serves them.

``tool_plan`` checks a request's tools and choice and says how its reply is read:

- ``none`` (``tool_choice: "none"``, or no tools): plain text.
- ``named`` (``{"type": "function", "function": {"name": f}}``): the output is constrained to
  ``f``'s ``parameters`` schema (``tool_constraint``) and answered as one call of ``f`` with
  that text as its arguments, ``content`` "" and the engine's finish reason.
- ``required``: the output is constrained to a JSON array of ``{"name", "parameters"}``
  objects, one of the tools each (at most one item with ``parallel_tool_calls: false``); each
  complete item is a call, ``content`` "" and the engine's finish reason.
- ``auto`` (the default with tools): needs the server's ``--enable-auto-tool-choice`` and
  ``--tool-call-parser``; the parser (``tool_parsers``) finds the calls in free text, the rest
  is ``content`` (None if empty) and the finish reason is ``tool_calls`` when it found some;
  with ``parallel_tool_calls: false`` only the first call is answered (vLLM, OpenAI).

``ToolPlan.reply`` shapes a whole reply, ``ChoiceDeltas`` the deltas of a streamed one.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from serving.entrypoints.api_error import ApiError
from serving.entrypoints.openai_protocol import (
    ChatMessage,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    FunctionCall,
    ToolCall,
)
from serving.entrypoints.reasoning import ReasoningParser, ReasoningSplit
from serving.entrypoints.tag_tool_parsers import XmlArgsParser
from serving.entrypoints.tool_parsers import BUILT_IN, ParsedCall, ToolParser, object_end

# ``--tool-call-parser`` names (vLLM's): the JSON and DeepSeek parsers, the tagged ones
PARSERS: dict[str, ToolParser] = {p.name: p for p in (
    *BUILT_IN, XmlArgsParser("glm45"), XmlArgsParser("qwen3_coder"))}

AUTO_NEEDS_FLAGS = ('"auto" tool choice requires --enable-auto-tool-choice and '
                    "--tool-call-parser to be set")
CHOICES = "'none', 'auto', 'required' or {\"type\": \"function\", \"function\": {\"name\": ...}}"
ANY_OBJECT = {"type": "object"}  # the arguments of a function that declares no parameters


def functions(tools: list[dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """Each function of ``tools`` by name, with its parameters schema; a malformed tool is a
    400 on ``tools``."""
    found: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools or []):
        def bad(what: str, i: int = i) -> ApiError:
            return ApiError(400, f"tools[{i}]{what}", "tools", "invalid_value")

        if tool.get("type", "function") != "function":
            raise bad(f".type must be 'function', got {tool.get('type')!r}")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise bad(".function is required: an object with a 'name' and 'parameters'")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise bad(f".function.name must be a non-empty string, got {name!r:.40}")
        if name in found:
            raise bad(f".function.name {name!r} is given twice; names must be unique")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise bad(f".function.parameters must be a JSON schema object, got "
                      f"{parameters!r:.40}")
        found[name] = parameters or ANY_OBJECT
    return found


def named_function(choice: dict[str, Any]) -> str:
    """The function a named ``tool_choice`` object names."""
    function = choice.get("function")
    name = function.get("name") if isinstance(function, dict) else None
    if choice.get("type") != "function" or not isinstance(name, str):
        raise ApiError(400, f"tool_choice must be {CHOICES}, got {choice!r:.80}", "tool_choice",
                       "invalid_value")
    return name


@dataclasses.dataclass(frozen=True)
class ToolPlan:
    """How a chat reply is read: ``mode`` is none, named (the function ``name``), required or
    auto (with ``parser``)."""

    mode: str = "none"
    name: str | None = None
    parser: ToolParser | None = None
    reasoning: ReasoningParser | None = None  # the reply's reasoning comes first
    include_reasoning: bool = True
    single_call: bool = False  # parallel_tool_calls false: an auto reply's first call only

    def keep_special_tokens(self, req: Any) -> None:
        """An auto parser whose markers are special tokens reads the reply with them kept."""
        if self.mode == "auto" and getattr(self.parser, "keeps_special_tokens", False):
            req.skip_special_tokens = False

    def with_reasoning(self, parser: ReasoningParser | None, include: bool = True) -> ToolPlan:
        return dataclasses.replace(self, reasoning=parser, include_reasoning=include)

    def reply(self, text: str, finish_reason: str | None) -> tuple[ChatMessage, str | None]:
        """The message and finish reason of a whole reply ``text``."""
        reasoning = None
        if self.reasoning is not None:
            reasoning, text = self.reasoning.split(text)
        message, reason = self._reply(text, finish_reason)
        if reasoning is not None and self.include_reasoning:
            message.reasoning_content = reasoning
        if reasoning is not None and message.content == "" and self.mode in ("none", "auto"):
            message.content = None  # all reasoning, no answer (as vLLM)
        return message, reason

    def _reply(self, text: str, finish_reason: str | None) -> tuple[ChatMessage, str | None]:
        if self.mode == "named":
            return ChatMessage(content="", tool_calls=[tool_call(self.name, text)]), finish_reason
        if self.mode == "required":
            calls = [tool_call(c.name, c.arguments) for c in required_calls(text)]
            return ChatMessage(content="", tool_calls=calls or None), finish_reason
        if self.mode == "auto":
            pieces = self.parser.parse(text, True)
            calls = [tool_call(p.name, p.arguments) for p in pieces if isinstance(p, ParsedCall)]
            if self.single_call:
                calls = calls[:1]
            if calls:
                content = "".join(p for p in pieces if isinstance(p, str))
                return ChatMessage(content=content or None, tool_calls=calls), "tool_calls"
        return ChatMessage(content=text), finish_reason


PLAIN = ToolPlan()  # a reply of plain text


def tool_plan(req: Any, parser: ToolParser | None) -> ToolPlan:
    """The plan for a chat request's ``tools`` and ``tool_choice`` (``parser``: the server's
    ``--tool-call-parser`` when ``--enable-auto-tool-choice`` is set, else None)."""
    known = functions(req.tools)
    choice = req.tool_choice if req.tool_choice is not None else ("auto" if known else "none")
    if choice == "none" or (choice == "auto" and not known):
        return PLAIN
    if choice == "auto":
        if parser is None:
            raise ApiError(400, AUTO_NEEDS_FLAGS, "tool_choice", "unsupported")
        bind = getattr(parser, "for_tools", None)  # a parser typing values by the schemas
        return ToolPlan("auto", parser=bind(known) if bind else parser,
                        single_call=req.parallel_tool_calls is False)
    if choice != "required" and not isinstance(choice, dict):
        raise ApiError(400, f"tool_choice must be {CHOICES}, got {choice!r:.40}", "tool_choice",
                       "invalid_value")
    name = named_function(choice) if isinstance(choice, dict) else None
    if not known:
        what = f"naming function {name!r}" if name else "'required'"
        raise ApiError(400, f"tool_choice {what} needs tools: none were given", "tool_choice",
                       "invalid_value")
    if name is None:
        return ToolPlan("required")
    if name not in known:
        raise ApiError(400, f"tool_choice names function {name!r}, which is not in tools "
                       f"(they define {', '.join(known)})", "tool_choice", "invalid_value")
    return ToolPlan("named", name=name)


def tool_constraint(req: Any) -> dict[str, Any] | None:
    """The ``StructuredOutputs`` fields a named or required ``tool_choice`` sets (None for
    others): that function's parameters, or an array of calls (vLLM's schema)."""
    choice = getattr(req, "tool_choice", None)
    if choice != "required" and not isinstance(choice, dict):
        return None
    known = functions(req.tools)
    if isinstance(choice, dict):
        return {"json": known.get(named_function(choice), ANY_OBJECT)}
    definitions: dict[str, Any] = {}
    items = []
    for name, parameters in known.items():
        parameters = dict(parameters)
        for key, value in parameters.pop("$defs", {}).items():
            if definitions.setdefault(key, value) != value:
                raise ApiError(400, f"tools: functions define $defs {key!r} differently; with "
                               "tool_choice 'required' their $defs must agree", "tools",
                               "invalid_value")
        items.append({"type": "object", "additionalProperties": False,
                      "required": ["name", "parameters"],
                      "properties": {"name": {"type": "string", "enum": [name]},
                                     "parameters": parameters}})
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
    if req.parallel_tool_calls is False:
        schema["maxItems"] = 1
    return {"json": schema | ({"$defs": definitions} if definitions else {})}


def required_calls(text: str) -> list[ParsedCall]:
    """The complete items of a (growing) ``required`` array of ``{"name", "parameters"}``."""
    calls: list[ParsedCall] = []
    pos = text.find("[") + 1
    while pos:
        start = len(text) - len(text[pos:].lstrip().lstrip(",").lstrip())
        end = object_end(text, start) if text.startswith("{", start) else None
        if end is None:
            break
        try:
            item = json.loads(text[start:end])
            calls.append(ParsedCall(item["name"], json.dumps(item["parameters"],
                                                             ensure_ascii=False)))
        except (json.JSONDecodeError, KeyError, TypeError):
            break
        pos = end
    return calls


def tool_call(name: str, arguments: str) -> ToolCall:
    return ToolCall(function=FunctionCall(name=name, arguments=arguments))


def call_deltas(index: int, name: str, arguments: str | None) -> list[DeltaMessage]:
    """A call's opening delta (``index``, ``id``, ``type``, ``name``, ``arguments`` "") and,
    when given, a delta of its ``arguments``."""
    opening = DeltaToolCall(index=index, id=tool_call(name, "").id, type="function",
                            function=DeltaFunctionCall(name=name, arguments=""))
    deltas = [DeltaMessage(tool_calls=[opening])]
    return deltas + ([arguments_delta(index, arguments)] if arguments else [])


def arguments_delta(index: int, arguments: str) -> DeltaMessage:
    return DeltaMessage(tool_calls=[DeltaToolCall(
        index=index, function=DeltaFunctionCall(arguments=arguments))])


class ChoiceDeltas:
    """One streamed choice under ``plan``: ``feed`` it each piece of new text; it answers the
    deltas to send (none while text is held back, as a call may be starting)."""

    def __init__(self, plan: ToolPlan):
        self.plan, self.text = plan, ""
        self.sent_chars = self.sent_calls = 0
        self.split = None if plan.reasoning is None else ReasoningSplit(plan.reasoning)

    def feed(self, text: str, finished: bool) -> list[DeltaMessage]:
        if self.split is None:
            return self._feed(text, finished)
        reasoning, text = self.split.feed(text, finished)
        deltas = []
        if reasoning and self.plan.include_reasoning:
            deltas.append(DeltaMessage(reasoning_content=reasoning))
        if text or finished:
            deltas += [d for d in self._feed(text, finished)
                       if d.content or d.tool_calls or not deltas]
        return deltas

    def _feed(self, text: str, finished: bool) -> list[DeltaMessage]:
        mode = self.plan.mode
        if mode == "none":
            return [DeltaMessage(content=text)]
        if mode == "named":
            opened, self.sent_calls = self.sent_calls, 1
            if opened:
                return [arguments_delta(0, text)] if text else []
            return call_deltas(0, self.plan.name, text)
        self.text += text
        if mode == "required":  # an item can only be completed by a '}'
            return self._calls_and_content(required_calls(self.text)) if "}" in text else []
        return self._calls_and_content(self.plan.parser.parse(self.text, finished))

    def _calls_and_content(self, pieces: list) -> list[DeltaMessage]:
        """Deltas for what ``pieces`` (content strings and calls, a growing list) holds beyond
        what was sent."""
        deltas: list[DeltaMessage] = []
        chars = calls = 0
        for piece in pieces:
            if isinstance(piece, str):
                if chars + len(piece) > self.sent_chars:
                    deltas.append(DeltaMessage(content=piece[max(self.sent_chars - chars, 0):]))
                chars += len(piece)
            else:
                if calls >= self.sent_calls and not (calls and self.plan.single_call):
                    deltas += call_deltas(calls, piece.name, piece.arguments)
                calls += 1
        self.sent_chars, self.sent_calls = max(chars, self.sent_chars), max(calls, self.sent_calls)
        return deltas

    def finish_reason(self, reason: str | None) -> str | None:
        """The finish reason to send: ``tool_calls`` once an auto parser found calls."""
        return "tool_calls" if self.plan.mode == "auto" and self.sent_calls else reason
