"""FlowServe engine end to end: continuous batching, chunked prefill, prefix caching,
preemption and DP groups all give exactly the reference loop's greedy tokens."""

import jax
import numpy as np
import pytest

from tests.helpers import GOLDEN
from xds_jax import LLM, SamplingParams
from xds_jax.generate import LocalGenerator
from xds_jax.sequence import Sequence


def workload(vocab: int, count: int, seed: int) -> list[list[int]]:
    """Random prompts: mixed lengths, some sharing a long prefix, some longer than a chunk."""
    rng = np.random.default_rng(seed)
    shared = rng.integers(0, vocab, 40).tolist()
    prompts = []
    for i in range(count):
        length = int(rng.integers(1, 70))
        tail = rng.integers(0, vocab, length).tolist()
        prompts.append(shared + tail if i % 3 == 0 else tail)
    return prompts


def params_for(i: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=4 + i % 9, ignore_eos=True)


def reference(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    """Each request alone through the single-device loop."""
    gen = LocalGenerator(llm.params, llm.cfg)
    out = []
    for i, p in enumerate(prompts):
        seq = Sequence(p, params_for(i))
        gen.run([seq])
        out.append(seq.output_ids)
    return out


@pytest.mark.parametrize("name, groups, staged", [
    ("llama", 1, False), ("qwen3_moe", 1, True), ("llama", 4, True), ("qwen3_moe", 2, False)])
def test_64_concurrent_requests_match_reference(name, groups, staged, tmp_path):
    """Fused step programs and separately jitted stages both equal the reference."""
    layout = tmp_path / "dp.yaml"  # DP groups on devices 1.., each its own slice
    layout.write_text(f"name: dp{groups}\nroles:\n  decode:\n"
                      f"    devices: {{start: 1, count: {groups}}}\n    dp: {groups}\n")
    llm = LLM(str(GOLDEN / name), dtype="float32", deployment=str(layout), max_num_seqs=16,
              max_num_batched_tokens=48, staged=staged, use_param_cache=False)
    assert [g.runner.device for g in llm.engine.groups] == jax.devices()[1:1 + groups]
    prompts = workload(llm.cfg.vocab_size, 64, seed=groups)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        [params_for(i) for i in range(len(prompts))])
    want = reference(llm, prompts)
    for i, out in enumerate(outs):
        assert out.outputs[0].token_ids == want[i], f"request {i}"
    stats = llm.engine.stats()
    assert stats["num_running"] == stats["num_waiting"] == 0 and stats["kv_usage"] == 0
    if groups > 1:
        assert all(g.steps > 0 for g in llm.engine.groups)  # every group took work


def test_prefix_cache_computes_only_the_remainder():
    llm = LLM(str(GOLDEN / "llama"), dtype="float32", use_param_cache=False)
    rng = np.random.default_rng(0)
    prefix = rng.integers(0, llm.cfg.vocab_size, 144).tolist()
    first = prefix + rng.integers(0, llm.cfg.vocab_size, 16).tolist()
    second = prefix + rng.integers(0, llm.cfg.vocab_size, 16).tolist()
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    assert llm.generate({"prompt_token_ids": first}, params)[0].num_cached_tokens == 0
    before = llm.engine.stats()["prefill_tokens_total"]
    out = llm.generate({"prompt_token_ids": second}, params)[0]
    computed = llm.engine.stats()["prefill_tokens_total"] - before
    assert computed == len(second) - 144  # 144 = 9 full blocks of 16 reused
    assert out.num_cached_tokens == 144  # reported as vLLM's RequestOutput does
    assert out.outputs[0].token_ids == _alone(llm, second)


def _alone(llm, prompt):
    seq = Sequence(prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    LocalGenerator(llm.params, llm.cfg).run([seq])
    return seq.output_ids


def test_preemption_under_a_small_kv_pool_keeps_outputs_identical():
    llm = LLM(str(GOLDEN / "qwen3_moe"), dtype="float32", max_num_seqs=8,
              max_num_batched_tokens=64, kv_cache_bytes=1, use_param_cache=False)
    blocks = llm.engine.groups[0].config.num_blocks
    prompts = workload(llm.cfg.vocab_size, 12, seed=7)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        [params_for(i) for i in range(len(prompts))])
    want = reference(llm, prompts)
    assert [o.outputs[0].token_ids for o in outs] == want
    assert llm.engine.stats()["num_preemptions"] > 0, f"pool of {blocks} blocks never preempted"


def test_no_recompilation_in_steady_state():
    llm = LLM(str(GOLDEN / "llama"), dtype="float32", max_num_seqs=4, use_param_cache=False)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    batch = [{"prompt_token_ids": [i + 1] * (10 + i)} for i in range(4)]
    llm.generate(batch, params)
    compiled = llm.engine.stats()["compiles"]
    for _ in range(3):
        llm.generate(batch, params)
    assert llm.engine.stats()["compiles"] == compiled


def test_decode_tensor_parallel_deployment_is_refused_with_a_clear_error(tmp_path):
    from serving.disagg.deploy import UnsupportedDeploymentError

    layout = tmp_path / "pd-tp.yaml"
    layout.write_text("name: pdtp\nroles:\n  prefill:\n    devices: {start: 0, count: 2}\n"
                      "    dp: 1\n    tp: 2\n  decode:\n    devices: {start: 2, count: 2}\n"
                      "    dp: 1\n    tp: 2\n")
    with pytest.raises(UnsupportedDeploymentError, match="decode tp=2"):
        LLM(str(GOLDEN / "llama"), dtype="float32", deployment=str(layout),
            use_param_cache=False)


def test_a_request_that_can_never_fit_fails_alone_and_the_group_keeps_serving():
    from serving.core.dp_group import GroupConfig
    from serving.core.engine import Engine
    from serving.core.request import Request
    from serving.core.scheduled import SchedulerError

    llm = LLM(str(GOLDEN / "llama"), dtype="float32", engine="reference", use_param_cache=False)
    engine = Engine(llm.params, llm.cfg, group_config=GroupConfig(num_blocks=4, block_size=16,
                                                                  max_num_seqs=4))
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    huge = Request("huge", None, [1] * 100, params, [Sequence([1] * 100, params)])
    small = Request("small", None, [1, 2, 3], params, [Sequence([1, 2, 3], params)])
    engine.run_until_done([huge, small])
    assert huge.seqs[0].finish_reason == "abort"
    failed = huge.snapshot()  # says why (it ended "abort" with no error)
    assert isinstance(failed.failure, SchedulerError) and "needs KV for" in failed.error
    assert small.seqs[0].output_ids == _alone(llm, [1, 2, 3])[:4]
    assert engine.groups[0].healthy


def test_automatic_gc_is_off_while_group_threads_run():
    import gc

    llm = LLM(str(GOLDEN / "llama"), dtype="float32", max_num_seqs=4, use_param_cache=False)
    assert gc.isenabled()
    llm.engine.start()
    try:
        assert not gc.isenabled()  # collections happen between steps only
    finally:
        llm.engine.shutdown()
    assert gc.isenabled()
