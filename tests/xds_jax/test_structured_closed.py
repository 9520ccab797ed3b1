"""Objects of a JSON schema that list their properties take no others (vLLM's default JSON
backend, XGrammar's strict mode), and vLLM's other ``structured_outputs`` options: checked on
the grammar's mask over the tiny golden model's byte tokenizer, one token per character."""

import copy

import numpy as np
import pytest

from tests.helpers import GOLDEN
from xds_jax import LLM, SamplingParams
from xds_jax.errors import SamplingParamsError
from xds_jax.sampling import structured
from xds_jax.sampling.schema_closing import closed_objects
from xds_jax.sampling.structured import GrammarState, StructuredOutputs
from xds_jax.text.byte_tokenizer import byte_tokenizer

POINT = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer(LLM(str(GOLDEN / "llama"), dtype="float32", use_param_cache=False).cfg)


def allowed_after(tok, so: dict, text: str) -> set[str]:
    """The characters the grammar allows after ``text``."""
    state = GrammarState(StructuredOutputs(**so), tok)
    for char in text:
        state.consume(tok.encode(char, add_special_tokens=False)[0])
        assert state.error is None, (text, char)
    ids = np.flatnonzero(state.allowed(tok.vocab_size))
    return {tok.decode([int(i)]) for i in ids if i not in tok.eos_token_ids}


def test_closed_objects_closes_what_lists_properties_and_leaves_the_input():
    schema = {"type": "object",
              "properties": {"inner": copy.deepcopy(POINT),
                             "properties": {"type": "object"},  # a property of that name
                             "free": {"type": "object", "properties": {},
                                      "additionalProperties": True}},
              "enum": [{"properties": {"v": 1}}],  # values, not schemas
              "$defs": {"P": copy.deepcopy(POINT)},
              "items": {"anyOf": [copy.deepcopy(POINT), {"type": "string"}]}}
    before = copy.deepcopy(schema)
    out = closed_objects(schema)
    assert schema == before
    assert out["additionalProperties"] is False
    assert out["properties"]["inner"]["additionalProperties"] is False
    assert "additionalProperties" not in out["properties"]["properties"]  # lists none
    assert out["properties"]["free"]["additionalProperties"] is True
    assert out["enum"] == before["enum"]
    assert out["$defs"]["P"]["additionalProperties"] is False
    assert out["items"]["anyOf"][0]["additionalProperties"] is False
    # every_object closes the objects that list nothing too
    assert closed_objects({"type": "object"}, every_object=True)["additionalProperties"] is False
    assert closed_objects({"type": ["object", "null"]}, True)["additionalProperties"] is False
    # properties that may come from elsewhere: allOf's branches and their parent stay open
    merged = closed_objects({"properties": {"a": {}}, "allOf": [POINT, {"properties": {"b": {}}}]})
    assert "additionalProperties" not in merged
    assert all("additionalProperties" not in branch for branch in merged["allOf"])
    assert closed_objects({"properties": {"a": {}}, "$ref": "#/$defs/X"}) == \
        {"properties": {"a": {}}, "$ref": "#/$defs/X"}
    # pydantic's nested models: a $ref with a description (or alone in an allOf) closes it
    for field in ({"$ref": "#/$defs/P", "description": "d"},
                  {"allOf": [{"$ref": "#/$defs/P"}], "description": "d"}):
        nested = closed_objects({"$defs": {"P": POINT}, "properties": {"p": field}})
        assert nested["$defs"]["P"]["additionalProperties"] is False
    # a definition merged with other keys stays open
    merged = closed_objects({"$defs": {"P": POINT}, "allOf": [{"$ref": "#/$defs/P"},
                                                              {"properties": {"b": {}}}]})
    assert "additionalProperties" not in merged["$defs"]["P"]


