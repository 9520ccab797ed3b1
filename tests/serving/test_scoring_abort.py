"""A request with ``prompt_logprobs`` (lm-eval's loglikelihood: echo + logprobs) aborted while
its prompt waits for the scorer or is being scored: its stream ends at once, a prompt still
waiting is never scored, and later scoring requests do not queue behind abandoned ones.
Before, the abort was seen only once scoring had finished: 16 abandoned long prompts held a
4-token scoring request back 80 s, and ``--request-timeout`` answered after the scoring."""

from __future__ import annotations

import asyncio
import threading
import time

import jax
import pytest

from serving.core import prompt_scoring
from serving.core.async_engine import AsyncEngine, EngineArgs
from tests.helpers import GOLDEN, tiny
from xds_jax import SamplingParams

SCORE = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1)


def test_an_aborted_scoring_request_ends_now_and_its_queued_prompt_is_never_scored(
        monkeypatch):
    eng = AsyncEngine.from_args(EngineArgs(model=str(GOLDEN / "llama"), dtype="float32",
                                           kv_cache_bytes=8 << 20, heartbeat_timeout_s=None))
    eng.start()
    scored: list[int] = []
    real = prompt_scoring.score_tokens

    def counting(params, tokens, **kw):
        scored.append(int(tokens.shape[0]))
        return real(params, tokens, **kw)

    monkeypatch.setattr(prompt_scoring, "score_tokens", counting)
    scorer = eng.scoring.scorers[0]
    try:
        async def run():
            scorer.lock.acquire()  # the scorer is busy with another prompt
            try:
                outs = []

                async def consume():
                    async for out in eng.generate(list(range(5, 40)), SCORE, "gone"):
                        outs.append(out)

                task = asyncio.create_task(consume())
                await asyncio.sleep(0.3)
                assert not task.done()  # waiting for the scorer
                start = time.monotonic()
                eng.abort("gone")
                await asyncio.wait_for(task, 5)
                waited = time.monotonic() - start
            finally:
                scorer.lock.release()
            fresh = [out async for out in eng.generate([5, 9, 200, 31], SCORE, "next")]
            return outs, waited, fresh

        outs, waited, fresh = asyncio.run(asyncio.wait_for(run(), 120))
    finally:
        eng.shutdown()
    assert waited < 2  # not the scorer's time
    final = outs[-1]
    assert final.finished and final.outputs[0].finish_reason == "abort"
    assert final.prompt_logprobs is None
    # the abandoned 35-token prompt (bucket 64) never ran; the next request's did (bucket 16)
    assert scored == [16]
    logprobs = fresh[-1].prompt_logprobs
    assert logprobs[0] is None and len(logprobs) == 4 and all(logprobs[1:])


def test_a_cancelled_prompt_is_skipped_by_the_scorer():
    """``PromptScorer.raw`` refuses a prompt whose request was aborted while it waited."""
    model = tiny("llama")
    scorer = prompt_scoring.PromptScorer(model.params, model.cfg, jax.devices()[0], None)
    cancelled = threading.Event()
    assert len(scorer.score([1, 2, 3], 1, cancelled)) == 3
    cancelled.set()
    with pytest.raises(prompt_scoring.ScoringCancelled):
        scorer.score([1, 2, 3], 1, cancelled)
