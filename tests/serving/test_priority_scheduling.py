"""Priority scheduling end to end on the tiny golden Llama: a late high-priority request takes
a seat from a running low-priority one and finishes first; the preempted one is recomputed
and ends with the tokens it would have had alone. ``LLM.generate(priority=...)``, and the
server's ``priority`` field (a 400 naming it where the engine schedules first come, first
served), the OpenAI SDK's ``extra_body`` included."""

from __future__ import annotations

from types import SimpleNamespace

import httpx
import openai
import pytest

from serving.core.kv_cache import BlockManager
from serving.core.request import Request
from serving.core.scheduler import Scheduler
from serving.disagg.pd import DecodeGroup
from tests.helpers import GOLDEN
from tests.serving.fake_engine import FakeEngine, serve, wait_for
from tests.serving.real_server import text_server_fixture
from tests.serving.test_engine import params_for, reference, workload
from tests.serving.test_faults import assert_pools_whole
from xds_jax import LLM, SamplingParams
from xds_jax.errors import SamplingParamsError
from xds_jax.generate import LocalGenerator
from xds_jax.outputs import RequestOutput
from xds_jax.sequence import Sequence


def engine(policy: str, **options) -> LLM:
    return LLM(str(GOLDEN / "llama"), dtype="float32", max_num_seqs=2,
               max_num_batched_tokens=48, staged=True, use_param_cache=False,
               scheduling_policy=policy, **options)


@pytest.fixture(scope="module")
def llm() -> LLM:
    return engine("priority")


def alone(llm: LLM, prompt: list[int], params: SamplingParams) -> list[int]:
    """The request's tokens through the single-device loop, by itself."""
    seq = Sequence(prompt, params)
    LocalGenerator(llm.params, llm.cfg).run([seq])
    return seq.output_ids


def test_a_late_high_priority_request_preempts_and_finishes_first(llm):
    prompts = workload(llm.cfg.vocab_size, 3, seed=7)  # 73 (two chunks), 34 and 23 tokens
    budgets = [16, 14, 5]
    finished: list[str] = []

    def request(i: int, priority: int) -> Request:
        def seen(out: RequestOutput) -> None:
            if out.finished:
                finished.append(out.request_id)

        params = SamplingParams(temperature=0, max_tokens=budgets[i], ignore_eos=True)
        return Request(f"r{i}", None, prompts[i], params,
                       llm.make_sequences(prompts[i], params, priority), on_output=seen)

    engine, group = llm.engine, llm.engine.groups[0]
    low = [request(0, 3), request(1, 2)]
    for r in low:
        engine.submit(r)
    while not all(s.output_ids for r in low for s in r.seqs):  # both decoding, both seats
        group.step()
    high = request(2, -1)
    engine.submit(high)
    group.step()
    assert group.scheduler.num_preemptions == 1  # r0, the lowest priority, gave its seat
    assert [s.seq_id for s in group.scheduler.waiting] == [low[0].seqs[0].seq_id]
    while not all(r.finished for r in (*low, high)):
        group.step()
    assert finished == ["r2", "r1", "r0"]  # r2 came last, when both others were running
    for i, r in enumerate((*low, high)):
        assert r.seqs[0].output_ids == alone(llm, prompts[i], r.params)
        engine.release(r.request_id)
    assert_pools_whole(engine)


def test_generate_takes_one_priority_a_prompt(llm):
    prompts = [{"prompt_token_ids": p} for p in workload(llm.cfg.vocab_size, 4, seed=3)]
    params = [params_for(i) for i in range(4)]
    out = llm.generate(prompts, params, priority=[1, -2, 0, 1])
    assert [o.outputs[0].token_ids for o in out] == reference(
        llm, [p["prompt_token_ids"] for p in prompts])
    with pytest.raises(ValueError, match="got 3 priorities for 4 prompts"):
        llm.generate(prompts, params, priority=[0, 0, 0])
    with pytest.raises(SamplingParamsError, match="^priority must be an integer"):
        llm.generate(prompts[:1], params[:1], priority=[0.5])


def test_fcfs_refuses_a_priority_other_than_zero():
    fcfs = engine("fcfs")
    with pytest.raises(SamplingParamsError, match="^priority 1 needs priority scheduling"):
        fcfs.generate({"prompt_token_ids": [1, 2]}, SamplingParams(max_tokens=1), priority=[1])
    assert fcfs.generate({"prompt_token_ids": [1, 2]}, SamplingParams(max_tokens=1),
                         priority=[0])[0].outputs


fcfs_server = text_server_fixture()
priority_server = text_server_fixture(scheduling_policy="priority")


