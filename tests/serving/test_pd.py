"""PD disaggregation: TP prefill groups hand KV to decode groups that pull it, and the
greedy tokens are exactly the single-device reference's."""

import dataclasses

import jax
import pytest

from serving.core.engine import group_config_for
from serving.core.request import Request
from serving.disagg.deploy import build_deployed_engine
from tests.helpers import GOLDEN, tiny
from tests.serving.test_engine import params_for, reference, workload
from tests.serving.test_faults import assert_pools_whole
from xds_jax import LLM, SamplingParams
from xds_jax.engine_config import EngineConfig
from xds_jax.generate import LocalGenerator
from xds_jax.sequence import Sequence

PD8 = "configs/deployments/cpu8-pd.yaml"


@pytest.mark.parametrize("name", ["llama"])  # MLA MoE through PD: test_disaggregation.py
def test_pd_outputs_match_reference(name):
    """Prefill on 2 TP=2 groups, decode on 4 DP groups."""
    llm = LLM(str(GOLDEN / name), dtype="float32", deployment=PD8, max_num_seqs=8,
              max_num_batched_tokens=48, staged=True, use_param_cache=False)
    engine = llm.engine
    prefill = [g for g in engine.groups if g in engine.entry]
    assert [len(g.runner.devices) for g in prefill] == [2, 2]
    assert [g.runner.devices for g in prefill] == [jax.devices()[0:2], jax.devices()[2:4]]
    prompts = workload(llm.cfg.vocab_size, 16, seed=3)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        [params_for(i) for i in range(len(prompts))])
    want = reference(llm, prompts)
    assert [o.outputs[0].token_ids for o in outs] == want
    stats = engine.stats()
    assert stats["kv_transfers"] == len(prompts)
    assert stats["kv_blocks_sent"] > 0 and stats["kv_bytes_sent"] > 0
    assert stats["kv_blocks_reused"] > 0  # shared prefixes already cached on decode
    assert stats["kv_usage"] == 0 and stats["num_running"] == 0  # prefill blocks freed
    decode = [g for g in engine.groups if g not in engine.entry]
    assert all(g.steps > 0 for g in prefill) and sum(g.steps > 0 for g in decode) >= 2
    # Prefill samples each first token; every later token comes from a decode group.
    first = sum(g.generated_tokens for g in prefill)
    assert first == len(prompts)
    assert sum(g.generated_tokens for g in decode) == sum(len(t) - 1 for t in want)


def alone(model, seq: Sequence) -> list[int]:
    """The sequence's tokens from the single-device reference loop."""
    ref = Sequence(seq.prompt_ids, seq.params)
    LocalGenerator(model.params, model.cfg).run([ref])
    return ref.output_ids


def small_decode_engine(name: str, decode_blocks: int, prefill_blocks: int | None = None):
    """cpu8-pd with decode pools far smaller than what the prefills bring."""
    model = tiny(name)
    options = EngineConfig(deployment=PD8, max_num_seqs=8, max_num_batched_tokens=64,
                           staged=True)
    config = group_config_for(model.params, model.cfg, 256, options)
    decode = dataclasses.replace(config, num_blocks=decode_blocks)
    prefill = dataclasses.replace(config, num_blocks=prefill_blocks or config.num_blocks)
    return model, build_deployed_engine(model.params, model.cfg, 256, options,
                                        decode_config=decode, prefill_config=prefill)


@pytest.mark.parametrize("prefill_blocks", [None, 8])
def test_backpressure_transfers_wait_and_every_request_completes(prefill_blocks):
    """Decode pools of 8 blocks (128 tokens); with small prefill pools too, prefill runs out
    of blocks while its finished prompts wait for decode room, and must wait as well."""
    model, engine = small_decode_engine("llama", decode_blocks=8, prefill_blocks=prefill_blocks)
    prompts = workload(model.cfg.vocab_size, 24, seed=5)
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)] * len(prompts)
    seqs = [Sequence(p, sp) for p, sp in zip(prompts, params, strict=True)]
    engine.run(seqs)
    for seq in seqs:
        assert seq.output_ids == alone(model, seq)
    stats = engine.stats()
    assert sum(g.transfer.deferred for g in engine.router.decode) > 0
    assert stats["kv_transfers"] == len(prompts) and stats["kv_usage"] == 0


