"""The tag-argument tool-call parsers, ``glm45`` (GLM-4.5 / 4.6) and ``qwen3_coder``: calls and
content of whole replies, values typed by the request's tool schemas, malformed blocks kept as
content, growing texts that only extend what was sent, streamed deltas adding up to the whole
reply, and the server's auto tool choice through the ``openai`` SDK, streamed and not."""

from __future__ import annotations

import json

import pytest

from serving.entrypoints.tag_tool_parsers import typed_value
from serving.entrypoints.tool_calls import PARSERS, ChoiceDeltas, ToolPlan, functions
from tests.serving.fake_engine import client, serve
from tests.serving.test_tool_calls import (
    ASK,
    CALLS,
    TOOLS,
    ScriptedEngine,
    calls_of,
    content_of,
    reassembled,
)

GLM = ("Let me check.<tool_call>w\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n"
       "</tool_call><tool_call>add\n<arg_key>a</arg_key>\n<arg_value>1</arg_value>\n"
       "<arg_key>b</arg_key>\n<arg_value>2</arg_value>\n</tool_call>")
QWEN = ("Let me check.\n<tool_call>\n<function=w>\n<parameter=city>\nParis\n</parameter>\n"
        "</function>\n</tool_call>\n<tool_call>\n<function=add>\n<parameter=a>\n1\n"
        "</parameter>\n<parameter=b>\n2\n</parameter>\n</function>\n</tool_call>")
# as Qwen3-Coder also writes them: two functions in one block; no <tool_call> wrapper at all
QWEN_ONE_BLOCK = ("Let me check.\n<tool_call>\n<function=w>\n<parameter=city>\nParis\n"
                  "</parameter>\n</function>\n<function=add>\n<parameter=a>\n1\n</parameter>\n"
                  "<parameter=b>\n2\n</parameter>\n</function>\n</tool_call>")
QWEN_BARE = ("Let me check.\n<function=w>\n<parameter=city>\nParis\n</parameter>\n"
             "</function>\n<function=add>\n<parameter=a>\n1\n</parameter>\n<parameter=b>\n2\n"
             "</parameter>\n</function>")
TYPED = {"type": "object", "properties": {
    "zip": {"type": "string"}, "n": {"type": "integer"}, "flag": {"type": "boolean"},
    "opts": {"type": "object"}, "either": {"anyOf": [{"type": "null"}, {"type": "number"}]},
    "color": {"enum": ["red", "blue"]}}}
FUNCTIONS = functions([{"type": "function", "function": {"name": "f", "parameters": TYPED}},
                       *TOOLS])


def bound(name: str):
    return PARSERS[name].for_tools(FUNCTIONS)


@pytest.mark.parametrize("name,text", [("glm45", GLM), ("qwen3_coder", QWEN)])
def test_calls_and_content_of_a_whole_reply(name, text):
    pieces = bound(name).parse(text, True)
    assert calls_of(pieces) == CALLS and content_of(pieces) == "Let me check."
    assert calls_of(bound(name).parse(text + "\nDone.", True)) == CALLS
    assert content_of(bound(name).parse(text + "\nDone.", True)) == "Let me check.\nDone."


@pytest.mark.parametrize("text", [QWEN_ONE_BLOCK, QWEN_BARE])
def test_qwen3_coder_reads_several_functions_a_block_and_bare_functions(text):
    pieces = bound("qwen3_coder").parse(text, True)
    assert calls_of(pieces) == CALLS and content_of(pieces) == "Let me check."
    after = bound("qwen3_coder").parse(text + "\nDone.", True)
    assert calls_of(after) == CALLS and content_of(after) == "Let me check.\nDone."
    # a wrapper's close left without its open is no content
    closed = bound("qwen3_coder").parse(QWEN_BARE + "\n</tool_call>", True)
    assert calls_of(closed) == CALLS and content_of(closed) == "Let me check."
    each = QWEN_BARE.replace("</function>", "</function>\n</tool_call>")
    assert calls_of(bound("qwen3_coder").parse(each, True)) == CALLS
    # a bare function is read only once the reply is whole: until then the content before it
    assert bound("qwen3_coder").parse(QWEN_BARE, False) == ["Let me check."]
    assert bound("qwen3_coder").parse("Let me <func", False) == ["Let me"]


@pytest.mark.parametrize("text", [
    "<tool_call><function=w><parameter=city>P</parameter></function> junk</tool_call>",
    "see <function=w><parameter=city>P</parameter>",  # never closed
    "see <function=bad name></function>",
])
def test_qwen3_coder_blocks_and_bare_text_that_are_no_calls_stay_content(text):
    assert bound("qwen3_coder").parse(text, True) == [text]


