"""A grammar that gives up mid-generation (llguidance's lexer past its limits: a regex such as
``b{1000}{1000}`` passes the up-front check, then fails after a token or two) is a 400 naming
``structured_outputs`` with the grammar's message; it was a 200 ending in "abort" with no
word of why."""

from __future__ import annotations

import asyncio

import pytest

from serving.core.async_engine import AsyncEngine
from tests.helpers import GOLDEN
from xds_jax import LLM, SamplingParams
from xds_jax.errors import SamplingParamsError
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