# (schema, an instance it takes): closing may narrow what a schema takes, never refuse these
MERGED = [
    ({"$defs": {"Base": POINT}, "allOf": [{"$ref": "#/$defs/Base"}, {
        "properties": {"b": {"type": "integer"}}, "required": ["b"]}]}, '{"x":1,"b":2}'),
    ({"$defs": {"B": {"properties": {"x": {"type": "integer"}}}}, "$ref": "#/$defs/B",
      "properties": {"b": {"type": "integer"}}, "required": ["b"]}, '{"b":2}'),
    ({"properties": {"a": {"type": "integer"}}, "required": ["a"],
      "anyOf": [{"properties": {"x": {"type": "integer"}}},
                {"properties": {"y": {"type": "integer"}}}]}, '{"a":1}'),
    ({"properties": {"a": {"type": "integer"}}, "required": ["a", "b"]}, '{"a":1,"b":2}'),
    ({"properties": {"a": {"type": "integer"}},
      "dependencies": {"a": {"properties": {"b": {"type": "integer"}}}}}, '{"a":1,"b":2}'),
    ({"properties": {"a": {"type": "integer"}}, "if": {"properties": {"a": {"const": 1}}},
      "then": {"properties": {"b": {"type": "integer"}}, "required": ["b"]}}, '{"a":1,"b":2}'),
    ({"type": "array", "items": {"allOf": [POINT, {"properties": {"y": {"type": "integer"}},
                                                   "required": ["y"]}]}}, '[{"x":1,"y":2}]'),
]


def takes(tok, so: dict, text: str) -> bool:
    """Whether the grammar takes ``text`` whole and ends there."""
    try:
        state = GrammarState(StructuredOutputs(**so), tok)
    except SamplingParamsError:
        return False
    for char in text:
        token = tok.encode(char, add_special_tokens=False)[0]
        if not state.allowed(tok.vocab_size)[token]:
            return False
        state.consume(token)
    return state.stopped or bool(state.allowed(tok.vocab_size)[sorted(tok.eos_token_ids)[0]])


@pytest.mark.parametrize("schema, text", MERGED)
def test_closing_never_refuses_what_merged_schemas_take(tok, schema, text, monkeypatch):
    so = {"json": schema, "disable_any_whitespace": True}
    with monkeypatch.context() as patch:
        patch.setattr(structured, "closed_objects", lambda schema, every: schema)
        assert takes(tok, so, text), "the instance is the schema's, open"
    assert takes(tok, so, text), (schema, text)


def test_listed_properties_are_the_only_keys(tok):
    compact = {"disable_any_whitespace": True}
    after = allowed_after(tok, {"json": POINT, **compact}, '{"x":1')
    assert "}" in after and "," not in after and set("0123456789") <= after
    opened = dict(POINT, additionalProperties=True)  # the schema's own word stands
    assert "," in allowed_after(tok, {"json": opened, **compact}, '{"x":1')
    # nested objects too, inside arrays
    nested = {"type": "array", "items": POINT}
    assert "," not in allowed_after(tok, {"json": nested, **compact}, '[{"x":1')


def test_disable_additional_properties_closes_objects_listing_nothing(tok):
    anything = {"type": "object"}
    assert '"' in allowed_after(tok, {"json": anything, "disable_any_whitespace": True}, "{")
    assert allowed_after(tok, {"json": anything, "disable_any_whitespace": True,
                               "disable_additional_properties": True}, "{") == {"}"}
    # json_object is any object, as vLLM's built-in JSON grammar
    assert '"' in allowed_after(tok, {"json_object": True, "disable_any_whitespace": True,
                                      "disable_additional_properties": True}, "{")


def test_whitespace_pattern_and_disable_fallback(tok):
    after = allowed_after(tok, {"json": POINT, "whitespace_pattern": "[ ]?"}, "{")
    assert " " in after and '"' in after and "\n" not in after
    assert "\n" in allowed_after(tok, {"json": POINT}, "{")
    assert SamplingParams(structured_outputs={"json": POINT, "disable_fallback": True})
    for bad, field in (({"disable_fallback": "no"}, "disable_fallback"),
                       ({"disable_additional_properties": 1}, "disable_additional_properties"),
                       ({"whitespace_pattern": 3}, "whitespace_pattern")):
        with pytest.raises(SamplingParamsError, match=f"structured_outputs.{field}"):
            StructuredOutputs(json=POINT, **bad)