@pytest.mark.parametrize("route, body", [
    ("/v1/completions", {"prompt": "hi"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/responses", {"input": "hi"}),
])
def test_the_server_takes_priority_where_the_policy_does(fcfs_server, priority_server, route,
                                                        body):
    token_budget = "max_output_tokens" if route == "/v1/responses" else "max_tokens"
    body = body | {token_budget: 3, "temperature": 0}
    with httpx.Client(base_url=fcfs_server.url, timeout=60) as client:
        refused = client.post(route, json=body | {"priority": 5})
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert error["param"] == "priority" and "needs priority scheduling" in error["message"]
        assert client.post(route, json=body | {"priority": 0}).status_code == 200
        assert client.post(route, json=body | {"priority": None}).status_code == 200
    with httpx.Client(base_url=priority_server.url, timeout=60) as client:
        plain = client.post(route, json=body).json()
        urgent = client.post(route, json=body | {"priority": -10}).json()
        assert client.post(route, json=body | {"priority": "high"}).status_code == 400
    if route == "/v1/responses":
        assert urgent["output"][0]["content"][0]["text"] == plain["output"][0]["content"][0]["text"]
    else:
        assert urgent["choices"][0] == plain["choices"][0]


class OptionsEngine(FakeEngine):
    """The fake engine under the priority policy, keeping each generate call's options."""

    def __init__(self):
        super().__init__()
        self.scheduling_policy, self.seen = "priority", []

    async def generate(self, prompt_ids, params, request_id, prompt=None, priority=0,
                       cache_salt=None):
        self.seen.append((priority, cache_salt))
        async for out in super().generate(prompt_ids, params, request_id, prompt):
            yield out


@pytest.mark.parametrize("route, body, calls", [
    ("/v1/completions", {"prompt": ["a", "b"], "n": 2}, 2),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream": True},
     1),
    ("/v1/responses", {"input": "hi", "background": True}, 1),
])
def test_every_route_hands_the_engine_its_priority_and_salt(route, body, calls):
    engine = OptionsEngine()
    with serve(engine) as running, httpx.Client(base_url=running.url, timeout=30) as client:
        reply = client.post(route, json=body | {"priority": -4, "cache_salt": "s1"})
        assert reply.status_code == 200, reply.text
        assert wait_for(lambda: len(engine.seen) == calls)
    assert engine.seen == [(-4, "s1")] * calls


def test_the_openai_sdk_sends_priority_in_extra_body(priority_server):
    client = openai.OpenAI(base_url=f"{priority_server.url}/v1", api_key="none")
    model = client.models.list().data[0].id
    out = client.completions.create(model=model, prompt="ab", max_tokens=2, temperature=0,
                                    extra_body={"priority": 3})
    assert out.choices[0].finish_reason == "length"


def test_pd_decode_pulls_arrivals_in_priority_order(tmp_path):
    layout = tmp_path / "pd.yaml"
    layout.write_text(
        "name: pd\nroles:\n"
        "  prefill:\n    devices: {start: 0, count: 1}\n    dp: 1\n"
        "  decode:\n    devices: {start: 1, count: 1}\n    dp: 1\n    max_num_seqs: 1\n")
    llm = LLM(str(GOLDEN / "llama"), dtype="float32", deployment=str(layout),
              max_num_batched_tokens=256, staged=True, use_param_cache=False,
              scheduling_policy="priority")
    prefill, decode = llm.engine.entry[0], llm.engine.groups[1]
    prompts = workload(llm.cfg.vocab_size, 5, seed=2)
    priorities = [2, 0, 1, -1, 0]
    requests = []
    for i, (prompt, priority) in enumerate(zip(prompts, priorities, strict=True)):
        requests.append(Request(f"r{i}", None, prompt, params_for(i),
                                llm.make_sequences(prompt, params_for(i), priority)))
        llm.engine.submit(requests[-1])
    while any(not r.seqs[0].output_ids for r in requests):  # every prompt prefilled, offered
        prefill.step()
    decode.step()  # takes the offers; its one seat goes to the highest priority
    assert [s.priority for s in decode.scheduler.running] == [-1]
    assert [a.seq.priority for a in decode.arrivals] == [0, 0, 1, 2]
    assert [a.request.request_id for a in decode.arrivals] == ["r1", "r4", "r2", "r0"]
    while not all(r.finished for r in requests):
        for group in llm.engine.groups:
            group.step()
    assert [r.seqs[0].output_ids for r in requests] == reference(llm, prompts)


def test_a_decode_group_holds_pulls_behind_a_higher_priority_sequence_waiting_there():
    """A sequence waiting in a decode group (preempted, or moved in by a recovery) outranks
    arrivals of lower priority: pulling one now could see it preempted in the same step."""
    def group(policy: str, *waiting: int) -> SimpleNamespace:
        sched = Scheduler(BlockManager(64, 4), 4, 64, policy=policy)
        for p in waiting:
            seq = Sequence([1, 2, 3], SamplingParams(max_tokens=2), priority=p)
            sched.add(seq)
        return SimpleNamespace(scheduler=sched)

    arrival = Sequence([4, 5], SamplingParams(max_tokens=2), priority=0)
    assert DecodeGroup._outranked(group("priority", -1), arrival)
    assert not DecodeGroup._outranked(group("priority", 0), arrival)  # the arrival came first
    assert not DecodeGroup._outranked(group("priority", 1), arrival)
    assert not DecodeGroup._outranked(group("priority"), arrival)
    assert not DecodeGroup._outranked(group("fcfs", 0), arrival)
