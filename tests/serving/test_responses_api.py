"""OpenAI's Responses API (``/v1/responses``) through the ``openai`` SDK.

Over a fake engine that records each prompt it gets (so the conversation a request amounts to
is checked as text), over a scripted engine for tool calls with the auto parsers, and on the
real engine (tiny golden Llama, byte tokenizer, ChatML): a response's text is the chat route's
reply to the same conversation, streamed or whole, and ``text.format`` constrains it.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.serving.fake_engine import REPLY, FakeEngine, client, serve, wait_for
from tests.serving.real_server import text_server_fixture
from tests.serving.test_tool_calls import CALLS, HERMES, TOOLS, ScriptedEngine


class RecordingEngine(FakeEngine):
    """Writes ``REPLY`` as the fake engine does; keeps each prompt's text."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.prompts: list[str] = []

    async def generate(self, prompt_ids, params, request_id, prompt=None, priority=0,
                       cache_salt=None):
        self.prompts.append(self.tokenizer.decode(prompt_ids))
        async for out in super().generate(prompt_ids, params, request_id, prompt):
            yield out


@pytest.fixture(scope="module")
def fake():
    engine = RecordingEngine(max_model_len=160)
    with serve(engine) as running:
        running.engine = engine
        yield running


@pytest.fixture(scope="module")
def sdk(fake) -> openai.OpenAI:
    return client(fake)


STOP = {"stop": ["."]}  # vLLM's sampling extras pass through: the reply ends at "The answer is 42"


def test_a_string_input_is_a_user_turn_answered_as_one_message(fake, sdk):
    r = sdk.responses.create(model="fake", input="hi", extra_body=STOP)
    assert fake.engine.prompts[-1] == "<user>hi\n<assistant>"
    assert r.object == "response" and r.status == "completed" and r.id.startswith("resp_")
    assert r.output_text == "The answer is 42" and len(r.output) == 1
    message = r.output[0]
    assert message.type == "message" and message.role == "assistant"
    assert message.status == "completed" and message.content[0].type == "output_text"
    assert r.usage.input_tokens == len("<user>hi\n<assistant>")
    assert r.usage.output_tokens == len("The answer is 42.")
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens


def test_max_output_tokens_ends_the_response_incomplete(sdk):
    r = sdk.responses.create(model="fake", input="hi", max_output_tokens=5)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.output_text == REPLY[:5] and r.usage.output_tokens == 5
    assert r.output[0].status == "incomplete"
    with pytest.raises(openai.BadRequestError) as error:
        sdk.responses.create(model="fake", input="hi", max_output_tokens=0)
    assert error.value.param == "max_output_tokens"


def test_instructions_lead_and_items_become_the_conversation(fake, sdk):
    sdk.responses.create(model="fake", instructions="Be brief.", extra_body=STOP, input=[
        {"role": "developer", "content": "Answer in English."},
        {"type": "message", "role": "user",
         "content": [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}]},
        {"type": "function_call", "call_id": "call_1", "name": "w", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"role": "assistant", "content": [{"type": "output_text", "text": "It is sunny."}]},
        {"role": "user", "content": "thanks"}])
    assert fake.engine.prompts[-1] == (
        "<system>Be brief.\n<system>Answer in English.\n<user>ab\n<assistant>\n<tool>sunny\n"
        "<assistant>It is sunny.\n<user>thanks\n<assistant>")


def test_previous_response_id_continues_the_stored_conversation(fake, sdk):
    first = sdk.responses.create(model="fake", input="hi", instructions="Be brief.",
                                 extra_body=STOP)
    second = sdk.responses.create(model="fake", input="more", previous_response_id=first.id,
                                  extra_body=STOP)
    # the earlier instructions do not carry over; its input and output do
    assert fake.engine.prompts[-1] == ("<user>hi\n<assistant>The answer is 42\n<user>more\n"
                                       "<assistant>")
    assert second.previous_response_id == first.id
    third = sdk.responses.create(model="fake", input="again", previous_response_id=second.id,
                                 extra_body=STOP)
    assert fake.engine.prompts[-1].count("<assistant>The answer is 42") == 2
    assert sdk.responses.retrieve(third.id).output_text == third.output_text
    with pytest.raises(openai.NotFoundError) as error:
        sdk.responses.create(model="fake", input="x", previous_response_id="resp_nope")
    assert error.value.param == "previous_response_id"