def test_values_are_typed_by_the_schema():
    glm = ("<tool_call>f\n<arg_key>zip</arg_key><arg_value>0123</arg_value>"
           "<arg_key>n</arg_key><arg_value>5</arg_value>"
           "<arg_key>flag</arg_key><arg_value>true</arg_value>"
           '<arg_key>opts</arg_key><arg_value>{"a": [1, "x"]}</arg_value>'
           "<arg_key>either</arg_key><arg_value>2.5</arg_value>"
           "<arg_key>color</arg_key><arg_value>red</arg_value>"
           "<arg_key>extra</arg_key><arg_value>7</arg_value></tool_call>")
    want = {"zip": "0123", "n": 5, "flag": True, "opts": {"a": [1, "x"]}, "either": 2.5,
            "color": "red"}
    [(name, args)] = calls_of(bound("glm45").parse(glm, True))
    assert name == "f" and args == want | {"extra": 7}  # untyped: read as JSON (vLLM's GLM)
    qwen = "<tool_call><function=f>" + "".join(
        f"<parameter={k}>\n{v if isinstance(v, str) else json.dumps(v)}\n</parameter>"
        for k, v in (want | {"extra": "7"}).items()) + "</function></tool_call>"
    [(name, args)] = calls_of(bound("qwen3_coder").parse(qwen, True))
    assert name == "f" and args == want | {"extra": "7"}  # untyped: the text (vLLM's Qwen)
    assert typed_value("not json", {"type": "integer"}, True) == "not json"
    assert typed_value('"quoted"', {}, True) == "quoted"  # glm45 untyped: read as JSON
    optional = {"anyOf": [{"type": "string"}, {"type": "null"}]}
    assert typed_value("12345", optional, False) == "12345"  # a string it may be: the text
    assert typed_value("null", optional, False) is None
    assert typed_value("3", {"type": ["string", "number"]}, False) == 3


def test_hostile_values_stay_text_and_malformed_schemas_do_no_harm():
    huge, deep = "9" * 5000, "[" * 2000
    for value in (huge, deep, "NaN", "1e999", "[1e999]", "-Infinity"):
        assert typed_value(value, {"type": "number"}, True) == value
        assert typed_value(value, {}, True) == value
    for schema in ({"properties": []}, {"properties": {"a": {"anyOf": 5}}},
                   {"properties": {"a": {"enum": None, "type": 7}}}, "not a schema"):
        parser = PARSERS["glm45"].for_tools({"f": schema})
        text = "<tool_call>f\n<arg_key>a</arg_key><arg_value>1</arg_value></tool_call>"
        assert calls_of(parser.parse(text, True)) == [("f", {"a": 1})]


def test_long_malformed_blocks_parse_in_one_pass():
    """Open values and tags (a cut-short or looping reply) are content, read in one pass (a
    backtracking regex took minutes on the glm45 case)."""
    glm = "<tool_call>f\n" + "".join(f"<arg_key>k{i}</arg_key><arg_value>v{i}\n"
                                      for i in range(3000)) + "</tool_call>"
    qwen = "<tool_call><function=f>" + "<parameter=" * 9000 + "</function></tool_call>"
    for name, text in (("glm45", glm), ("qwen3_coder", qwen)):
        assert bound(name).parse(text, True) == [text]


def test_a_qwen3_coder_value_may_hold_either_tag_and_a_key_comes_once():
    text = ("<tool_call><function=w><parameter=city>\nnotes.md\n</parameter>\n"
            "<parameter=unit>\nUse <parameter=city>x, close with </parameter> then\n"
            "</parameter>\n</function></tool_call>")
    assert calls_of(bound("qwen3_coder").parse(text, True)) == [
        ("w", {"city": "notes.md", "unit": "Use <parameter=city>x, close with </parameter> then"})]
    twice = ("<tool_call><function=w><parameter=city>A</parameter><parameter=city>B"
             "</parameter></function></tool_call>")
    assert bound("qwen3_coder").parse(twice, True) == [twice]
    glm_twice = ("<tool_call>w<arg_key>city</arg_key><arg_value>A</arg_value>"
                 "<arg_key>city</arg_key><arg_value>B</arg_value></tool_call>")
    assert bound("glm45").parse(glm_twice, True) == [glm_twice]


