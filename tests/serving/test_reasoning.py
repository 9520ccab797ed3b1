"""Reasoning parsers (``--reasoning-parser``, ``serving/entrypoints/reasoning.py``): a thinking
model's chat reply split into ``reasoning_content`` and ``content``, whole and streamed (over a
scripted engine writing one character a step, so every tag arrives split), with tool calls read
from the answer only, and not where an output constraint holds from the first token."""

from __future__ import annotations

import json
import random

import pytest

from serving.entrypoints.reasoning import PARSERS, ReasoningSplit, reasoning_parser
from serving.entrypoints.server import build_app
from tests.serving.fake_engine import client, serve
from tests.serving.test_tool_calls import CALLS, HERMES, TOOLS, ScriptedEngine
from xds_jax.errors import ConfigError

ASK = [{"role": "user", "content": "Paris weather?"}]
THOUGHT = "The user asks about <weather>; a <tool_call> here is only a thought."


@pytest.fixture(scope="module", params=["deepseek_r1", "qwen3"])
def server(request):
    engine = ScriptedEngine(max_model_len=1024)
    with serve(engine, tool_call_parser="hermes", reasoning_parser=request.param) as running:
        running.engine, running.parser = engine, request.param
        yield running


def chat(server, script: str, **kwargs):
    server.engine.script = script
    return client(server).chat.completions.create(model="fake", messages=ASK, **kwargs)


def streamed(server, script: str, **kwargs) -> tuple[str, str, list]:
    server.engine.script = script
    reasoning = content = ""
    calls = []
    for chunk in client(server).chat.completions.create(model="fake", messages=ASK,
                                                        stream=True, **kwargs):
        delta = chunk.choices[0].delta
        reasoning += getattr(delta, "reasoning_content", None) or ""
        content += delta.content or ""
        calls += delta.tool_calls or []
    return reasoning, content, calls


@pytest.mark.parametrize("opening", ["<think>", "<think>\n", ""])
def test_a_thought_then_an_answer(server, opening):
    script = f"{opening}{THOUGHT}</think>\n\nIt is sunny."
    m = chat(server, script).choices[0].message
    if not opening and server.parser == "qwen3":  # qwen3 thinks only in an opened block
        assert m.content == script and getattr(m, "reasoning_content", None) is None
        return
    thought = (opening + THOUGHT)[len("<think>"):] if opening else THOUGHT
    assert m.reasoning_content == thought and m.content == "\n\nIt is sunny."
    assert streamed(server, script) == (thought, "\n\nIt is sunny.", [])


def test_an_unclosed_thought_and_a_plain_answer(server):
    m = chat(server, "<think>still thinking", max_tokens=16).choices[0].message
    assert m.reasoning_content == "still thi" and m.content is None
    m = chat(server, "Just an answer.").choices[0].message
    if server.parser == "deepseek_r1":  # the block opened in the prompt: all of it thought
        assert m.reasoning_content == "Just an answer." and m.content is None
    else:
        assert m.content == "Just an answer." and "reasoning_content" not in m.model_dump(
            exclude_none=True)


def test_tool_calls_come_from_the_answer_only(server):
    script = f"<think>{THOUGHT}</think>{HERMES}"
    r = chat(server, script, tools=TOOLS)
    m = r.choices[0].message
    assert m.reasoning_content == THOUGHT and r.choices[0].finish_reason == "tool_calls"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in m.tool_calls] == CALLS
    assert m.content == "Let me check."
    reasoning, content, calls = streamed(server, script, tools=TOOLS)
    assert reasoning == THOUGHT and content.strip() == "Let me check."
    assert [c.function.name for c in calls if c.function.name] == ["w", "add"]


def test_include_reasoning_false_drops_it(server):
    script = f"<think>{THOUGHT}</think>Sunny."
    m = chat(server, script, extra_body={"include_reasoning": False}).choices[0].message
    assert m.content == "Sunny." and getattr(m, "reasoning_content", None) is None
    assert streamed(server, script, extra_body={"include_reasoning": False}) == ("", "Sunny.",
                                                                                 [])


def test_a_constrained_reply_is_not_split(server):
    server.engine.script = '{"a": 1}'
    m = client(server).chat.completions.create(
        model="fake", messages=ASK, response_format={"type": "json_object"}).choices[0].message
    assert m.content == '{"a": 1}' and getattr(m, "reasoning_content", None) is None


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_any_chunking_splits_as_the_whole(name):
    parser = PARSERS[name]
    rng = random.Random(0)
    texts = ["<think>a</think>b", "  <think>x</thi", "abc</think>", "<thi", "</think>",
             "<think></think>", "plain", "a</thin", "<think>a</think>b</think>c", ""]
    for text in texts:
        want_reasoning, want_answer = parser.split(text)
        for _ in range(20):
            cuts = sorted(rng.sample(range(len(text) + 1), min(3, len(text) + 1)))
            pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)], strict=True)]
            split, reasoning, answer = ReasoningSplit(parser), "", ""
            for i, piece in enumerate(pieces):
                r, a = split.feed(piece, i == len(pieces) - 1)
                reasoning, answer = reasoning + r, answer + a
            assert (reasoning, answer) == (want_reasoning or "", want_answer), (text, pieces)


