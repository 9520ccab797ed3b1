"""Asynchronous scheduling on PD decode groups (cpu8-pd: 2 TP=2 prefill groups, 4 decode
groups): decode groups overlap their steps, prefill groups hand off after each step and do
not; greedy tokens equal the single-device reference, every pool is whole afterwards, and
once a workload's shapes are known, running it again compiles nothing, KV pulls included."""

import jax
from jax._src.dispatch import BACKEND_COMPILE_EVENT

from serving.core.runner import ModelRunner
from tests.helpers import GOLDEN
from tests.serving.test_engine import params_for, reference, workload
from tests.serving.test_faults import assert_pools_whole
from tests.serving.test_pd import warm_until_nothing_compiles
from xds_jax import LLM, SamplingParams
from xds_jax.generate import LocalGenerator
from xds_jax.sequence import Sequence

PD8 = "configs/deployments/cpu8-pd.yaml"


def pd_engine(**options) -> LLM:
    return LLM(str(GOLDEN / "llama"), dtype="float32", deployment=PD8, max_num_seqs=8,
               max_num_batched_tokens=48, staged=True, use_param_cache=False,
               async_scheduling=True, **options)


def test_pd_decode_groups_overlap_and_match_the_reference():
    llm = pd_engine()
    engine = llm.engine
    decode = [g for g in engine.groups if g not in engine.entry]
    assert all(g.overlap for g in decode) and not any(g.overlap for g in engine.entry)
    prompts = workload(llm.cfg.vocab_size, 16, seed=3)
    params = [params_for(i) for i in range(len(prompts))]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    assert [o.outputs[0].token_ids for o in outs] == reference(llm, prompts)
    # n > 1 and seeded sampling: the same as with one step at a time.
    sampled = SamplingParams(temperature=0.8, seed=5, n=2, max_tokens=9, ignore_eos=True)
    sync = LLM(str(GOLDEN / "llama"), dtype="float32", deployment=PD8, max_num_seqs=8,
               max_num_batched_tokens=48, staged=True, use_param_cache=False)
    some = [{"prompt_token_ids": p} for p in prompts[:6]]
    assert ([[c.token_ids for c in o.outputs] for o in llm.generate(some, sampled)]
            == [[c.token_ids for c in o.outputs] for o in sync.generate(some, sampled)])
    stats = engine.stats()
    assert stats["kv_transfers"] == len(prompts) + 2 * len(some)
    assert_pools_whole(engine)


def test_pd_async_steady_state_compiles_nothing_after_kv_pulls():
    llm = pd_engine(enable_prefix_caching=False)
    prompts, params, want, counts = warm_until_nothing_compiles(llm, tries=6)
    compiled = []

    def listen(event, duration, **kwargs):
        if event == BACKEND_COMPILE_EVENT:
            compiled.append(kwargs)

    transfers = llm.engine.stats()["kv_transfers"]
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        outs = llm.generate(prompts, params)
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert [o.outputs[0].token_ids for o in outs] == want
    assert llm.engine.stats()["kv_transfers"] == transfers + len(prompts)
    assert llm.engine.stats()["compiles"] == counts[-1]
    assert compiled == []
    assert_pools_whole(llm.engine)


POISON = 7
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def alone(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    """Each prompt's ``GREEDY`` tokens through the single-device loop."""
    gen, out = LocalGenerator(llm.params, llm.cfg), []
    for p in prompts:
        seq = Sequence(p, GREEDY)
        gen.run([seq])
        out.append(seq.output_ids)
    return out


def test_a_request_failing_in_a_decode_group_fails_alone(monkeypatch):
    """A decode launch that fails for one request, with the group's previous step in flight:
    that request fails alone and every group stays in service (the mixin's roll-back of the
    step in flight was shadowed by the decode group's own ``_drop`` of an arrival: the group
    died on an AttributeError and a few such requests took every decode group down)."""
    launch = ModelRunner.launch

    def poisoned(self, scheduled, after=None):
        if any(s.seq.prompt_ids[0] == POISON and not s.is_prefill for s in scheduled):
            raise RuntimeError("injected decode failure")
        return launch(self, scheduled, after)

    llm = pd_engine()
    monkeypatch.setattr(ModelRunner, "launch", poisoned)
    prompts = [[5, 9, 10, 11], [POISON, 9, 10], [6, 9, 10, 12, 13], [8, 1, 2], [POISON, 3]]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY)
    want = alone(llm, [p for p in prompts if p[0] != POISON])
    assert [o.outputs[0].token_ids for o in outs if o.prompt_token_ids[0] != POISON] == want
    for out in outs:
        if out.prompt_token_ids[0] == POISON:
            assert out.outputs[0].finish_reason == "abort"
            assert "injected decode failure" in out.error
    stats = llm.engine.stats()
    assert stats["healthy_groups"] == len(llm.engine.groups) and not llm.engine.recoveries
    assert_pools_whole(llm.engine)


def test_a_decode_group_crash_with_a_step_in_flight_is_recovered_as_a_crash():
    llm = pd_engine(faults=["group_crash:role=decode:group=0:after_steps=2"])
    prompts = workload(llm.cfg.vocab_size, 8, seed=4)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == alone(llm, prompts)
    reasons = [r.reason for r in llm.engine.recoveries]
    assert reasons and all(r.startswith("GroupCrashed") for r in reasons), reasons
