"""An abort ends a request's stream at once even while its DP group is stalled (a hang shorter
than the heartbeat timeout): the client's timeout, disconnect or a shutdown's drain must not
wait for the group's next step."""

from __future__ import annotations

import asyncio
import time

import pytest

from serving.core.async_engine import AsyncEngine, EngineArgs
from tests.helpers import GOLDEN
from tests.serving.fake_engine import wait_for
from xds_jax import SamplingParams
from xds_jax.sampling.beam_search import BeamSearchParams


@pytest.mark.parametrize("beams", [False, True])
def test_an_abort_ends_the_stream_while_its_group_is_stalled(beams):
    engine = AsyncEngine.from_args(EngineArgs(
        model=str(GOLDEN / "llama"), dtype="float32", kv_cache_bytes=8 << 20,
        faults=["group_stall:group=0:seconds=60:after_steps=2"], heartbeat_timeout_s=None))
    engine.start()
    params = SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)
    try:
        async def run():
            outs = []

            async def consume():
                stream = (engine.beam_search([5, 9, 200, 31], BeamSearchParams(
                    beam_width=2, max_tokens=50, ignore_eos=True), "r1") if beams
                    else engine.generate([5, 9, 200, 31], params, "r1"))
                async for out in stream:
                    outs.append(out)

            task = asyncio.create_task(consume())
            stalled = await asyncio.to_thread(
                wait_for, lambda: engine.engine.faults.injected == 1, 60)
            assert stalled
            start = time.monotonic()
            engine.abort("r1")
            await asyncio.wait_for(task, 10)
            return outs, time.monotonic() - start

        outs, took = asyncio.run(run())
        assert took < 5, took  # not the stall's 60 s
        final = outs[-1]
        assert final.finished and final.outputs[0].finish_reason == "abort"
        assert len(final.outputs[0].token_ids) < 50
    finally:
        engine.shutdown()  # ends the stall
