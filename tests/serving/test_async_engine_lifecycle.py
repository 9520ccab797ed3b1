"""``AsyncEngine`` used from an app, as vLLM's ``AsyncLLM``: a shut-down engine refuses new
requests (``EngineDeadError``) and ends the streams still running (both hung), and the id of
a request still running is refused (``DuplicateRequestError``: the second stream hung after
an abort of the id)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from serving.core.async_engine import (
    AsyncEngine,
    DuplicateRequestError,
    EngineArgs,
    EngineDeadError,
)
from tests.helpers import GOLDEN
from xds_jax import SamplingParams
from xds_jax.sampling.beam_search import BeamSearchParams

SLOW = "group_stall:group=0:seconds=0.05:after_steps=1:times=1000000"  # 50 ms a step
PARAMS = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)


def engine() -> AsyncEngine:
    running = AsyncEngine.from_args(EngineArgs(
        model=str(GOLDEN / "llama"), dtype="float32", kv_cache_bytes=8 << 20, faults=[SLOW],
        heartbeat_timeout_s=None))
    running.start()
    return running


def test_shutdown_ends_running_streams_and_refuses_new_requests():
    eng = engine()

    async def run():
        outs: list = []

        async def consume():
            async for out in eng.generate([5, 9, 200, 31], PARAMS, "r1"):
                outs.append(out)

        task = asyncio.create_task(consume())
        while not outs:
            await asyncio.sleep(0.01)
        await asyncio.to_thread(eng.shutdown)
        await asyncio.wait_for(task, 10)
        with pytest.raises(EngineDeadError, match="shut down"):
            await anext(eng.generate([5, 9], PARAMS))
        with pytest.raises(EngineDeadError):
            await anext(eng.beam_search([5, 9], BeamSearchParams(beam_width=2, max_tokens=4)))
        return outs

    outs = asyncio.run(run())
    final = outs[-1].outputs[0]
    assert outs[-1].finished and final.finish_reason == "abort" and len(final.token_ids) < 200
    with pytest.raises(EngineDeadError, match="cannot be started again"):
        eng.start()  # it restarted the engine's threads, which then ran for nothing
    stats = eng.stats()  # what shutdown aborted is gone (it counted as running)
    assert stats["num_running"] == stats["num_waiting"] == 0
    assert stats["kv_free_blocks"] == stats["kv_total_blocks"]


def test_the_id_of_a_running_request_is_refused():
    eng = engine()
    short = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    try:
        async def run():
            first = eng.generate([5, 9, 200, 31], PARAMS, "dup")
            opened = await anext(first)
            with pytest.raises(DuplicateRequestError, match="'dup' is already running"):
                await anext(eng.generate([7, 8], PARAMS, "dup"))
            eng.abort("dup")
            rest = [out async for out in first]
            again = [out async for out in eng.generate([7, 8], short, "dup")]  # free again
            return opened, rest, again

        opened, rest, again = asyncio.run(asyncio.wait_for(run(), 60))
        assert not opened.finished and rest[-1].outputs[0].finish_reason == "abort"
        assert again[-1].finished and len(again[-1].outputs[0].token_ids) == 3
    finally:
        eng.shutdown()


def test_prompts_in_vllm_forms_and_bad_ones_named():
    """``generate`` takes what vLLM's ``AsyncLLM.generate`` takes besides token ids (a
    string, ``{"prompt": ...}``, ``{"prompt_token_ids": ...}``, a numpy array) and refuses
    what ``LLM.generate`` refuses (floats, booleans as ids) with ``InvalidPromptError``; they
    were a TypeError deep inside, or ran with float ids. ``abort`` may be awaited, and takes
    several ids, as vLLM's coroutine does; ``output_kind`` streams deltas or the final output
    only (vLLM's ``RequestOutputKind``; it was a TypeError)."""
    from xds_jax import LLM, RequestOutputKind
    from xds_jax.errors import InvalidPromptError

    eng = AsyncEngine(LLM("smollm2", dtype="float32", max_num_seqs=4))
    eng.start()
    short = SamplingParams(max_tokens=2, temperature=0)
    ids = eng.tokenizer.encode("Hello there", add_special_tokens=True)
    try:
        async def last(prompt, params=short, request_id=None):
            return [out async for out in eng.generate(prompt, params, request_id)][-1]

        async def run():
            outs = [await last(p) for p in ("Hello there", {"prompt": "Hello there"},
                                            {"prompt_token_ids": ids}, np.array(ids),
                                            [np.int64(t) for t in ids])]
            for bad, words in (([5.5, 9.7], "list of integers"), ([True, 9], "list of integers"),
                               (7, "list of integers"), ({"text": "x"}, "'prompt' or")):
                with pytest.raises(InvalidPromptError, match=words):
                    await last(bad)
            default = await last(ids, None)  # no params: the defaults (16 tokens at most)
            gen = eng.generate(ids, PARAMS, "a1")
            await anext(gen)
            await eng.abort(["a1", "never-seen"])
            rest = [out async for out in gen]
            kinds = {}
            for kind in RequestOutputKind:
                params = SamplingParams(max_tokens=12, temperature=0.8, seed=3, n=2, logprobs=1,
                                        ignore_eos=True, output_kind=kind)
                kinds[kind] = [out async for out in eng.generate(ids, params)]
            await eng.check_health()
            assert eng.is_running and not eng.errored and await eng.get_tokenizer() is not None
            return outs, default, rest, kinds

        outs, default, rest, kinds = asyncio.run(asyncio.wait_for(run(), 120))
        whole = kinds[RequestOutputKind.CUMULATIVE][-1]
        final_only = kinds[RequestOutputKind.FINAL_ONLY]  # one output, the finished one
        assert len(final_only) == 1 and final_only[0].outputs == whole.outputs
        deltas = kinds[RequestOutputKind.DELTA]  # what each adds: together, the whole
        assert len(deltas) > 2 and deltas[-1].finished
        for c in whole.outputs:
            mine = [d for out in deltas for d in out.outputs if d.index == c.index]
            assert "".join(d.text for d in mine) == c.text
            assert [t for d in mine for t in d.token_ids] == c.token_ids
            assert [lp for d in mine for lp in d.logprobs] == c.logprobs
            assert [d.finish_reason for d in mine].count("length") == 1
        assert len({tuple(o.outputs[0].token_ids) for o in outs}) == 1
        assert [o.prompt for o in outs] == ["Hello there", "Hello there", None, None, None]
        assert all(o.prompt_token_ids == ids for o in outs)
        assert default.finished and 1 <= len(default.outputs[0].token_ids) <= 16
        assert rest[-1].outputs[0].finish_reason == "abort"
    finally:
        eng.shutdown()


def test_ids_never_collide_and_vllms_call_shape_starts_the_engine():
    """The engine's own ids were "req-0", "req-1", ...: a caller's stream named "req-0" and
    an unnamed one ran under one id (an abort ended the wrong one, the other hung holding KV).
    A request id placed already is refused at the engine too (an ``LLM.generate`` request's
    "seq-N"). ``generate`` before ``start`` hung; it starts the engine, and takes vLLM's
    keywords (``prompt``, ``sampling_params``); ``embed`` takes every prompt form."""
    from serving.core.request import Request

    eng = AsyncEngine.from_args(EngineArgs(
        model=str(GOLDEN / "llama"), dtype="float32", kv_cache_bytes=8 << 20, faults=[SLOW],
        heartbeat_timeout_s=None))  # not started
    short = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    try:
        async def run():
            named = eng.generate(prompt={"prompt_token_ids": [5, 9, 200]}, sampling_params=PARAMS,
                                 request_id="req-0")
            await anext(named)
            assert eng.is_running
            unnamed = [out async for out in eng.generate([7, 8], short)]
            clash = Request.of_sequence(eng.llm.make_sequences([4, 5], short)[0])
            clash.request_id = "req-0"
            with pytest.raises(DuplicateRequestError, match="'req-0' is already running"):
                eng.engine.submit(clash)
            await eng.abort("req-0")
            rest = [out async for out in named]
            embedded = [await eng.embed(p)
                        for p in ([5, 9, 200], {"prompt_token_ids": [5, 9, 200]})]
            return unnamed, rest, embedded

        unnamed, rest, embedded = asyncio.run(asyncio.wait_for(run(), 60))
        assert unnamed[-1].request_id != "req-0" and len(unnamed[-1].outputs[0].token_ids) == 3
        assert rest[-1].outputs[0].finish_reason == "abort"
        np.testing.assert_array_equal(embedded[0], embedded[1])
        stats = eng.stats()
        assert stats["num_running"] == 0 and stats["kv_free_blocks"] == stats["kv_total_blocks"]
    finally:
        eng.shutdown()


def test_a_refused_duplicate_leaves_the_request_holding_the_id_alone(monkeypatch):
    """An id placed at the engine while ``generate`` scored its prompt (another loop, an
    ``LLM.generate`` request) is refused there, and the request holding it runs on: the
    refused stream's cleanup aborted it."""
    from serving.core.request import Request

    eng = engine()
    long = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    holder = Request.of_sequence(eng.llm.make_sequences([4, 5, 6], long)[0])
    holder.request_id = "X"
    scored = eng._score_prompt

    async def place_meanwhile(request_id, prompt_ids, top_n):
        eng.engine.submit(holder)  # the id is taken while this request's prompt scores
        return await scored(request_id, prompt_ids, top_n)

    monkeypatch.setattr(eng, "_score_prompt", place_meanwhile)
    try:
        async def run():
            with pytest.raises(DuplicateRequestError, match="'X' is already running"):
                await anext(eng.generate([7, 8, 9], SamplingParams(max_tokens=2,
                                                                   prompt_logprobs=1), "X"))
            while not holder.finished:
                await asyncio.sleep(0.05)

        asyncio.run(asyncio.wait_for(run(), 60))
        out = holder.seqs[0].output()
        assert out.finish_reason == "length" and len(out.token_ids) == 12
    finally:
        eng.shutdown()
