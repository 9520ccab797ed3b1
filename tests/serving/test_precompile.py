"""Compiling the step buckets ahead (``xds serve --precompile-seconds``): every decode bucket
and fresh prompts' prefill buckets compile before traffic, the padding steps that compile
them write nothing (the same tokens as an engine that never ran them, prefix cache
included), traffic within the buckets compiles no decode program, and the deadline holds."""

from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from serving.core.decode_inputs import take_inputs
from serving.core.engine_runs import precompile
from serving.entrypoints import cli
from tests.helpers import GOLDEN
from xds_jax import LLM, SamplingParams, memory_maps
from xds_jax.generate import model_step
from xds_jax.kernels import cpu_attention


def engine(**options) -> LLM:
    options = {"dtype": "float32"} | options
    return LLM(str(GOLDEN / "llama"), max_num_seqs=8, max_model_len=256,
               max_num_batched_tokens=64, use_param_cache=False, **options)


def workload(vocab: int) -> tuple[list[dict], list[SamplingParams]]:
    rng = np.random.default_rng(0)
    shared = rng.integers(3, vocab, 40).tolist()  # a prefix the cache shares
    prompts = [{"prompt_token_ids": shared + rng.integers(3, vocab, n).tolist()}
               for n in (1, 9, 30, 70, 5, 100)]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True)
              for m in (3, 40, 12, 60, 90, 20)]
    return prompts, params


def tokens(llm: LLM, prompts, params) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


def test_buckets_compile_ahead_write_nothing_and_cover_decode():
    ahead, plain = engine(), engine()
    runner = ahead.engine.groups[0].runner
    shapes = runner.step_buckets(8, 256, 64)
    decode = [s for s in shapes if s[1] == 1]
    assert decode == sorted(decode, key=lambda s: (s[0] * s[2], s))
    assert {(r, b) for r, _, b in decode} == {(r, b) for r in (4, 8) for b in (8, 16)}
    fresh_rows = [(1, 16), (1, 32), (2, 16), (1, 64), (2, 32), (4, 16), (2, 64), (4, 32),
                  (4, 64)]
    if runner.prefill_blocks is None:  # tables as wide as the chunk's context needs
        assert [s for s in shapes if s[1] > 1] == [
            (r, w, 8) for r, w in fresh_rows] + [  # then a chunk after cached tokens:
            (1, 16, 16), (1, 32, 16), (1, 64, 16)]
    else:  # the prefill kernel: every prefill table as wide as max_model_len's (256 / 16)
        assert runner.prefill_blocks == 16
        assert [s for s in shapes if s[1] > 1] == [(r, w, 16) for r, w in fresh_rows]
    prompts, params = workload(ahead.cfg.vocab_size)
    first = tokens(plain, prompts, params)
    assert tokens(ahead, prompts, params) == first  # its pool now holds cached prefixes
    fresh = set(shapes) - {(*k[0], k[1][1]) for k in runner._shapes_seen if k[0] != "inputs"}
    assert precompile(ahead.engine, 256, seconds=600) == len(fresh) > 0
    seen, taken = set(runner._shapes_seen), take_inputs._cache_size()
    programs = model_step._cache_size()
    # the padding steps wrote nothing: the cached blocks (block 0 among them) read the same
    outs = ahead.generate(prompts, params)
    # decode inputs taken on device from the step before (asynchronous scheduling) found
    # their programs compiled (~40 ms each in traffic, keyed on every launch of that step)
    assert not [k for k in set(runner._shapes_seen) - seen if k[0] == "inputs"]
    assert take_inputs._cache_size() == taken > 0
    # and JAX compiled a step program only for the shapes counted: a decode step's tokens
    # taken on device had made every decode bucket compile again (a host array in the
    # precompiled call, a device array in traffic: two programs)
    new = [k for k in set(runner._shapes_seen) - seen if k[0] != "inputs"]
    assert model_step._cache_size() - programs == len(new)
    assert [o.outputs[0].token_ids for o in outs] == tokens(plain, prompts, params) == first
    assert all(o.num_cached_tokens >= 32 for o in outs)  # through the cached blocks
    assert not [k for k in set(runner._shapes_seen) - seen if k[0][1] == 1]  # decode compiled


def test_the_deadline_the_mapping_limit_and_the_flag(monkeypatch):
    llm = engine()
    assert precompile(llm.engine, 256, seconds=0) == 0
    with monkeypatch.context() as patch:  # near the level where every program is dropped
        patch.setattr(memory_maps, "map_limit", lambda: 1000)
        patch.setattr(memory_maps, "map_count", lambda: 400)
        assert not memory_maps.room_for_more()
        assert precompile(llm.engine, 256, seconds=600) == 0
    assert llm.engine.groups[0].runner.compile_count == 0
    assert cli.build_parser().parse_args(["serve"]).precompile_seconds == 60.0
    args = cli.build_parser().parse_args(["serve", "--precompile-seconds", "0"])
    assert args.precompile_seconds == 0.0
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["serve", "--precompile-seconds", "-1"])