def test_an_unknown_parser_is_refused():
    with pytest.raises(ConfigError, match="reasoning-parser"):
        reasoning_parser("nope")
    with pytest.raises(ConfigError):
        build_app(ScriptedEngine(), reasoning_parser="nope")


def test_responses_answer_a_reasoning_item_first(server):
    server.engine.script = f"<think>{THOUGHT}</think>Sunny."
    sdk = client(server)
    r = sdk.responses.create(model="fake", input="Paris weather?")
    assert [i.type for i in r.output] == ["reasoning", "message"]
    assert r.output[0].content[0].text == THOUGHT and r.output_text == "Sunny."
    events = list(sdk.responses.create(model="fake", input="Paris weather?", stream=True))
    thought = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert thought == THOUGHT
    done = events[-1].response
    assert [i.type for i in done.output] == ["reasoning", "message"]
    assert done.output_text == "Sunny." and done.output[0].content[0].text == THOUGHT
    follow = sdk.responses.create(model="fake", input="And tomorrow?", previous_response_id=r.id)
    assert follow.status == "completed"  # the reasoning item is not carried into the prompt
    server.engine.script = "<think>only a thought"
    only = sdk.responses.create(model="fake", input="x", max_output_tokens=12)
    streamed = list(sdk.responses.create(model="fake", input="x", max_output_tokens=12,
                                         stream=True))[-1].response
    assert [i.type for i in only.output] == [i.type for i in streamed.output] == [
        "reasoning", "message"]
    assert only.output_text == streamed.output_text == ""


class Utf8ScriptedEngine(ScriptedEngine):
    """Writes ``script`` one UTF-8 byte a step (DeepSeek's markers are not ASCII); keeps the
    sampling parameters it was sent."""

    def _step(self, s, step, params) -> None:
        data = self.script.encode()
        s.token_ids.append(data[step] + 3)
        s.text = bytes(t - 3 for t in s.token_ids).decode(errors="ignore")
        self.params = params
        if step + 1 == len(data):
            s.finish_reason = "stop"
        elif step + 1 == params.max_tokens:
            s.finish_reason = "length"


def test_deepseek_r1_thinks_then_calls_tools():
    from tests.serving.test_tool_calls import DEEPSEEK_V3

    engine = Utf8ScriptedEngine(max_model_len=2048)
    engine.script = f"{THOUGHT}</think>\n\n{DEEPSEEK_V3}"
    with serve(engine, tool_call_parser="deepseek_v3", reasoning_parser="deepseek_r1") as running:
        sdk = client(running)
        r = sdk.chat.completions.create(model="fake", messages=ASK, tools=TOOLS)
        assert engine.params.skip_special_tokens is False  # the markers are special tokens
        m = r.choices[0].message
        assert m.reasoning_content == THOUGHT and m.content.strip() == "Let me check."
        assert [(c.function.name, json.loads(c.function.arguments))
                for c in m.tool_calls] == CALLS
        assert r.choices[0].finish_reason == "tool_calls"
        with sdk.chat.completions.stream(model="fake", messages=ASK, tools=TOOLS) as stream:
            final = stream.get_final_completion().choices[0]
        assert [(c.function.name, json.loads(c.function.arguments))
                for c in final.message.tool_calls] == CALLS
        plain = sdk.chat.completions.create(model="fake", messages=ASK)
        assert engine.params.skip_special_tokens is True  # no tools: as the request asked
        assert plain.choices[0].message.reasoning_content == THOUGHT


def test_deepseek_v3_thinks_only_where_the_template_switch_is_on():
    engine = ScriptedEngine(max_model_len=1024)
    engine.script = f"{THOUGHT}</think>Sunny."
    with serve(engine, reasoning_parser="deepseek_v3") as running:
        sdk = client(running)
        on = sdk.chat.completions.create(model="fake", messages=ASK, extra_body={
            "chat_template_kwargs": {"thinking": True}}).choices[0].message
        assert on.reasoning_content == THOUGHT and on.content == "Sunny."
        engine.script = "Sunny, no thinking."
        off = sdk.chat.completions.create(model="fake", messages=ASK).choices[0].message
        assert off.content == "Sunny, no thinking." and getattr(
            off, "reasoning_content", None) is None
