"""Structured outputs over HTTP through the ``openai`` SDK: OpenAI's ``response_format`` and
vLLM's ``structured_outputs`` and ``guided_*`` fields, on both endpoints.

The server runs the tiny golden Llama with random weights and a byte tokenizer, so its free
text is noise: an output that parses or matches shows the constraint was honoured. Random
weights also love whitespace, which JSON allows between any two tokens, so requests bias it
away (``logit_bias``) unless a test is about whitespace.
"""

from __future__ import annotations

import json
import re

import openai
import pydantic
import pytest

from tests.serving.fake_engine import client
from tests.serving.real_server import text_server_fixture

server = text_server_fixture()
ASK = [{"role": "user", "content": "JSON?"}]  # short: the context holds 256 byte tokens
PERSON = {"type": "object", "additionalProperties": False, "required": ["age", "member", "tier"],
          "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 150},
                         "member": {"type": "boolean"},
                         "tier": {"enum": ["gold", "silver"]}}}
PHONE = "[0-9]{3}-[0-9]{4}"


class Person(pydantic.BaseModel):
    """What ``client.beta.chat.completions.parse`` turns into a strict JSON schema."""

    age: int
    member: bool


@pytest.fixture(scope="module")
def sdk(server) -> openai.OpenAI:
    return client(server)


def no_whitespace(server) -> dict[str, float]:
    """A ``logit_bias`` that keeps the model off whitespace unless the grammar demands it."""
    return {str(t): -100 for t in server.engine.tokenizer.encode(" \n\t\r", False)}


def chat(server, sdk, **kwargs):
    kwargs = dict(model=server.engine.model_name, messages=ASK, max_tokens=180, seed=0,
                  logit_bias=no_whitespace(server)) | kwargs
    return sdk.chat.completions.create(**kwargs)


def complete(server, sdk, **kwargs):
    kwargs = dict(model=server.engine.model_name, prompt="Answer:", max_tokens=180, seed=0,
                  logit_bias=no_whitespace(server)) | kwargs
    return sdk.completions.create(**kwargs)


def assert_person(text: str) -> None:
    person = json.loads(text)
    assert set(person) == {"age", "member", "tier"}, person
    assert type(person["age"]) is int and 0 <= person["age"] <= 150
    assert type(person["member"]) is bool and person["tier"] in ("gold", "silver")


def bad_request(call, param: str) -> str:
    """The message of the 400 ``call`` gets, which names ``param``."""
    with pytest.raises(openai.BadRequestError) as caught:
        call()
    error = caught.value.body
    assert caught.value.status_code == 400 and error["type"] == "invalid_request_error", error
    assert error["param"] == param, error
    return error["message"]


