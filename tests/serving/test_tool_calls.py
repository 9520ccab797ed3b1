"""Tool calling in chat completions through the ``openai`` SDK, as vLLM serves it.

Named and required ``tool_choice`` run on the tiny golden Llama with random weights and a byte
tokenizer: its free text is noise, so arguments that parse and match the schema show the
constraint was honoured (bounded schemas; whitespace biased away as in
``test_structured_server``). ``tool_choice: "auto"`` runs over a fake engine that writes a
scripted reply, since no tiny model writes tool calls: the parsers must find the calls, keep
the content, and stream what the SDK reassembles into the same message. Unit tests of the
parsers and of the stream shaping on strings come first.
"""

from __future__ import annotations

import json

import openai
import pytest

from serving.entrypoints import cli
from serving.entrypoints.openai_protocol import DeltaMessage
from serving.entrypoints.server import build_app
from serving.entrypoints.tool_calls import PARSERS, ChoiceDeltas, ToolPlan, required_calls
from serving.entrypoints.tool_parsers import ParsedCall
from tests.serving.fake_engine import FakeEngine, client, serve
from tests.serving.real_server import text_server_fixture
from xds_jax.errors import ConfigError

tiny = text_server_fixture()
ASK = [{"role": "user", "content": "Tool?"}]
WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
           "properties": {"city": {"enum": ["Paris", "Oslo"]}, "unit": {"enum": ["C", "F"]}}}