def test_prefill_blocks_are_held_until_the_transfer_completes():
    model, engine = small_decode_engine("llama", decode_blocks=16)
    prefill, decode = engine.entry, [g for g in engine.groups if g not in engine.entry]
    seq = Sequence(list(range(3, 40)), SamplingParams(temperature=0, max_tokens=5))
    request = Request("r0", None, seq.prompt_ids, seq.params, [seq])
    group = prefill[engine.submit(request)]
    while not seq.output_ids:
        group.step()
    assert len(seq.output_ids) == 1  # first token sampled on prefill
    assert group.held_blocks == 3 and group.blocks.usage > 0  # 37 tokens: 3 blocks of 16
    assert group.scheduler.num_running == 0  # it never decodes on prefill
    target = next(g for g in decode if g.arrivals or not g.inbox.empty())
    target.step()  # pulls the KV, then launches the first decode step
    assert target.transfer.transfers == 1 and target.transfer.blocks_sent == 3
    if target.overlap:  # asynchronous scheduling: the next step appends its token
        assert len(seq.output_ids) == 1
        target.step()
    assert len(seq.output_ids) == 2
    group.step()  # sees the completion
    assert group.held_blocks == 0 and group.blocks.usage == 0
    while not seq.finished:
        target.step()
    assert seq.output_ids == alone(model, seq)


def test_abort_while_waiting_for_decode_room_frees_prefill_blocks():
    model, engine = small_decode_engine("llama", decode_blocks=16)
    prefill = engine.entry
    seq = Sequence(list(range(3, 40)), SamplingParams(temperature=0, max_tokens=5))
    request = Request("r1", None, seq.prompt_ids, seq.params, [seq])
    group = prefill[engine.submit(request)]
    while not seq.output_ids:
        group.step()
    assert group.held_blocks == 3
    engine.abort("r1")
    for g in engine.groups:
        g.step()
    group.step()
    assert seq.finished and group.held_blocks == 0 and group.blocks.usage == 0
    assert all(g.blocks.usage == 0 for g in engine.groups)


def test_pd_request_with_n_samples_and_prefix_reuse_on_decode():
    llm = LLM(str(GOLDEN / "llama"), dtype="float32", deployment=PD8, max_num_seqs=8,
              staged=True, use_param_cache=False)
    prompt = list(range(5, 60))
    params = SamplingParams(n=2, temperature=0.8, seed=7, max_tokens=6, ignore_eos=True)
    out = llm.generate({"prompt_token_ids": prompt}, params)[0]
    ref = LLM(str(GOLDEN / "llama"), dtype="float32", engine="reference",
              use_param_cache=False).generate({"prompt_token_ids": prompt}, params)[0]
    assert [o.token_ids for o in out.outputs] == [o.token_ids for o in ref.outputs]
    assert llm.engine.stats()["kv_transfers"] == 2


def test_pools_are_sized_independently_in_the_deployment_file(tmp_path):
    layout = tmp_path / "pd.yaml"
    layout.write_text(
        "name: pd\nroles:\n"
        "  prefill:\n    devices: {start: 0, count: 2}\n    dp: 1\n    tp: 2\n"
        "    max_num_seqs: 4\n    max_num_batched_tokens: 32\n"
        "  decode:\n    devices: {start: 2, count: 2}\n    dp: 2\n"
        "    max_num_seqs: 16\n    kv_cache_gib: 0.0001\n")
    llm = LLM(str(GOLDEN / "llama"), dtype="float32", deployment=str(layout),
              max_model_len=128, staged=True, use_param_cache=False)
    prefill, decode = llm.engine.entry[0], [g for g in llm.engine.groups[1:]]
    assert (prefill.config.max_num_seqs, prefill.config.max_num_batched_tokens) == (4, 32)
    assert [g.config.max_num_seqs for g in decode] == [16, 16]
    assert decode[0].config.num_blocks == 8  # 0.0001 GiB holds less than one 128-token context
    assert prefill.config.num_blocks > decode[0].config.num_blocks
    prompts = workload(llm.cfg.vocab_size, 6, seed=9)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        [params_for(i) for i in range(len(prompts))])
    assert [o.outputs[0].token_ids for o in outs] == reference(llm, prompts)


