"""``use_beam_search`` (vLLM's extra field) through the ``openai`` SDK on the real engine (the
tiny golden Llama, byte tokenizer): ``n`` beams answered best first, the beams
``LLM.beam_search`` finds on the same weights, streamed or whole, in both routes; fields beam
search would not honour are 400s naming them; a client that leaves stops the search."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from tests.helpers import GOLDEN
from tests.serving.fake_engine import client, wait_for
from tests.serving.real_server import text_server_fixture
from xds_jax import LLM, BeamSearchParams, SamplingParams

real = text_server_fixture()
slow = text_server_fixture(faults=["group_stall:group=0:seconds=0.2:after_steps=1:times=1000000"])
PROMPT = [5, 6, 7, 8]
BEAMS = dict(extra_body={"use_beam_search": True, "ignore_eos": True}, n=3, max_tokens=6)


@pytest.fixture(scope="module")
def library_beams():
    llm = LLM(str(GOLDEN / "llama"), dtype="float32", max_num_seqs=8, use_param_cache=False)
    out = llm.beam_search({"prompt_token_ids": PROMPT},
                          BeamSearchParams(beam_width=3, max_tokens=6, ignore_eos=True))
    return [s.tokens[len(PROMPT):] for s in out[0].sequences]


def test_completions_answer_the_library_s_beams_best_first(real, library_beams):
    sdk = client(real)
    tok = real.engine.tokenizer
    r = sdk.completions.create(model=real.engine.model_name, prompt=PROMPT, logprobs=2, **BEAMS)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.text for c in r.choices] == [tok.decode(b) for b in library_beams]
    sums = [sum(c.logprobs.token_logprobs) for c in r.choices]
    assert sums == sorted(sums, reverse=True)  # equal lengths: best first by their sum
    assert all(len(c.logprobs.tokens) == 6 and c.finish_reason == "length" for c in r.choices)
    assert all(len(top) <= 3 for c in r.choices for top in c.logprobs.top_logprobs)
    assert r.usage.prompt_tokens == len(PROMPT)
    streamed = {}
    for chunk in sdk.completions.create(model=real.engine.model_name, prompt=PROMPT,
                                        stream=True, **BEAMS):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert [streamed[i] for i in range(3)] == [c.text for c in r.choices]
    echoed = sdk.completions.create(model=real.engine.model_name, prompt=PROMPT, echo=True,
                                    **BEAMS)
    assert [c.text for c in echoed.choices] == [tok.decode(PROMPT) + c.text for c in r.choices]
    scored = sdk.completions.create(model=real.engine.model_name, prompt=PROMPT, echo=True,
                                    logprobs=1, **BEAMS)
    plain = sdk.completions.create(model=real.engine.model_name, prompt=PROMPT, echo=True,
                                   logprobs=1, max_tokens=1, temperature=0)
    prompt_part = plain.choices[0].logprobs.token_logprobs[:len(PROMPT)]
    for c in scored.choices:  # the echoed prompt's log-probabilities, as without beams
        assert c.logprobs.token_logprobs[:len(PROMPT)] == prompt_part
        assert len(c.logprobs.token_logprobs) == len(PROMPT) + 6


def test_chat_answers_n_beams(real):
    sdk = client(real)
    r = sdk.chat.completions.create(model=real.engine.model_name, max_tokens=5, n=2,
                                    messages=[{"role": "user", "content": "hi"}],
                                    extra_body={"use_beam_search": True, "ignore_eos": True,
                                                "length_penalty": 0.5})
    assert len(r.choices) == 2 and r.choices[0].message.content != r.choices[1].message.content
    assert all(c.finish_reason == "length" for c in r.choices)


def test_fields_beam_search_does_not_honour_are_400s(real):
    sdk = client(real)
    ask = dict(model=real.engine.model_name, prompt=PROMPT, max_tokens=4)
    cases = [({"stop": ["x"]}, "stop"), ({"logit_bias": {"5": 1}}, "logit_bias"),
             ({"top_p": 0.5}, "top_p"), ({"presence_penalty": 1.0}, "presence_penalty"),
             ({"structured_outputs": {"regex": "a+"}}, "structured_outputs"),
             ({"n": 11}, "n"), ({"max_tokens": 0}, "max_tokens")]
    for fields, param in cases:
        extra = {"use_beam_search": True} | {k: v for k, v in fields.items() if k != "n"}
        with pytest.raises(openai.BadRequestError) as error:
            sdk.completions.create(**(ask | {"n": fields.get("n", 2)}), extra_body=extra)
        assert error.value.param == param, fields
    assert real.engine.stats()["admitted_seqs"] == 0


def test_a_client_that_leaves_stops_the_search(slow):
    body = {"model": slow.engine.model_name, "prompt": PROMPT, "max_tokens": 100, "n": 2,
            "use_beam_search": True, "ignore_eos": True}
    with pytest.raises(httpx.TimeoutException):  # 100 rounds of >= 0.2 s steps: >= 20 s
        httpx.post(slow.url + "/v1/completions", json=body, timeout=1.0)
    assert wait_for(lambda: not slow.engine._beams and slow.engine.stats()["admitted_seqs"] == 0,
                    seconds=10)
    assert wait_for(lambda: slow.engine.stats()["num_running"] == 0
                    and slow.engine.stats()["num_waiting"] == 0, seconds=10)


def test_an_abort_that_comes_before_the_request_still_stops_it(real):
    """A client may leave while its prompt is still read: the abort comes first, and the
    request (plain or a beam search) the server announced (``expect``) ends at once when it
    is submitted. An id never announced, or one that has ended, keeps nothing against a later
    request of that id (vLLM's abort of an unknown id is a no-op; such an abort killed the
    next request of the id)."""
    engine = real.engine

    async def outputs(gen):
        return [out async for out in gen]

    engine.expect(["early-plain", "early-beams"])
    engine.abort("early-plain")
    (out,) = asyncio.run(outputs(engine.generate(
        PROMPT, SamplingParams(max_tokens=50, ignore_eos=True), "early-plain")))
    assert out.finished and out.outputs[0].finish_reason == "abort"
    assert out.outputs[0].token_ids == []
    engine.abort("early-beams")
    (out,) = asyncio.run(outputs(engine.beam_search(
        PROMPT, BeamSearchParams(beam_width=2, max_tokens=50, ignore_eos=True), "early-beams")))
    assert [c.finish_reason for c in out.outputs] == ["abort"]
    assert not engine._beams and engine.stats()["num_running"] == 0
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    asyncio.run(outputs(engine.generate(PROMPT, params, "reused")))
    engine.abort("reused")  # after it ended: nothing is kept against a later request
    (again,) = asyncio.run(outputs(engine.generate(PROMPT, params, "reused")))[-1:]
    assert again.outputs[0].finish_reason == "length"
    engine.abort("never-seen")  # an id no one announced: a no-op
    (fresh,) = asyncio.run(outputs(engine.generate(PROMPT, params, "never-seen")))[-1:]
    assert fresh.outputs[0].finish_reason == "length"