ADD = {"type": "object", "additionalProperties": False, "required": ["a", "b"],
       "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                      "b": {"type": "integer", "minimum": 0, "maximum": 99}}}
TOOLS = [{"type": "function", "function": {"name": "w", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "description": "a + b",
                                           "parameters": ADD}}]
NAMED_W = {"type": "function", "function": {"name": "w"}}

HERMES = ('Let me check.\n<tool_call>\n{"name": "w", "arguments": {"city": "Paris"}}\n'
          '</tool_call>\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n'
          "</tool_call>")
LLAMA = ('<|python_tag|>{"name": "w", "parameters": {"city": "Paris"}}; '
         '{"name": "add", "parameters": {"a": 1, "b": 2}}')
CALLS = [("w", {"city": "Paris"}), ("add", {"a": 1, "b": 2})]
B, E = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
C, CE, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
DEEPSEEK_V3 = (f"Let me check.{B}{C}function{SEP}w\n```json\n{{\"city\": \"Paris\"}}\n```{CE}"
               f"{C}function{SEP}add\n```json\n{{\"a\": 1, \"b\": 2}}\n```{CE}{E}")
DEEPSEEK_V31 = (f"Let me check.{B}{C}w{SEP}{{\"city\": \"Paris\"}}{CE}"
                f"{C}add{SEP}{{\"a\": 1, \"b\": 2}}{CE}{E}")


# -- parsers on strings -----------------------------------------------------------------------
def calls_of(pieces) -> list[tuple[str, dict]]:
    return [(p.name, json.loads(p.arguments)) for p in pieces if isinstance(p, ParsedCall)]


def content_of(pieces) -> str:
    return "".join(p for p in pieces if isinstance(p, str))


@pytest.mark.parametrize("name,text,calls,content", [
    ("hermes", HERMES, CALLS, "Let me check."),
    ("hermes", '<tool_call>{"name": "w", "arguments": {}}</tool_call>\nDone.  ',
     [("w", {})], "Done.  "),
    ("hermes", 'A <tool_call>{"name": "w", "arguments": {"x": "}<"}}', [("w", {"x": "}<"})],
     "A"),  # the last block may be left unclosed
    ("hermes", "No calls, only <tool_ talk.\n", [], "No calls, only <tool_ talk.\n"),
    ("hermes", "<tool_call>not json</tool_call> kept", [], "<tool_call>not json</tool_call> kept"),
    ("llama3_json", LLAMA, CALLS, ""),
    ("llama3_json", ' {"name": "w", "arguments": {"city": "Oslo"}} and a remark',
     [("w", {"city": "Oslo"})], "and a remark"),
    ("llama3_json", '{"answer": 42}', [], '{"answer": 42}'),
    ("llama3_json", "Plain words; {not a call}", [], "Plain words; {not a call}"),
    ("llama3_json", '{"name": "w", "parameters": {}}; {"oops": 1}', [("w", {})], '{"oops": 1}'),
    ("deepseek_v3", DEEPSEEK_V3, CALLS, "Let me check."),
    ("deepseek_v3", DEEPSEEK_V3 + " Done.", CALLS, "Let me check.\nDone."),
    ("deepseek_v3", f"{B}{C}function{SEP}w\nnot fenced{CE}{E}", [],
     f"{B}{C}function{SEP}w\nnot fenced{CE}{E}"),
    ("deepseek_v3", "No calls <｜tool▁ here.", [], "No calls <｜tool▁ here."),
    ("deepseek_v31", DEEPSEEK_V31, CALLS, "Let me check."),
    ("deepseek_v31", f"{B}{C}w{SEP}{{broken{CE}{E}", [], f"{B}{C}w{SEP}{{broken{CE}{E}"),
    # a 4300+ digit integer or deep nesting is no call (json.loads raised past the parsers)
    ("hermes", '<tool_call>{"name": "w", "arguments": {"n": ' + "9" * 5000 + "}}</tool_call>",
     [], '<tool_call>{"name": "w", "arguments": {"n": ' + "9" * 5000 + "}}</tool_call>"),
    ("deepseek_v31", f"{B}{C}w{SEP}" + "[" * 3000 + f"{CE}{E}", [],
     f"{B}{C}w{SEP}" + "[" * 3000 + f"{CE}{E}"),
])
def test_parsers_find_calls_and_keep_content(name, text, calls, content):
    pieces = PARSERS[name].parse(text, True)
    assert calls_of(pieces) == calls and content_of(pieces) == content
    if not calls:
        assert pieces == [text]  # a reply without calls is left as it is


@pytest.mark.parametrize("name,text", [
    ("hermes", HERMES), ("hermes", "Plain <tool_call>x</tool_call> end <tool"),
    ("hermes", 'x <tool_call>{"name": "w", "arguments": {}}</tool_call> y <tool_call>'),
    ("llama3_json", LLAMA), ("llama3_json", '{"name": "w", "parameters": {}} ; tail'),
    ("llama3_json", "<|python_tag|>"), ("llama3_json", "  hello {}"),
    ("deepseek_v3", DEEPSEEK_V3), ("deepseek_v3", DEEPSEEK_V3 + " and after"),
    ("deepseek_v31", DEEPSEEK_V31), ("deepseek_v31", f"text {B}{C}w{SEP}{{}}"),
    ("deepseek_v3", f"Hi {B}{C}function{SEP}f\n```json\n{{bad}}\n```{CE}{E}"),
    ("deepseek_v3", f"Hi {B}{E} after"),
])
def test_parsing_a_growing_text_only_ever_extends_the_pieces(name, text):
    """What a stream sent stays true: each longer prefix's pieces extend the shorter's."""
    before: list = []
    for end in range(len(text) + 1):
        now = PARSERS[name].parse(text[:end], False)
        assert now[:max(len(before) - 1, 0)] == before[:-1], (text[:end], before, now)
        if before:
            last, same = before[-1], now[len(before) - 1]
            assert last == same or (isinstance(last, str) and same.startswith(last))
        before = now
    final = PARSERS[name].parse(text, True)
    assert final[:max(len(before) - 1, 0)] == before[:-1]


def reassembled(deltas: list[DeltaMessage]) -> tuple[str, list[tuple[str, str]]]:
    """What a client makes of deltas: the content and each call's name and arguments."""
    content, calls = "", {}
    for delta in deltas:
        data = delta.model_dump()
        content += data.get("content") or ""
        for piece in data.get("tool_calls", []):
            call = calls.setdefault(piece["index"], {"name": "", "arguments": ""})
            if "id" in piece:
                assert piece["id"].startswith("chatcmpl-tool-") and piece["type"] == "function"
                assert "name" in piece["function"] and not call["name"]
            for key in ("name", "arguments"):
                call[key] += piece.get("function", {}).get(key, "")
    return content, [(c["name"], c["arguments"]) for _, c in sorted(calls.items())]


@pytest.mark.parametrize("plan,text", [
    (ToolPlan("auto", parser=PARSERS["hermes"]), HERMES),
    (ToolPlan("auto", parser=PARSERS["hermes"]), "No calls here.\n"),
    (ToolPlan("auto", parser=PARSERS["hermes"], single_call=True), HERMES),
    (ToolPlan("auto", parser=PARSERS["deepseek_v31"], single_call=True), DEEPSEEK_V31),
    (ToolPlan("auto", parser=PARSERS["llama3_json"]), LLAMA),
    (ToolPlan("auto", parser=PARSERS["deepseek_v3"]), DEEPSEEK_V3),
    (ToolPlan("auto", parser=PARSERS["deepseek_v31"]), DEEPSEEK_V31 + "\nDone."),
    (ToolPlan("auto", parser=PARSERS["deepseek_v3"]),
     f"Hi {B}{C}function{SEP}f\n```json\n{{bad}}\n```{CE}{E}"),  # no call: all content
    (ToolPlan("auto", parser=PARSERS["deepseek_v31"]),
     f"Hi {B}{C}w{SEP}{{}}{CE}{C}x{SEP}{{bad{CE}{C}add{SEP}{{}}{CE}{E} end"),
    (ToolPlan("auto", parser=PARSERS["deepseek_v3"]), f"Hi {B}{E} after"),
    (ToolPlan("named", name="w"), '{"city": "Oslo", "unit": "C"}'),
    (ToolPlan("required"), '[{"name": "w", "parameters": {"city": "Oslo"}}, '
                           '{"name": "add", "parameters": {"a": 1, "b": 2}}]'),
])
def test_streamed_deltas_add_up_to_the_whole_reply(plan, text):
    shaper = ChoiceDeltas(plan)
    deltas = [d for i, char in enumerate(text) for d in shaper.feed(char, i == len(text) - 1)]
    message, reason = plan.reply(text, "stop")
    content, calls = reassembled(deltas)
    assert (content or None) == (message.content or None)
    assert calls == [(c.function.name, c.function.arguments) for c in message.tool_calls or []]
    assert shaper.finish_reason("stop") == reason
    if plan.single_call and "add" in text:
        assert [name for name, _ in calls] == ["w"]  # parallel_tool_calls false: the first


def test_required_calls_are_the_complete_items_only():
    text = '[{"name": "w", "parameters": {"city": "Oslo"}}, {"name": "add", "paramet'
    assert required_calls(text) == [ParsedCall("w", '{"city": "Oslo"}')]
    assert required_calls("") == required_calls("[") == []


# -- named and required choice on the tiny model ----------------------------------------------
@pytest.fixture(scope="module")
def sdk(tiny) -> openai.OpenAI:
    return client(tiny)


def chat_kwargs(server, **kwargs) -> dict:
    """A request's arguments: whitespace biased away (random weights love it)."""
    no_space = {str(t): -100 for t in server.engine.tokenizer.encode(" \n\t\r", False)}
    return dict(model=server.engine.model_name, messages=ASK, max_tokens=200, seed=0,
                logit_bias=no_space, tools=TOOLS) | kwargs


def chat(server, sdk, **kwargs):
    return sdk.chat.completions.create(**chat_kwargs(server, **kwargs))


def assert_arguments(name: str, arguments: str) -> None:
    value = json.loads(arguments)
    if name == "w":
        assert value["city"] in ("Paris", "Oslo") and value["unit"] in ("C", "F"), value
        assert set(value) == {"city", "unit"}
    else:
        assert set(value) == {"a", "b"} and all(type(v) is int and 0 <= v <= 99
                                                for v in value.values()), value


def test_named_tool_choice_answers_one_call_of_that_function(tiny, sdk):
    reply = chat(tiny, sdk, tool_choice=NAMED_W).choices[0]
    (call,) = reply.message.tool_calls
    assert call.id.startswith("chatcmpl-tool-") and call.type == "function"
    assert call.function.name == "w" and reply.message.content in ("", None)
    assert_arguments("w", call.function.arguments)
    assert reply.finish_reason == "stop"


def test_named_tool_choice_streams_the_arguments(tiny, sdk):
    chunks = list(chat(tiny, sdk, tool_choice=NAMED_W, stream=True))
    pieces = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    first = pieces[0]
    assert first.index == 0 and first.id.startswith("chatcmpl-tool-")
    assert first.type == "function" and first.function.name == "w"
    assert first.function.arguments == "" and all(p.id is None for p in pieces[1:])
    arguments = "".join(p.function.arguments for p in pieces)
    assert_arguments("w", arguments)
    assert chunks[-1].choices[0].finish_reason == "stop"
    whole = chat(tiny, sdk, tool_choice=NAMED_W).choices[0].message.tool_calls[0]
    assert whole.function.arguments == arguments  # same seed, same tokens


def test_required_tool_choice_answers_calls_of_the_tools(tiny, sdk):
    reply = chat(tiny, sdk, tool_choice="required", n=2, temperature=1.0)
    for choice in reply.choices:
        if choice.finish_reason == "stop":  # else max_tokens cut a further call short
            assert choice.message.tool_calls
        for call in choice.message.tool_calls or []:
            assert call.function.name in ("w", "add") and call.id.startswith("chatcmpl-tool-")
            assert_arguments(call.function.name, call.function.arguments)
    one = chat(tiny, sdk, tool_choice="required", parallel_tool_calls=False).choices[0]
    assert len(one.message.tool_calls) == 1 and one.finish_reason == "stop"


def test_required_tool_choice_streams_what_the_sdk_reassembles(tiny, sdk):
    kwargs = dict(tool_choice="required", parallel_tool_calls=False)
    with sdk.chat.completions.stream(**chat_kwargs(tiny, **kwargs)) as stream:
        streamed = stream.get_final_completion().choices[0]
    whole = chat(tiny, sdk, **kwargs).choices[0]
    assert [(c.function.name, c.function.arguments) for c in streamed.message.tool_calls] == \
        [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    assert streamed.finish_reason == whole.finish_reason == "stop"


def test_parameters_that_do_not_compile_are_a_400_on_tools(tiny, sdk):
    broken = [{"type": "function",
               "function": {"name": "w", "parameters": {"type": "no-such-type"}}}]
    message = bad_request(lambda: chat(tiny, sdk, tools=broken, tool_choice=NAMED_W), "tools")
    assert message.startswith("tools: "), message


# -- auto choice over scripted replies ----------------------------------------------------------
class ScriptedEngine(FakeEngine):
    """Writes ``script`` whatever the prompt, one byte token a step, then stops."""

    script = ""

    def _step(self, s, step, params) -> None:
        s.token_ids.append(ord(self.script[step]) + 3)
        s.text += self.script[step]
        if step + 1 == len(self.script):
            s.finish_reason = "stop"
        elif step + 1 == params.max_tokens:
            s.finish_reason = "length"


@pytest.fixture(scope="module", params=["hermes", "llama3_json"])
def auto(request):
    engine = ScriptedEngine(max_model_len=1024)
    with serve(engine, tool_call_parser=request.param) as running:
        running.engine, running.parser = engine, request.param
        yield running


def auto_chat(server, script: str, **kwargs):
    server.engine.script = script
    return client(server).chat.completions.create(model="fake", messages=ASK, tools=TOOLS,
                                                  **kwargs)


def streamed_message(server, script: str, **kwargs):
    server.engine.script = script
    with client(server).chat.completions.stream(model="fake", messages=ASK, tools=TOOLS,
                                                **kwargs) as stream:
        return stream.get_final_completion().choices[0]


def test_auto_finds_the_calls_and_keeps_the_content(auto):
    script = HERMES if auto.parser == "hermes" else LLAMA
    choice = auto_chat(auto, script).choices[0]
    calls = [(c.function.name, json.loads(c.function.arguments))
             for c in choice.message.tool_calls]
    assert calls == CALLS and choice.finish_reason == "tool_calls"
    assert all(c.id.startswith("chatcmpl-tool-") for c in choice.message.tool_calls)
    assert choice.message.content == ("Let me check." if auto.parser == "hermes" else None)
    streamed = streamed_message(auto, script)
    assert streamed.finish_reason == "tool_calls"
    assert (streamed.message.content or None) == choice.message.content
    assert [(c.function.name, c.function.arguments) for c in streamed.message.tool_calls] == \
        [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]
    for one in (auto_chat(auto, script, parallel_tool_calls=False).choices[0],  # first only
                streamed_message(auto, script, parallel_tool_calls=False)):
        assert [(c.function.name, c.function.arguments) for c in one.message.tool_calls] == \
            [(c.function.name, c.function.arguments) for c in choice.message.tool_calls[:1]]
        assert one.finish_reason == "tool_calls"


@pytest.mark.parametrize("script", ["Just words, no calls.", "<tool_call>oops</tool_call>",
                                    '{"name": 3}'])
def test_auto_without_calls_is_plain_text(auto, script):
    choice = auto_chat(auto, script, tool_choice="auto").choices[0]
    assert choice.message.content == script and not choice.message.tool_calls
    assert choice.finish_reason == "stop"
    streamed = streamed_message(auto, script)
    assert streamed.message.content == script and not streamed.message.tool_calls
    assert streamed.finish_reason == "stop"


def test_auto_streams_content_before_the_call_and_holds_the_marker(auto):
    if auto.parser != "hermes":
        pytest.skip("llama3_json replies are calls from their first character")
    auto.engine.script = HERMES
    chunks = list(client(auto).chat.completions.create(model="fake", messages=ASK,
                                                        tools=TOOLS, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == "Let me check."
    assert not any("<" in (d.content or "") for d in deltas)
    opening = [t for d in deltas for t in d.tool_calls or [] if t.id]
    assert [(t.index, t.function.name, t.function.arguments) for t in opening] == \
        [(0, "w", ""), (1, "add", "")]


# -- what is refused ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fake():
    with serve(FakeEngine()) as running:
        yield running


def bad_request(call, param: str) -> str:
    with pytest.raises(openai.BadRequestError) as caught:
        call()
    error = caught.value.body
    assert caught.value.status_code == 400 and error["param"] == param, error
    return error["message"]


def fake_chat(server, **kwargs):
    return client(server).chat.completions.create(model="fake", messages=ASK, max_tokens=4,
                                                  **kwargs)


def test_auto_needs_the_server_flags(fake):
    for kwargs in (dict(tools=TOOLS), dict(tools=TOOLS, tool_choice="auto")):
        message = bad_request(lambda kwargs=kwargs: fake_chat(fake, **kwargs), "tool_choice")
        assert "--enable-auto-tool-choice and --tool-call-parser" in message
    reply = fake_chat(fake, tools=TOOLS, tool_choice="none").choices[0]
    assert reply.message.content and not reply.message.tool_calls
    assert fake_chat(fake, tool_choice="auto").choices[0].message.content  # no tools: text


@pytest.mark.parametrize("tools,named", [
    ([{"type": "retrieval"}], "type must be 'function'"),
    ([{"type": "function"}], "function is required"),
    ([{"type": "function", "function": {"parameters": {}}}], "name must be a non-empty"),
    ([{"type": "function", "function": {"name": "f", "parameters": "{}"}}],
     "parameters must be a JSON schema object"),
    ([{"type": "function", "function": {"name": "f"}}] * 2, "is given twice"),
])
def test_malformed_tools_are_a_400_on_tools(fake, tools, named):
    message = bad_request(lambda: fake_chat(fake, tools=tools, tool_choice="none"), "tools")
    assert message.startswith("tools[") and named in message, message


@pytest.mark.parametrize("kwargs,named", [
    (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "g"}}),
     "not in tools"),
    (dict(tools=TOOLS, tool_choice="sometimes"), "tool_choice must be"),
    (dict(tools=TOOLS, tool_choice={"type": "function"}), "tool_choice must be"),
    (dict(tool_choice="required"), "needs tools"),
    (dict(tool_choice=NAMED_W), "needs tools"),
    (dict(tools=TOOLS, tool_choice="required", response_format={"type": "json_object"}),
     "response_format and tool_choice"),
    (dict(tools=TOOLS, tool_choice=NAMED_W, extra_body={"guided_regex": "a"}),
     "guided_regex and tool_choice"),
])
def test_bad_tool_choice_is_a_400_on_tool_choice(fake, kwargs, named):
    message = bad_request(lambda: fake_chat(fake, **kwargs), "tool_choice")
    assert named in message, message


def test_the_parser_is_checked_at_startup(capsys):
    with pytest.raises(ConfigError, match="hermes, llama3_json"):
        build_app(FakeEngine(), tool_call_parser="mistral")
    with pytest.raises(SystemExit):
        cli.main(["serve", "--tool-call-parser", "mistral"])
    assert "invalid choice: 'mistral'" in capsys.readouterr().err
    assert cli.main(["serve", "--enable-auto-tool-choice"]) == 1  # before loading a model
    assert "needs --tool-call-parser, one of hermes" in capsys.readouterr().err
