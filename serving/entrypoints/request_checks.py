"""Checks of a request body before pydantic reads it (``openai_protocol.OpenAIModel``): each
field's value of the JSON type its schema declares, and no lone UTF-16 surrogate in any
string. Both failures are exceptions pydantic does not wrap, which the server answers as a 400
naming the field."""

from __future__ import annotations

import re
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel

LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")  # JSON's "\ud800" decodes to one
SCALARS = frozenset({int, float, bool, type(None)})  # lists of these (token ids) are skipped


class InvalidFieldError(Exception):
    """A request field's value no client means: not a ``ValueError``, so pydantic lets it
    through to the server, which answers a 400 naming ``field`` (the top-level field holding
    it; None for a top-level key)."""

    def __init__(self, field: str | None, message: str):
        super().__init__(message)
        self.field, self.message = field, message


class InvalidTextError(InvalidFieldError):
    """A request string holds a lone UTF-16 surrogate: not Unicode text, so it can be neither
    tokenized, compiled into a grammar, nor written back in a UTF-8 answer."""


_JSON_KINDS = {bool: "true/false", int: "a number", float: "a number", str: "a string",
               list: "a list", dict: "an object", type(None): "null"}


def _fits(value: Any, annotation: Any) -> bool:
    """Whether ``value`` (parsed JSON) is of the JSON type ``annotation`` declares, as JSON
    Schema reads it: no ``true`` for a number, no ``"5"`` for a number, no ``1`` for a
    boolean (all of which pydantic's lax mode would coerce). Models and ``Any`` are left to
    pydantic."""
    if annotation is Any or (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
        return True
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, UnionType):
        return any(_fits(value, arg) for arg in args)
    if origin is Literal:
        return value in args
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:  # 5.0 is an integer to JSON Schema
        return type(value) is int or (type(value) is float and value.is_integer())
    if annotation is float:
        return type(value) in (int, float)
    if annotation is str:
        return isinstance(value, str)
    if origin is list or annotation is list:
        if not isinstance(value, list):
            return False
        item = args[0] if args else Any
        if item is int and all(type(v) is int for v in value):  # token ids: the common case
            return True
        return all(_fits(v, item) for v in value)
    if origin is dict or annotation is dict:
        return isinstance(value, dict) and all(_fits(v, args[1] if args else Any)
                                               for v in value.values())
    return True


def check_json_types(model: type[BaseModel], data: dict[str, Any]) -> None:
    """Raise ``InvalidFieldError`` for a field whose value is not of the JSON type the schema
    declares (``true`` or ``"5"`` for a number, ``["1", 2]`` for token ids, ``1`` for a
    boolean): pydantic would coerce it, and no client means it."""
    for name, value in data.items():
        field = model.model_fields.get(name)
        if field is None or value is None:
            continue
        for sub in get_args(field.annotation) or (field.annotation,):
            if isinstance(value, dict) and isinstance(sub, type) and issubclass(sub, BaseModel):
                try:  # a nested request model's fields: named under this one
                    check_json_types(sub, value)
                except InvalidFieldError as error:
                    raise InvalidFieldError(name, f"{name}.{error.message}") from None
        if _fits(value, field.annotation):
            continue
        kind = _JSON_KINDS.get(type(value), type(value).__name__)
        if isinstance(value, (list, dict)):  # the container is right, something in it is not
            kind += " with a value that"
        raise InvalidFieldError(name, f"{name}: {kind} does not fit the field's type "
                                f"({field.annotation})")


def check_text(data: dict[str, Any]) -> None:
    """Raise ``InvalidTextError`` for the first string of a request body, key or value at any
    depth, that holds a lone surrogate. Iterative: JSON nests as deep as its parser allows;
    a key is checked before the value under it, so a path in a message is valid text."""
    stack: list[tuple[Any, str, str | None]] = []
    for key, value in data.items():
        stack += [(value, str(key), str(key)), (key, "a field name", None)]
    while stack:
        value, path, field = stack.pop()
        if isinstance(value, str):
            if found := LONE_SURROGATE.search(value):
                raise InvalidTextError(field, (
                    f"{path} holds a lone UTF-16 surrogate ({found.group()!r} at index "
                    f"{found.start()}), which is not valid Unicode text"))
        elif isinstance(value, dict):
            for key, item in value.items():
                stack += [(item, f"{path}.{key}", field), (key, f"a key of {path}", field)]
        elif isinstance(value, list) and not SCALARS.issuperset(map(type, value)):
            stack += [(item, f"{path}[{i}]", field) for i, item in enumerate(value)]