def test_item_references_name_stored_input_and_output_items(fake, sdk):
    first = sdk.responses.create(model="fake", input="hi", extra_body=STOP)
    asked = sdk.responses.input_items.list(first.id).data[0].id
    sdk.responses.create(model="fake", extra_body=STOP, input=[
        {"type": "item_reference", "id": asked},
        {"type": "item_reference", "id": first.output[0].id},
        {"role": "user", "content": "more"}])
    assert fake.engine.prompts[-1] == ("<user>hi\n<assistant>The answer is 42\n<user>more\n"
                                       "<assistant>")
    sdk.responses.create(model="fake", extra_body=STOP, input=[{"id": asked}])  # type optional
    assert fake.engine.prompts[-1] == "<user>hi\n<assistant>"
    with pytest.raises(openai.BadRequestError) as error:
        sdk.responses.create(model="fake", input=[{"type": "item_reference", "id": "msg_no"}])
    assert error.value.param == "input" and "msg_no" in error.value.message
    with pytest.raises(openai.BadRequestError) as error:
        sdk.responses.create(model="fake", input=[{"type": "item_reference", "id": {"a": 1}}])
    assert error.value.param == "input"


def test_stored_responses_are_read_listed_and_deleted(sdk):
    r = sdk.responses.create(model="fake", input="hi", extra_body=STOP, metadata={"k": "v"})
    got = sdk.responses.retrieve(r.id)
    assert got.id == r.id and got.output_text == r.output_text and got.metadata == {"k": "v"}
    items = sdk.responses.input_items.list(r.id)
    assert [i.content[0].text for i in items.data] == ["hi"] and items.data[0].id
    listed = sdk.responses.create(model="fake", extra_body=STOP, input=[
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
        {"role": "user", "content": [{"type": "input_text", "text": "c"}]}])
    items = sdk.responses.input_items.list(listed.id, order="asc").data  # OpenAI's item types
    assert [(type(i).__name__, i.status, i.content[0].type, i.content[0].text) for i in items] \
        == [("ResponseInputMessageItem", "completed", "input_text", "a"),
            ("ResponseOutputMessage", "completed", "output_text", "b"),
            ("ResponseInputMessageItem", "completed", "input_text", "c")]
    sdk.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve(r.id)
    unstored = sdk.responses.create(model="fake", input="hi", store=False, extra_body=STOP)
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve(unstored.id)


