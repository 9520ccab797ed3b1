"""``LLM.generate`` (``Engine.run_until_done``) beside a started engine and after an
interrupted run: the LLM behind a started ``AsyncEngine`` stepped the groups inline while
their threads did too, corrupting a group (out of service for good); a run cut short by
Ctrl-C left its requests in the engine and a step half done, and the next run took the group
out of service."""

from __future__ import annotations

import asyncio

import pytest

from serving.core.async_engine import AsyncEngine
from tests.helpers import GOLDEN
from xds_jax import LLM, SamplingParams

PARAMS = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
PROMPTS = [{"prompt_token_ids": [5 + i, 9, 200 - i, 31]} for i in range(6)]


def _tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def test_generate_beside_a_started_async_engine_runs_on_its_threads():
    llm = LLM(str(GOLDEN / "llama"), dtype="float32", max_num_seqs=4, use_param_cache=False)
    alone = _tokens(llm.generate(PROMPTS, PARAMS))
    eng = AsyncEngine(llm)
    eng.start()
    try:
        async def both():
            streamed = asyncio.create_task(_last(eng.generate([7, 8, 9], PARAMS, "s")))
            offline = await asyncio.to_thread(llm.generate, PROMPTS, PARAMS)
            return offline, await streamed

        offline, streamed = asyncio.run(asyncio.wait_for(both(), 120))
        assert _tokens(offline) == alone
        assert streamed.finished and len(streamed.outputs[0].token_ids) == 12
        assert eng.can_serve() and all(g.healthy for g in llm.engine.groups)
    finally:
        eng.shutdown()


async def _last(gen):
    return [out async for out in gen][-1]


def test_a_run_cut_short_leaves_the_engine_clean(monkeypatch):
    llm = LLM(str(GOLDEN / "llama"), dtype="float32", max_num_seqs=4, use_param_cache=False)
    alone = _tokens(llm.generate(PROMPTS, PARAMS))
    runner = llm.engine.groups[0].runner
    finish, calls = runner.finish, []

    def interrupted(handle):  # Ctrl-C in the middle of the fifth step
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return finish(handle)

    monkeypatch.setattr(runner, "finish", interrupted)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(PROMPTS, PARAMS)
    group = llm.engine.groups[0]
    assert not group.requests and group.blocks.num_free_blocks == group.config.num_blocks
    assert _tokens(llm.generate(PROMPTS, PARAMS)) == alone
    assert group.healthy


def test_ctrl_c_while_waiting_on_a_started_engine_stops_the_run():
    """A KeyboardInterrupt in LLM.generate beside a started engine: its requests are
    aborted (they ran on, holding KV, and stayed placed for good)."""
    import _thread
    import threading
    import time

    llm = LLM(str(GOLDEN / "llama"), dtype="float32", max_num_seqs=4, use_param_cache=False,
              faults=["group_stall:group=0:seconds=0.02:after_steps=1:times=1000000"])
    eng = AsyncEngine(llm)
    eng.start()
    try:
        waiting = threading.Event()  # interrupt the run only, never the test after it
        threading.Timer(0.5, lambda: waiting.is_set() and _thread.interrupt_main()).start()
        with pytest.raises(KeyboardInterrupt):
            waiting.set()
            try:
                llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=400,
                                                     ignore_eos=True))
            finally:
                waiting.clear()
        group = llm.engine.groups[0]
        deadline = time.monotonic() + 10
        while group.requests and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not group.requests and not llm.engine._placement
    finally:
        eng.shutdown()
