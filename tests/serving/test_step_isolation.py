"""Failed steps whose fault shows in decode only, or in a batch only: isolation still ends.

A poison request whose decode steps raise (its prefill passes) fails alone; requests whose
decode steps raise only when batched together (each passes alone) all finish, run one at a
time, exactly as without the fault. Before the suspects were cleared only by a step of the
kind that failed, both livelocked: a suspect's rolled-back recompute (a prefill) cleared it,
and the batch failed again, forever.
"""

from __future__ import annotations

import threading

import pytest

from serving.core.runner import ModelRunner
from tests.helpers import GOLDEN
from xds_jax import LLM, SamplingParams

POISON = 7
PARAMS = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
PROMPTS = [[5, 9, 10, 11], [POISON, 9, 10], [6, 9, 10, 12, 13]]


def _decodes(scheduled) -> list:
    return [s for s in scheduled if not s.is_prefill]


def _run(llm: LLM, prompts: list[list[int]], seconds: float = 300) -> list:
    """``llm.generate`` in a thread that must end (a livelock fails the test)."""
    result: list = []
    worker = threading.Thread(target=lambda: result.extend(llm.generate(
        [{"prompt_token_ids": p} for p in prompts], PARAMS)), daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        pytest.fail("generate never ended: the group retried a failing batch forever")
    return result


@pytest.fixture(scope="module")
def llm():
    return LLM(str(GOLDEN / "llama"), dtype="float32", max_num_seqs=4, use_param_cache=False)


@pytest.fixture(scope="module")
def expected(llm):
    return {tuple(p): llm.generate({"prompt_token_ids": p}, PARAMS)[0].outputs[0].token_ids
            for p in PROMPTS}


def test_a_request_failing_in_decode_only_fails_alone(llm, expected, monkeypatch):
    launch = ModelRunner.launch

    def poisoned(self, scheduled, after=None):
        if any(s.seq.prompt_ids[0] == POISON for s in _decodes(scheduled)):
            raise RuntimeError("injected decode failure")
        return launch(self, scheduled, after)

    monkeypatch.setattr(ModelRunner, "launch", poisoned)
    group = llm.engine.groups[0]
    failed = group.requests_failed
    out = _run(llm, PROMPTS)
    assert out[1].outputs[0].finish_reason == "abort"
    assert "injected decode failure" in out[1].error
    for i in (0, 2):
        assert out[i].outputs[0].token_ids == expected[tuple(PROMPTS[i])]
    assert group.requests_failed == failed + 1
    assert llm.engine.stats()["kv_usage"] == 0


def test_requests_failing_only_batched_all_finish_one_at_a_time(llm, expected, monkeypatch):
    launch = ModelRunner.launch

    def batch_fault(self, scheduled, after=None):
        if len({s.seq.seq_id for s in _decodes(scheduled)}) > 1:
            raise MemoryError("injected: out of memory at this batch")
        return launch(self, scheduled, after)

    monkeypatch.setattr(ModelRunner, "launch", batch_fault)
    group = llm.engine.groups[0]
    failed = group.requests_failed
    prompts = [p for p in PROMPTS if p[0] != POISON]
    out = _run(llm, prompts)
    assert [o.outputs[0].token_ids for o in out] == [expected[tuple(p)] for p in prompts]
    assert group.requests_failed == failed and group.healthy
    assert not group._suspects and llm.engine.stats()["kv_usage"] == 0