# -- what the constraint allows -----------------------------------------------------------------
def test_json_schema_response_format(server, sdk):
    fmt = {"type": "json_schema",
           "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    reply = chat(server, sdk, response_format=fmt)
    assert_person(reply.choices[0].message.content)
    assert reply.choices[0].finish_reason == "stop"


def test_sdk_parse_with_a_pydantic_model(server, sdk):
    reply = sdk.beta.chat.completions.parse(model=server.engine.model_name, messages=ASK,
                                            max_tokens=180, seed=0, response_format=Person,
                                            logit_bias=no_whitespace(server))
    person = reply.choices[0].message.parsed
    assert isinstance(person, Person) and reply.choices[0].finish_reason == "stop"


def test_json_object_response_format(server, sdk):
    reply = chat(server, sdk, response_format={"type": "json_object"}, n=4,
                 extra_body={"structured_outputs": None})
    for choice in reply.choices:
        if choice.finish_reason == "stop":  # random weights may write one long key instead
            assert isinstance(json.loads(choice.message.content), dict)
        else:
            assert choice.message.content.startswith("{")
    assert any(c.finish_reason == "stop" for c in reply.choices)


def test_text_response_format_is_free_text(server, sdk):
    reply = chat(server, sdk, response_format={"type": "text"}, max_tokens=5,
                 extra_body={"ignore_eos": True})
    assert reply.choices[0].finish_reason == "length"


@pytest.mark.parametrize("extra", [{"structured_outputs": {"regex": PHONE}},
                                   {"guided_regex": PHONE}])
def test_regex(server, sdk, extra):
    reply = chat(server, sdk, extra_body=extra)
    assert re.fullmatch(PHONE, reply.choices[0].message.content)
    assert reply.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("extra", [{"structured_outputs": {"choice": ["yes", "no"]}},
                                   {"guided_choice": ["yes", "no"]}])
def test_choice(server, sdk, extra):
    reply = chat(server, sdk, n=3, temperature=1.0, extra_body=extra)
    assert {c.message.content for c in reply.choices} <= {"yes", "no"}


def test_guided_json_and_structured_outputs_json(server, sdk):
    for extra in ({"guided_json": PERSON}, {"structured_outputs": {"json": json.dumps(PERSON)}},
                  {"guided_json": PERSON, "guided_decoding_backend": "xgrammar"}):
        assert_person(chat(server, sdk, extra_body=extra).choices[0].message.content)


def test_grammar(server, sdk):
    grammar = 'root ::= "(" [0-9] ")" | "[" [a-c] "]"'
    for extra in ({"guided_grammar": grammar}, {"structured_outputs": {"grammar": grammar}}):
        text = chat(server, sdk, extra_body=extra).choices[0].message.content
        assert re.fullmatch(r"\([0-9]\)|\[[a-c]\]", text), text


def test_disable_any_whitespace(server, sdk):
    """Alone or shaping the schema of ``response_format`` or ``guided_json`` (as in vLLM)."""
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    compact = {"disable_any_whitespace": True}
    for kwargs in (dict(extra_body={"structured_outputs": {"json": PERSON, **compact}}),
                   dict(response_format=fmt, extra_body={"structured_outputs": compact}),
                   dict(extra_body={"guided_json": PERSON, "structured_outputs": compact})):
        reply = chat(server, sdk, logit_bias=None, **kwargs).choices[0]
        assert_person(reply.message.content)
        assert not re.search(r"\s", reply.message.content) and reply.finish_reason == "stop"


def test_listed_properties_only_and_vllm_options_beside_a_response_format(server, sdk):
    """A schema that does not close its objects still gets only their listed keys (vLLM's
    default backend); vLLM's other options shape the response format's constraint."""
    open_person = {k: v for k, v in PERSON.items() if k != "additionalProperties"}
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": open_person}}
    options = {"disable_fallback": False, "disable_additional_properties": True,
               "whitespace_pattern": "[ ]?"}
    for kwargs in (dict(response_format=fmt, extra_body={"structured_outputs": options}),
                   dict(extra_body={"guided_json": open_person}), dict(response_format=fmt)):
        reply = chat(server, sdk, **kwargs).choices[0]
        assert_person(reply.message.content)
        assert reply.finish_reason == "stop"


def test_whitespace_pattern_from_either_field(server, sdk):
    """vLLM's ``structured_outputs.whitespace_pattern`` and older ``guided_whitespace_pattern``:
    here newlines only, where this model's JSON otherwise fills with spaces too."""
    for extra in ({"structured_outputs": {"json": PERSON, "whitespace_pattern": "\n?"}},
                  {"guided_json": PERSON, "guided_whitespace_pattern": "\n?"}):
        reply = chat(server, sdk, logit_bias=None, extra_body=extra).choices[0]
        assert_person(reply.message.content)
        assert not re.search(r"[ \t\r]", reply.message.content), reply.message.content


def test_completions_take_every_form(server, sdk):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    assert_person(complete(server, sdk, extra_body={"response_format": fmt}).choices[0].text)
    regex = complete(server, sdk, n=2, extra_body={"structured_outputs": {"regex": PHONE}})
    assert all(re.fullmatch(PHONE, c.text) for c in regex.choices)
    choice = complete(server, sdk, extra_body={"guided_choice": ["up", "down"]})
    assert choice.choices[0].text in ("up", "down")


def test_streamed_deltas_join_to_valid_json(server, sdk):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    chunks = list(chat(server, sdk, response_format=fmt, stream=True))
    assert_person("".join(c.choices[0].delta.content or "" for c in chunks if c.choices))
    assert chunks[-1].choices[0].finish_reason == "stop"
    streamed = complete(server, sdk, stream=True, extra_body={"guided_regex": PHONE})
    assert re.fullmatch(PHONE, "".join(c.choices[0].text for c in streamed))


# -- what is refused ------------------------------------------------------------------------
def test_missing_or_bad_json_schema_is_a_400(server, sdk):
    for fmt, named in [({"type": "json_schema"}, "response_format.json_schema is required"),
                       ({"type": "json_schema", "json_schema": {"name": "x"}},
                        "response_format.json_schema.schema is required"),
                       ({"type": "json_schema", "json_schema": {"name": "x", "schema": "{}"}},
                        "response_format.json_schema.schema must be"),
                       ({"type": "xml"}, "response_format.type must be")]:
        message = bad_request(lambda fmt=fmt: chat(server, sdk, response_format=fmt),
                              "response_format")
        assert message.startswith(named), message


def test_schema_that_does_not_compile_is_a_400_on_the_field_sent(server, sdk):
    broken = {"type": "object", "properties": {"a": {"type": "no-such-type"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": broken}}
    message = bad_request(lambda: chat(server, sdk, response_format=fmt), "response_format")
    assert message.startswith("response_format.json_schema.schema"), message
    for stream in (False, True):  # a stream gets the 400 before its first chunk
        message = bad_request(lambda stream=stream: chat(
            server, sdk, stream=stream, extra_body={"guided_json": broken}), "guided_json")
        assert message.startswith("guided_json: "), message
    bad_request(lambda: complete(server, sdk, extra_body={"structured_outputs": {"json": broken}}),
                "structured_outputs")
    bad_request(lambda: chat(server, sdk, extra_body={"guided_json": "{not json"}),
                "guided_json")


def test_bad_regex_is_a_400(server, sdk):
    for extra, param in [({"guided_regex": "[0-9"}, "guided_regex"),
                         ({"structured_outputs": {"regex": "(a"}}, "structured_outputs")]:
        bad_request(lambda extra=extra: chat(server, sdk, extra_body=extra), param)


def test_bad_structured_outputs_objects_are_a_400(server, sdk):
    for body, param in [({"structured_outputs": {}}, "structured_outputs"),
                        ({"structured_outputs": {"disable_any_whitespace": True}},
                         "structured_outputs"),
                        ({"structured_outputs": {"regex": "a", "choice": ["a"]}},
                         "structured_outputs"),
                        ({"structured_outputs": {"regexp": "a"}}, "structured_outputs"),
                        ({"structured_outputs": "a"}, "structured_outputs"),
                        ({"guided_choice": []}, "guided_choice"),
                        ({"guided_choice": "yes"}, "guided_choice")]:
        bad_request(lambda body=body: chat(server, sdk, extra_body=body), param)


def test_two_constraints_are_a_400_naming_both(server, sdk):
    message = bad_request(lambda: chat(server, sdk, response_format={"type": "json_object"},
                                       extra_body={"guided_regex": PHONE}), "guided_regex")
    assert "response_format and guided_regex" in message
    message = bad_request(lambda: complete(server, sdk, extra_body={
        "structured_outputs": {"choice": ["a"]}, "guided_json": PERSON}), "guided_json")
    assert "structured_outputs and guided_json" in message


def test_a_tool_choice_constraint_and_another_are_two_constraints(server, sdk):
    """A named or required ``tool_choice`` constrains the output too (tests/serving/
    test_tool_calls.py); with another constraint the request is refused, naming both."""
    tools = [{"type": "function", "function": {"name": "f", "parameters": PERSON}}]
    named = {"type": "function", "function": {"name": "f"}}
    for kwargs in (dict(tools=tools, tool_choice="required", extra_body={"guided_regex": PHONE}),
                   dict(tools=tools, tool_choice=named, response_format={"type": "json_object"})):
        message = bad_request(lambda kwargs=kwargs: chat(server, sdk, **kwargs), "tool_choice")
        assert message.startswith("only one output constraint per request"), message
    message = bad_request(lambda: chat(server, sdk, tool_choice="required"), "tool_choice")
    assert message == "tool_choice 'required' needs tools: none were given"