def test_streamed_events_add_up_to_the_whole_response(sdk):
    whole = sdk.responses.create(model="fake", input="hi", extra_body=STOP)
    events = list(sdk.responses.create(model="fake", input="hi", extra_body=STOP, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 1 and "".join(deltas) == whole.output_text
    done = events[-1].response
    assert done.status == "completed" and done.output_text == whole.output_text
    assert done.usage.output_tokens == whole.usage.output_tokens
    with sdk.responses.stream(model="fake", input="hi", extra_body=STOP) as stream:
        assert stream.get_final_response().output_text == whole.output_text
    cut = list(sdk.responses.create(model="fake", input="hi", max_output_tokens=4, stream=True))
    assert cut[-1].type == "response.completed" and cut[-1].response.output_text == REPLY[:4]
    assert cut[-1].response.status == "incomplete"  # as vLLM ends it, and the SDK's helper:
    with sdk.responses.stream(model="fake", input="hi", max_output_tokens=4) as stream:
        final = stream.get_final_response()
    assert final.status == "incomplete" and final.output_text == REPLY[:4]


def test_streamed_logprobs_match_the_whole_response(sdk):
    ask = dict(model="fake", input="hi", extra_body=STOP, top_logprobs=2,
               include=["message.output_text.logprobs"])
    whole = sdk.responses.create(**ask).output[0].content[0].logprobs
    assert [lp.token for lp in whole] == list("The answer is 42.")
    assert all(lp.logprob == -0.5 and [t.token for t in lp.top_logprobs] == [lp.token, "?"]
               for lp in whole)
    events = list(sdk.responses.create(**ask, stream=True))
    pairs = [(lp.token, lp.logprob) for lp in whole]
    streamed = [lp for e in events if e.type == "response.output_text.delta" for lp in e.logprobs]
    # the stop string's token has no text to send; its logprobs come with the text's end
    done = next(e for e in events if e.type == "response.output_text.done")
    assert [(lp.token, lp.logprob) for lp in streamed] == pairs[:-1]
    assert [(lp.token, lp.logprob) for lp in done.logprobs] == pairs


def test_requests_it_cannot_serve_are_400s_naming_the_field(fake, sdk):
    cases = [
        (dict(background=True, store=False), "store"),
        (dict(input=[{"role": "user", "content": [
            {"type": "input_image", "image_url": "http://x/y.png"}]}]), "input"),
        (dict(input=[{"role": "robot", "content": "x"}]), "input"),
        (dict(input=[]), "input"),
        (dict(tools=[{"type": "web_search"}]), "tools"),
        (dict(text={"format": {"type": "json_schema", "name": "x"}}), "text"),
        (dict(tool_choice={"type": "file_search"}), "tool_choice"),
        (dict(truncation="middle"), "truncation"),
        (dict(top_logprobs=21), "top_logprobs"),
        (dict(extra_body={"n": 2}), "n"),
        (dict(include=["bogus"]), "include"),
    ]
    for fields, param in cases:
        with pytest.raises(openai.BadRequestError) as error:
            sdk.responses.create(**({"model": "fake", "input": "hi"} | fields))
        assert error.value.param == param, fields
    # OpenAI's values for tools and inputs this server has none of add nothing
    fine = sdk.responses.create(model="fake", input="hi", include=[
        "reasoning.encrypted_content", "file_search_call.results"])
    assert fine.error is None and fine.output_text
    with pytest.raises(openai.NotFoundError):
        sdk.responses.create(model="nope", input="hi")
    bad = httpx.post(fake.url + "/v1/responses", content=b"{not json")
    assert bad.status_code == 400 and "error" in bad.json()
    # each names the field at fault (they named messages, input[0].content, the whole format)
    for fields, text in [(dict(input=[{"type": "reasoning", "summary": []}]), "input holds no"),
                         (dict(input=[{"type": "function_call_output", "call_id": "c",
                                       "output": {"a": 1}}]), "input[0].output must be"),
                         (dict(text={"format": {"type": "bogus"}}), "got 'bogus'")]:
        with pytest.raises(openai.BadRequestError) as error:
            sdk.responses.create(**({"model": "fake", "input": "hi"} | fields))
        assert text in error.value.message and error.value.param in ("input", "text"), fields
    huge = httpx.post(fake.url + "/v1/responses", headers={"Content-Type": "application/json"},
                      content=b'{"model": "fake", "input": "hi", "seed": 1' + b"0" * 5000 + b"}")
    assert huge.status_code == 400 and "4300 digits" in huge.json()["error"]["message"]


def test_truncation_auto_drops_the_oldest_turns_that_do_not_fit(fake, sdk):
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} " * 4}
             for i in range(9)]
    ask = dict(model="fake", instructions="sys", input=turns, max_output_tokens=8)
    with pytest.raises(openai.BadRequestError) as error:
        sdk.responses.create(**ask)
    assert error.value.code == "context_length_exceeded"
    r = sdk.responses.create(**ask, truncation="auto")
    prompt = fake.engine.prompts[-1]
    assert prompt.startswith("<system>sys\n") and "turn 8" in prompt and "turn 0" not in prompt
    assert r.usage.input_tokens + 8 <= 160 and r.usage.input_tokens == len(prompt)


# -- tool calls with the auto parser -------------------------------------------------------------
RESPONSE_TOOLS = [{"type": "function", **tool["function"]} for tool in TOOLS]


@pytest.fixture(scope="module")
def hermes():
    engine = ScriptedEngine(max_model_len=1024)
    engine.script = HERMES
    with serve(engine, tool_call_parser="hermes") as running:
        yield running


def calls_in(output) -> list[tuple[str, dict]]:
    return [(item.name, json.loads(item.arguments)) for item in output
            if item.type == "function_call"]


