"""A grammar that gives up mid-generation (llguidance's lexer past its limits: a regex such as
``b{1000}{1000}`` passes the up-front check, then fails after a token or two) is a 400 naming
``structured_outputs`` with the grammar's message; it was a 200 ending in "abort" with no
word of why. A failure's kind is carried as its exception (``RequestOutput.failure``)."""

from __future__ import annotations

import asyncio

import pytest

from serving.core.async_engine import AsyncEngine
from serving.core.balancer import NoHealthyGroupError
from serving.core.request import Request
from serving.core.request_outcomes import RequestFailedError, request_failure
from tests.helpers import GOLDEN
from xds_jax import LLM, SamplingParams
from xds_jax.errors import SamplingParamsError
from xds_jax.outputs import RequestOutput
from xds_jax.sampling import structured
from xds_jax.text.byte_tokenizer import byte_tokenizer

LIMIT = "lexer error: too many expressions constructed"


def test_a_grammar_that_gives_up_is_an_error_naming_it(monkeypatch):
    consumed: list[int] = []
    consume = structured.GrammarState.consume

    def counted(self, token):
        consumed.append(token)
        consume(self, token)

    monkeypatch.setattr(structured.GrammarState, "consume", counted)
    monkeypatch.setattr(structured.GrammarState, "error",
                        property(lambda self: LIMIT if len(consumed) >= 2 else None))
    llm = LLM(str(GOLDEN / "llama"), dtype="float32", use_param_cache=False)
    llm.tokenizer = byte_tokenizer(llm.cfg)
    eng = AsyncEngine(llm)
    eng.start()
    params = SamplingParams(temperature=0, max_tokens=20, structured_outputs={"regex": "[a-z]+"})
    try:
        async def run():
            return [out async for out in eng.generate(llm.tokenizer.encode("hi"), params)]

        with pytest.raises(SamplingParamsError, match=f"structured_outputs: {LIMIT}"):
            asyncio.run(asyncio.wait_for(run(), 120))
    finally:
        eng.shutdown()
    out = llm.generate([{"prompt_token_ids": [5, 6]}], params)[0]  # the offline API says so too
    assert out.outputs[0].finish_reason == "abort" and LIMIT in out.error
    assert isinstance(out.failure, SamplingParamsError)


def test_a_failure_is_told_by_its_class_not_its_text():
    """The caller of ``AsyncEngine.generate`` gets an error the engine names as itself (the
    server answers its kind), anything else as ``RequestFailedError`` (500), whatever its
    message says: the kind was read from the message's first word before."""
    def failed_with(error: Exception) -> RequestOutput:
        request = Request("r", None, [1, 2], SamplingParams(), [])
        request.fail(error)
        return request.snapshot()

    named = request_failure("r", failed_with(NoHealthyGroupError("no group is in service")))
    assert type(named) is NoHealthyGroupError and str(named) == "no group is in service"
    grammar = request_failure("r", failed_with(SamplingParamsError("structured_outputs: x")))
    assert type(grammar) is SamplingParamsError
    for text in ("structured_outputs: x", "NoHealthyGroupError: x"):
        other = request_failure("r", failed_with(RuntimeError(text)))
        assert type(other) is RequestFailedError
        assert str(other) == f"request r failed: RuntimeError: {text}"
