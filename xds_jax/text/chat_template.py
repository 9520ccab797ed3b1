"""Render Hugging Face chat templates (Jinja) the way transformers does.

Templates come from model files and are untrusted, so they run in Jinja's immutable sandbox. The
environment matches transformers' `apply_chat_template`: `trim_blocks` and `lstrip_blocks`, the
`loopcontrols` extension, a `{% generation %}` block (rendered as its body), a `tojson` filter that
keeps non-ASCII characters and takes `indent`/`separators`/`sort_keys`, and the globals
`raise_exception` and `strftime_now`.
"""

import functools
import json
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
from jinja2.sandbox import ImmutableSandboxedEnvironment


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.CallBlock:
        """Parse the block into a call that renders its body unchanged."""
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = self.call_method("_render_body")
        return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Callable[[], str]) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own `tojson` escapes HTML characters, which templates' JSON must not contain.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@functools.lru_cache(maxsize=16)
def compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template once per distinct source.

    Raises:
        jinja2.TemplateSyntaxError: The template is not valid Jinja.
    """
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationBlock, jinja2.ext.loopcontrols],
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    return environment.from_string(source)


def render_chat_template(source: str, **variables: Any) -> str:
    """Render a chat template with the given variables (`messages`, `add_generation_prompt`, ...).

    Raises:
        jinja2.TemplateError: The template is invalid or called `raise_exception`.
    """
    return compile_chat_template(source).render(**variables)


def find_message_problem(messages: Any) -> str | None:
    """Why `messages` is not a usable chat, or None when it is one.

    A chat is a non-empty list of dicts, each with a string `role` and a `content` that is a
    string, a list of content parts, or None or absent (empty text, as vLLM reads it: an
    assistant turn that only called tools, or one whose content a client left out), and
    `tool_calls`, when given, a list of objects.
    """
    if not isinstance(messages, Sequence) or isinstance(messages, str | bytes):
        return f"messages must be a list of dicts, got {type(messages).__name__}"
    if not messages:
        return "messages must not be empty"
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            return f"messages[{index}] must be a dict, got {type(message).__name__}"
        if not isinstance(message.get("role"), str):
            return f"messages[{index}] needs a string 'role'"
        content = message.get("content")
        if not isinstance(content, str | list | None):
            return f"messages[{index}].content must be a string or a list of parts"
        calls = message.get("tool_calls")
        if calls is not None and not (isinstance(calls, list)
                                      and all(isinstance(c, Mapping) for c in calls)):
            return f"messages[{index}].tool_calls must be a list of tool calls (objects)"
    return None