def warm_until_nothing_compiles(llm: LLM, tries: int = 5):
    """Run one fixed workload (8 prompts, no prefix cache: the same shapes each time) until a
    run compiles nothing new; returns the prompts, their params, the first run's tokens and the
    engine's compile count after each run."""
    prompts = [{"prompt_token_ids": p} for p in workload(llm.cfg.vocab_size, 8, seed=4)]
    params = [params_for(i) for i in range(len(prompts))]
    want = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    counts = [llm.engine.stats()["compiles"]]
    while len(counts) < 2 or counts[-1] != counts[-2]:  # placements vary: warm every group
        assert len(counts) < tries, f"compiles never settle: {counts}"
        llm.generate(prompts, params)
        counts.append(llm.engine.stats()["compiles"])
    assert counts == sorted(counts) and counts[0] > 0
    return prompts, params, want, counts


def test_pd_steady_state_does_not_recompile():
    """KV pulled into decode groups goes through ``import_kv``, which leaves the step programs
    and their count alone: ``compiles`` only grows while new shapes show up, and once a
    workload has been seen (no prefix cache, so the same shapes) running it again compiles
    nothing, not even in XLA."""
    from jax._src.dispatch import BACKEND_COMPILE_EVENT

    llm = LLM(str(GOLDEN / "llama"), dtype="float32", deployment=PD8, max_num_seqs=8,
              max_num_batched_tokens=48, staged=True, enable_prefix_caching=False,
              use_param_cache=False)
    prompts, params, want, counts = warm_until_nothing_compiles(llm)
    compiled = []

    def listen(event, duration, **kwargs):
        if event == BACKEND_COMPILE_EVENT:
            compiled.append(kwargs)

    engine = llm.engine
    transfers = engine.stats()["kv_transfers"]
    per_group = [g.runner.compile_count for g in engine.groups]
    requests = [Request(f"again-{i}", None, p["prompt_token_ids"], sp,
                        llm.make_sequences(p["prompt_token_ids"], sp))
                for i, (p, sp) in enumerate(zip(prompts, params, strict=True))]
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        for r in requests:
            engine.submit(r)
        while not all(r.finished for r in requests):  # step by step: counts never move
            for g in engine.entry:
                g.step()
            for g in engine.router.decode:  # DPGroup.step, checked right after the pulls
                out = g.plan()
                assert [g.runner.compile_count for g in engine.groups] == per_group
                if out is not None:
                    g.runner.finish(g.runner.launch(out.scheduled))
                    g.complete(out)
            assert [g.runner.compile_count for g in engine.groups] == per_group
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert [r.seqs[0].output_ids for r in requests] == want
    assert engine.stats()["kv_transfers"] == transfers + len(prompts)
    assert compiled == []


@pytest.mark.parametrize("overlap", [True, False])
def test_a_request_of_two_samples_aborted_at_its_first_token_leaves_nothing(overlap):
    """Aborted as prefill hands off its samples: the abort reaches the decode group before
    the arrivals; the first arrival takes it and ends the request, and the second must not
    bring the request back for good (it stayed in the group's requests, the group never
    idle)."""
    llm = LLM(str(GOLDEN / "llama"), dtype="float32", deployment=PD8, max_num_seqs=8,
              staged=True, use_param_cache=False, async_scheduling=overlap)
    engine, prompt = llm.engine, [6, 9, 10, 12, 3]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, n=2)

    def abort_at_the_first_output(output):
        if not output.finished:
            engine.abort("r0")

    request = Request("r0", None, prompt, params, llm.make_sequences(prompt, params, 0, None),
                      on_output=abort_at_the_first_output)
    engine.run_until_done([request])
    assert request.finished and all(s.output().finish_reason == "abort" for s in request.seqs)
    for _ in range(3):
        for group in engine.groups:
            group.step()
    assert not any(g.requests or g.has_work() for g in engine.groups)
    assert_pools_whole(engine)
