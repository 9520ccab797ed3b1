"""JSON schemas with their objects closed: ``"additionalProperties": false`` where an object
schema lists its properties and nothing else can add any, as vLLM's default JSON backend
(XGrammar's strict mode) reads a schema (``xds_jax.sampling.structured``).

JSON Schema lets an object hold keys it does not list unless it says otherwise, and a model
free to add keys adds them (a small one, on and on). Closing must never make a satisfiable
schema unsatisfiable, so an object stays open wherever its keys may come from elsewhere:

- beside a combinator (``allOf``, ``anyOf``, ``oneOf``, ``if``/``then``/``else``,
  ``dependentSchemas``/``dependencies``, ``$ref``), and the branches that merge with it: every
  ``allOf`` branch but a lone one, ``anyOf``/``oneOf`` branches of a schema with its own
  ``properties`` or ``required``, conditionals, dependent schemas, and the combinators
  nested directly in those;
- a definition another schema reaches through such a branch or a ``$ref`` with merging
  siblings (a lone ``$ref`` with a ``description``, as pydantic writes it, merges nothing);
- an object whose ``required`` names a key it does not list.

Property values, ``items`` and other nested schemas are objects of their own and close again.
"""

from __future__ import annotations

from typing import Any

_OPEN_KEYS = ("additionalProperties", "patternProperties", "unevaluatedProperties")
_DEFINITIONS = ("$defs", "definitions")
_VALUES = ("enum", "const", "default", "examples")  # JSON values, not schemas
_UNIONS = ("anyOf", "oneOf")
_CONDITIONALS = ("if", "then", "else")
_DEPENDENT = ("dependentSchemas", "dependencies")
# keys whose schemas may merge with the schema holding them (``_merges``)
_BRANCHES = ("allOf", *_UNIONS, *_CONDITIONALS, *_DEPENDENT)
# keys holding a map of name -> schema
_MAPS = ("properties", "patternProperties", *_DEFINITIONS, *_DEPENDENT)
# keywords that add to or constrain an object's keys beside its own properties
_MERGING = ("properties", "required", *_BRANCHES, *_OPEN_KEYS)
_COMBINED = (*_BRANCHES, "$ref")


def closed_objects(schema: Any, every_object: bool = False) -> Any:
    """``schema`` with ``"additionalProperties": false`` on each object schema that lists
    ``properties`` (with ``every_object``: each ``"type": "object"`` too) and says nothing of
    other keys, where nothing else may add any (the module's rules); a copy, the input
    untouched."""
    return _Closer(every_object, _merged_definitions(schema)).walk(schema, True)


def _merges(node: dict, key: str) -> bool:
    """Whether the schemas under ``node[key]`` (one of ``_BRANCHES``) merge their keys with
    ``node``'s: a lone ``allOf`` branch beside no properties does not, nor the ``anyOf`` /
    ``oneOf`` branches of a schema listing none; conditionals and dependent schemas do."""
    lists_keys = any(k in node for k in ("properties", "required"))
    value = node[key]
    if key == "allOf":
        return not (isinstance(value, list) and len(value) == 1) or lists_keys
    return lists_keys if key in _UNIONS else True


def _each(key: str, value: Any, fn) -> Any:
    """``fn(name, schema)`` over the schemas under ``key``: a list's items (name None), a map's
    values by name (``_MAPS``), or the value itself."""
    if isinstance(value, list):
        return [fn(None, item) for item in value]
    if key in _MAPS and isinstance(value, dict):
        return {name: fn(name, sub) for name, sub in value.items()}
    return fn(None, value)


class _Closer:
    def __init__(self, every_object: bool, open_definitions: set[str]):
        self.every_object = every_object
        self.open_definitions = open_definitions

    def walk(self, node: Any, close: bool) -> Any:
        if isinstance(node, list):
            return [self.walk(item, True) for item in node]
        if not isinstance(node, dict):
            return node
        out = {}
        for key, value in node.items():
            if key in _VALUES:
                out[key] = value
            elif key in _DEFINITIONS:
                out[key] = _each(key, value, lambda name, sub, key=key: self.walk(
                    sub, f"#/{key}/{name}" not in self.open_definitions))
            else:
                child = close and not _merges(node, key) if key in _BRANCHES else True
                out[key] = _each(key, value, lambda _, sub, child=child: self.walk(sub, child))
        if close and self._closable(node):
            out["additionalProperties"] = False
        return out

    def _closable(self, node: dict) -> bool:
        listed = node.get("properties")
        types = node.get("type")
        is_object = types == "object" or (isinstance(types, list) and "object" in types)
        if not (isinstance(listed, dict) or (self.every_object and is_object)):
            return False
        if any(key in node for key in _OPEN_KEYS + _COMBINED):
            return False
        required = node.get("required", [])
        names = listed if isinstance(listed, dict) else {}
        return isinstance(required, list) and all(name in names for name in required)


def _merged_definitions(schema: Any) -> set[str]:
    """The ``$ref`` targets some schema merges with other keys: a ``$ref`` beside merging
    keywords, or inside a branch that merges (``_Closer.walk``'s open branches)."""
    found: set[str] = set()

    def visit(node: Any, merging: bool) -> None:
        if isinstance(node, list):
            for item in node:
                visit(item, False)
            return
        if not isinstance(node, dict):
            return
        ref = node.get("$ref")
        if isinstance(ref, str) and (merging or any(key in node for key in _MERGING)):
            found.add(ref)
        for key, value in node.items():
            if key not in _VALUES:
                child = (merging or _merges(node, key)) if key in _BRANCHES else False
                _each(key, value, lambda _, sub, child=child: visit(sub, child))

    visit(schema, False)
    return found