def test_auto_tool_calls_are_function_call_items_whole_and_streamed(hermes):
    sdk = client(hermes)
    r = sdk.responses.create(model="fake", input="Tool?", tools=RESPONSE_TOOLS)
    assert [item.type for item in r.output] == ["message", "function_call", "function_call"]
    assert r.output_text == "Let me check." and calls_in(r.output) == CALLS
    assert all(item.call_id and item.status == "completed" for item in r.output[1:])
    with sdk.responses.stream(model="fake", input="Tool?", tools=RESPONSE_TOOLS) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert calls_in(final.output) == CALLS and final.output_text == "Let me check."
    args = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert [(e.name, json.loads(e.arguments)) for e in args] == CALLS
    one = sdk.responses.create(model="fake", input="Tool?", tools=RESPONSE_TOOLS,
                               parallel_tool_calls=False)
    with sdk.responses.stream(model="fake", input="Tool?", tools=RESPONSE_TOOLS,
                              parallel_tool_calls=False) as stream:
        streamed = stream.get_final_response()
    assert calls_in(one.output) == calls_in(streamed.output) == CALLS[:1]  # the first only
    # the calls' answers continue the conversation
    follow = sdk.responses.create(model="fake", previous_response_id=r.id, tools=RESPONSE_TOOLS,
                                  input=[{"type": "function_call_output", "call_id": item.call_id,
                                          "output": "ok"} for item in r.output[1:]])
    assert follow.status == "completed"


def test_a_call_cut_by_max_output_tokens_is_incomplete():
    """The last item is the one max_output_tokens cut: a function call there was marked
    completed with half its arguments (a message before it is whole)."""
    from serving.entrypoints import openai_protocol as api
    from serving.entrypoints.responses_output import output_items

    call = api.ToolCall(id="c1", function=api.FunctionCall(name="f", arguments='{"a": '))
    message = api.ChatMessage(role="assistant", content="Let me check.", tool_calls=[call])
    items = output_items(message, [], "incomplete")
    assert [(i["type"], i["status"]) for i in items] == [("message", "completed"),
                                                         ("function_call", "incomplete")]
    assert output_items(message, [], "completed")[-1]["status"] == "completed"


# -- the real engine -----------------------------------------------------------------------------
tiny = text_server_fixture()


def test_a_response_is_the_chat_reply_to_the_same_conversation(tiny):
    sdk = client(tiny)
    model = tiny.engine.model_name
    ask = dict(temperature=0, extra_body={"ignore_eos": True})
    chat = sdk.chat.completions.create(
        model=model, max_tokens=8, **ask,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}])
    r = sdk.responses.create(model=model, instructions="Be brief.", input="hi",
                             max_output_tokens=8, **ask)
    assert r.output_text == chat.choices[0].message.content and r.status == "incomplete"
    assert r.usage.input_tokens == chat.usage.prompt_tokens and r.usage.output_tokens == 8
    with sdk.responses.stream(model=model, instructions="Be brief.", input="hi",
                              max_output_tokens=8, **ask) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
    assert "".join(deltas) == r.output_text
    queued = sdk.responses.create(model=model, instructions="Be brief.", input="hi",
                                  max_output_tokens=8, background=True, **ask)
    assert queued.status == "queued" and queued.background
    assert wait_for(lambda: sdk.responses.retrieve(queued.id).status == "incomplete", 60)
    assert sdk.responses.retrieve(queued.id).output_text == r.output_text


def test_text_format_json_schema_constrains_the_output(tiny):
    schema = {"type": "object", "additionalProperties": False, "required": ["n"],
              "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}}
    r = client(tiny).responses.create(
        model=tiny.engine.model_name, input="a number", max_output_tokens=40, temperature=0,
        text={"format": {"type": "json_schema", "name": "n", "schema": schema}},
        extra_body={"structured_outputs": {"disable_any_whitespace": True}})
    value = json.loads(r.output_text)
    assert set(value) == {"n"} and 0 <= value["n"] <= 9
    with pytest.raises(openai.BadRequestError) as error:
        client(tiny).responses.create(model=tiny.engine.model_name, input="x", text={
            "format": {"type": "json_schema", "name": "x", "schema": {"type": "nonsense"}}})
    assert error.value.param == "text" and "400 - text.format.schema: " in error.value.message
