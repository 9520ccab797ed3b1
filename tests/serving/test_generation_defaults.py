"""The server fills the sampling fields a request leaves unset from the model's generation
config (vLLM's --generation-config), and caps max_tokens by its max_new_tokens."""

from __future__ import annotations

import httpx
import pytest

from tests.serving.fake_engine import FakeEngine, client, serve
from tests.serving.real_server import text_server_fixture

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


class ParamsEngine(FakeEngine):
    """The fake engine with sampling defaults, keeping each generate call's SamplingParams."""

    def __init__(self, defaults: dict):
        super().__init__(max_model_len=64)
        self.sampling_defaults, self.seen = defaults, []

    async def generate(self, prompt_ids, params, request_id, prompt=None, priority=0,
                       cache_salt=None):
        self.seen.append(params)
        async for out in super().generate(prompt_ids, params, request_id, prompt):
            yield out


@pytest.mark.parametrize("route, body", [
    ("/v1/chat/completions", CHAT),
    ("/v1/completions", {"prompt": "hi"}),
    ("/v1/responses", {"input": "hi"}),
])
def test_unset_fields_take_the_models_values_and_set_ones_win(route, body):
    engine = ParamsEngine({"temperature": 0.6, "top_p": 0.95, "top_k": 20, "max_tokens": 3})
    with serve(engine) as running, httpx.Client(base_url=running.url, timeout=30) as http:
        assert http.post(route, json=body).status_code == 200
        own = {"temperature": 0.2, "top_k": 5}
        assert http.post(route, json=body | own).status_code == 200
    model, mine = engine.seen
    assert (model.temperature, model.top_p, model.top_k, model.max_tokens) == (0.6, 0.95, 20, 3)
    assert (mine.temperature, mine.top_p, mine.top_k) == (0.2, 0.95, 5)
    assert model.min_p == mine.min_p == 0.0  # not in the config: the engine's default


@pytest.mark.parametrize("route, body, field", [
    ("/v1/chat/completions", CHAT, "max_tokens"),
    ("/v1/chat/completions", CHAT, "max_completion_tokens"),
    ("/v1/completions", {"prompt": "hi"}, "max_tokens"),
    ("/v1/responses", {"input": "hi"}, "max_output_tokens"),
])
def test_max_new_tokens_caps_what_a_request_asks_for(route, body, field):
    engine = ParamsEngine({"max_tokens": 4})
    with serve(engine) as running, httpx.Client(base_url=running.url, timeout=30) as http:
        assert http.post(route, json=body | {field: 10}).status_code == 200
        assert http.post(route, json=body | {field: 2}).status_code == 200
        # the context check still sees the request's own number
        too_long = http.post(route, json=body | {field: 500})
        assert too_long.status_code == 400 and field in too_long.text
    assert [p.max_tokens for p in engine.seen] == [4, 2]


def test_without_defaults_nothing_changes():
    engine = ParamsEngine({})
    with serve(engine) as running, httpx.Client(base_url=running.url, timeout=30) as http:
        assert http.post("/v1/chat/completions", json=CHAT).status_code == 200
        assert http.post("/v1/completions", json={"prompt": "hi"}).status_code == 200
    chat, completion = engine.seen
    assert (chat.temperature, chat.top_p, chat.top_k) == (1.0, 1.0, 0)
    assert chat.max_tokens == 64 - len("<user>hi\n<assistant>")  # all the room left
    assert completion.max_tokens == 16  # OpenAI's and vLLM's completions default


greedy_server = text_server_fixture(generation_config="vllm",
                                    override_generation_config={"temperature": 0.0,
                                                                "max_new_tokens": 4})


def test_the_real_engine_samples_by_the_override(greedy_server):
    sdk = client(greedy_server)
    model = sdk.models.list().data[0].id
    messages = [{"role": "user", "content": "tell me a story"}]
    default = sdk.chat.completions.create(model=model, messages=messages)
    greedy = sdk.chat.completions.create(model=model, messages=messages, temperature=0,
                                         max_tokens=4)
    assert default.usage.completion_tokens == 4 and default.choices[0].finish_reason == "length"
    assert default.choices[0].message.content == greedy.choices[0].message.content
    capped = sdk.completions.create(model=model, prompt="once", max_tokens=12)
    assert capped.usage.completion_tokens == 4


def test_truncation_to_the_context_leaves_room_for_the_capped_output(greedy_server):
    sdk = client(greedy_server)
    model, ids = sdk.models.list().data[0].id, list(range(3, 303))  # 300 ids, context 256
    limit = greedy_server.engine.max_model_len
    # no max_tokens: room for the model's max_new_tokens (4)
    long_chat = [{"role": "user", "content": "x" * 400}]
    out = sdk.chat.completions.create(model=model, messages=long_chat,
                                      extra_body={"truncate_prompt_tokens": -1})
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (limit - 4, 4)
    # a request's own max_tokens is what the context must hold (checked before the cap, as
    # vLLM checks it), so the cut leaves room for it
    own = sdk.completions.create(model=model, prompt=ids, max_tokens=100,
                                 extra_body={"truncate_prompt_tokens": -1})
    assert (own.usage.prompt_tokens, own.usage.completion_tokens) == (limit - 100, 4)