def test_a_parameter_may_leave_its_closing_tag_out_and_values_keep_inner_newlines():
    text = ("<tool_call>\n<function=w>\n<parameter=city>\nLine one\nLine two\n"
            "<parameter=unit>\nC\n</function>\n</tool_call>")
    assert calls_of(bound("qwen3_coder").parse(text, True)) == [
        ("w", {"city": "Line one\nLine two", "unit": "C"})]


@pytest.mark.parametrize("name,text", [
    ("glm45", "<tool_call>w\n<arg_key>x</arg_key>junk</tool_call> kept"),
    ("glm45", "<tool_call>\n</tool_call>"),
    ("glm45", "<tool_call>bad name <arg_key>x</arg_key><arg_value>1</arg_value></tool_call>x"),
    ("qwen3_coder", "<tool_call>no function here</tool_call>"),
    ("qwen3_coder", "<tool_call><function=w>stray<parameter=a>1</parameter></function>"
                    "</tool_call>"),
    ("qwen3_coder", "Only <tool_ talk"),
])
def test_a_block_that_is_no_call_stays_content(name, text):
    assert bound(name).parse(text, True) == [text]


@pytest.mark.parametrize("name,text", [
    ("glm45", GLM), ("glm45", GLM + " after <tool"), ("qwen3_coder", QWEN),
    ("qwen3_coder", "x <tool_call><function=w></function></tool_call> y <tool_call>"),
    ("qwen3_coder", QWEN_ONE_BLOCK), ("qwen3_coder", QWEN_BARE + " then <tool_call>"),
])
def test_parsing_a_growing_text_only_ever_extends_the_pieces(name, text):
    parser, before = bound(name), []
    for end in range(len(text) + 1):
        now = parser.parse(text[:end], False)
        assert now[:max(len(before) - 1, 0)] == before[:-1], (text[:end], before, now)
        if before:
            last, same = before[-1], now[len(before) - 1]
            assert last == same or (isinstance(last, str) and same.startswith(last))
        before = now


@pytest.mark.parametrize("name,text", [("glm45", GLM), ("qwen3_coder", QWEN + "\nDone."),
                                       ("qwen3_coder", QWEN_ONE_BLOCK),
                                       ("qwen3_coder", QWEN_BARE + "\nDone.")])
def test_streamed_deltas_add_up_to_the_whole_reply(name, text):
    plan = ToolPlan("auto", parser=bound(name))
    shaper = ChoiceDeltas(plan)
    deltas = [d for i, char in enumerate(text) for d in shaper.feed(char, i == len(text) - 1)]
    message, reason = plan.reply(text, "stop")
    content, calls = reassembled(deltas)
    assert (content or None) == (message.content or None) and reason == "tool_calls"
    assert calls == [(c.function.name, c.function.arguments) for c in message.tool_calls]


@pytest.mark.parametrize("name,script", [("glm45", GLM), ("qwen3_coder", QWEN),
                                         ("qwen3_coder", QWEN_BARE)])
def test_auto_tool_choice_reads_them_with_the_request_s_schemas(name, script):
    engine = ScriptedEngine(max_model_len=1024)
    engine.script = script
    with serve(engine, tool_call_parser=name) as running:
        sdk = client(running)
        choice = sdk.chat.completions.create(model="fake", messages=ASK, tools=TOOLS)
        calls = [(c.function.name, json.loads(c.function.arguments))
                 for c in choice.choices[0].message.tool_calls]
        assert calls == CALLS and choice.choices[0].finish_reason == "tool_calls"
        with sdk.chat.completions.stream(model="fake", messages=ASK, tools=TOOLS) as stream:
            streamed = stream.get_final_completion().choices[0]
        assert [(c.function.name, json.loads(c.function.arguments))
                for c in streamed.message.tool_calls] == CALLS


def test_python_literals_and_whitespace():
    text = ("<tool_call>f\n<arg_key> flag </arg_key>\n<arg_value> True\n</arg_value>"
            "<arg_key>zip</arg_key><arg_value>\n  0123 \n</arg_value>"
            "<arg_key>either</arg_key><arg_value>None</arg_value></tool_call>")
    [(_, args)] = calls_of(bound("glm45").parse(text, True))
    assert args == {"flag": True, "zip": "\n  0123 \n", "either": None}  # a string as written
    assert typed_value("__import__('os')", {"type": "object"}, True) == "__import__('os')"
    # GLM's markers are read with special tokens kept, as vLLM's parser asks; Qwen's are not
    assert bound("glm45").keeps_special_tokens and not bound("qwen3_coder").keeps_special_tokens