def test_sampled_traffic_finds_its_sampler_programs_compiled(monkeypatch):
    """Temperature and top-p batches of every size meet sampler programs compiled ahead (the
    same logits, shapes and flags), and sample as an engine that never compiled ahead."""
    import serving.core.runner as runner_module
    import xds_jax.sampling.rows as rows_module
    import xds_jax.sampling.sampler as sampler

    def recording(calls, sample):
        def call(logits, batch, flags):
            calls.add((logits.shape, flags))
            return sample(logits, batch, flags)
        return call

    ahead, plain = engine(), engine()
    compiled, met = set(), set()
    monkeypatch.setattr(runner_module, "sample", recording(compiled, runner_module.sample))
    precompile(ahead.engine, 256, seconds=600)
    monkeypatch.setattr(rows_module, "sample", recording(met, rows_module.sample))
    prompts, _ = workload(ahead.cfg.vocab_size)
    params = [SamplingParams(temperature=0.8, top_p=p, max_tokens=12, seed=i)
              for i, p in enumerate((1.0, 0.9, 0.5, 1.0, 0.95, 0.9))]
    programs = sampler.sample._cache_size()
    got = [o.outputs[0].token_ids for o in ahead.generate(prompts, params)]
    assert sampler.sample._cache_size() == programs  # none compiled again by JAX
    assert got == [o.outputs[0].token_ids for o in plain.generate(prompts, params)]
    assert met and met <= compiled, met - compiled


def test_every_group_and_a_tensor_parallel_runner_meet_no_compile_in_traffic():
    """Each DP group compiles its own take programs ahead (only the first group did), and a
    tensor-parallel runner's decode step is the program compiled ahead (its pages' sharding
    was spelt P(None, None, 'tp', None) at first and P(None, None, 'tp') once a step had
    returned them: every decode bucket compiled again at its first step)."""
    import jax

    from serving.core.runner import ModelRunner
    from serving.core.scheduled import ScheduledSeq
    from tests.helpers import tiny
    from xds_jax.sequence import Sequence

    dp = engine(num_dp_groups=2)
    precompile(dp.engine, 256, seconds=600)
    runners = [g.runner for g in dp.engine.groups]
    seen = [set(r._shapes_seen) for r in runners]
    taken, programs = take_inputs._cache_size(), model_step._cache_size()
    prompts, params = workload(dp.cfg.vocab_size)
    dp.generate(prompts * 2, params * 2)
    assert all(not [k for k in set(r._shapes_seen) - s if k[0] == "inputs" or k[0][1] == 1]
               for r, s in zip(runners, seen, strict=True))
    assert take_inputs._cache_size() == taken
    m = tiny("llama")
    tp = ModelRunner(m.params, m.cfg, num_blocks=32, block_size=16, device=jax.devices()[:2])
    tp.precompile(4, 1, 8, input_sizes=tp.input_sizes(8))
    programs, counted = model_step._cache_size(), tp.compile_count
    seqs = [Sequence(list(range(1, 40)), SamplingParams(max_tokens=8)) for _ in range(2)]
    first = tp.launch([ScheduledSeq(s, 38, 1, [2 * i, 2 * i + 1, 8 + i], True)
                       for i, s in enumerate(seqs)])
    second = tp.launch([ScheduledSeq(s, 39, 1, [2 * i, 2 * i + 1, 8 + i], True)
                        for i, s in enumerate(seqs)], after=first)
    tp.finish(first)
    tp.finish(second)
    assert all(len(s.output_ids) == 2 for s in seqs)
    assert model_step._cache_size() == programs and tp.compile_count == counted


def test_prefill_tables_stay_sized_where_the_kernel_does_not_run():
    """XLA's prefill attention reads every key its table holds: only where the kernel runs
    do prefill tables take max_model_len's width."""
    for args in ((64, jnp.float16), (64, jnp.float32, False, "gpu"), (64, jnp.float32, True),
                 (24, jnp.float32)):
        assert not cpu_attention.prefill_runs(*args)
    for dtype in ("float32", "bfloat16"):
        runner = engine(dtype=dtype).engine.groups[0].runner
        runs = cpu_attention.prefill_runs(runner.cfg.head_dim, dtype)
        assert (runner.prefill_blocks == 256 // 16) if runs else runner.prefill_blocks is None


def test_long_prompts_later_chunks_take_one_table_width(tmp_path):
    """Where the prefill kernel runs, every prefill step's block table is as wide as
    max_model_len's: a prompt of many chunks, past four times a chunk's context (where the
    precompile's later-chunk buckets stop), runs the fresh prompts' programs, and reads the
    same tokens as tables sized to each chunk's context."""
    model = tmp_path / "llama"
    shutil.copytree(GOLDEN / "llama", model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config | {"max_position_embeddings": 1024}))
    wide, sized = (LLM(str(model), dtype="float32", max_num_seqs=4, max_model_len=1024,
                       max_num_batched_tokens=64, use_param_cache=False) for _ in range(2))
    runner = wide.engine.groups[0].runner
    if runner.prefill_blocks is None:
        pytest.skip("the prefill attention kernel does not run here")
    assert runner.prefill_blocks == 1024 // 16
    sized.engine.groups[0].runner.prefill_blocks = None
    rng = np.random.default_rng(1)
    prompts = [{"prompt_token_ids": rng.integers(3, wide.cfg.vocab_size, n).tolist()}
               for n in (700, 90)]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    assert tokens(wide, prompts, params) == tokens(sized, prompts, params)
    prefill = {k for k in runner._shapes_seen if k[0] != "inputs" and k[0][1] > 1}
    assert prefill and {k[1][1] for k in prefill} == {runner.prefill_blocks}
    grown = {k for k in sized.engine.groups[0].runner._shapes_seen
             if k[0] != "inputs" and k[0][1] > 1}
    assert max(k[1][1] for k in grown) == 64 > 4 * 8  # sized: past the later buckets
