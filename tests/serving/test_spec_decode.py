"""MTP speculative decoding: greedy output equals the reference loop, counters move, KV
blocks come back, bad configurations fail at start-up."""

import jax
import pytest

from serving.core import spec_decode
from serving.core.request import Request
from tests.helpers import GOLDEN
from tests.mtp_checkpoint import make_mimic_checkpoint, make_mtp_checkpoint
from xds_jax import LLM, SamplingParams
from xds_jax.errors import ConfigError

PROMPTS = [[5, 9, 17, 33, 2, 7], list(range(3, 40)), [11] * 20, [200, 100, 50]]


def spec(k: int) -> dict:
    return {"method": "mtp", "num_speculative_tokens": k}


@pytest.fixture(autouse=True)
def draft_at_every_batch_size(monkeypatch):
    """These tests batch up to 5 sequences: let every step draft (the default stops past 2)."""
    monkeypatch.setattr(spec_decode, "DISABLE_BY_BATCH_SIZE", 64)


@pytest.fixture(scope="module")
def mimic(tmp_path_factory):
    return str(make_mimic_checkpoint(tmp_path_factory.mktemp("mimic")))


@pytest.fixture(scope="module")
def random_mtp(tmp_path_factory):
    return str(make_mtp_checkpoint(tmp_path_factory.mktemp("mtp")))


def mixed_params() -> list[SamplingParams]:
    return [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
            SamplingParams(temperature=0, max_tokens=7, ignore_eos=True, logprobs=3),
            SamplingParams(temperature=0, max_tokens=30, n=2, ignore_eos=True),
            SamplingParams(temperature=0, max_tokens=19, stop_token_ids=[316, 45])]


def run(model: str, k: int | None, params, **options):
    options = {"dtype": "float32", "use_param_cache": False, **options}
    if k is None:
        return None, LLM(model, engine="reference", **options).generate(
            [{"prompt_token_ids": p} for p in PROMPTS], params)
    llm = LLM(model, speculative_config=spec(k), max_num_seqs=8, **options)
    return llm, llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)


def assert_same(ref, got):
    for r, g in zip(ref, got, strict=True):
        for a, b in zip(r.outputs, g.outputs, strict=True):
            assert b.token_ids == a.token_ids
            assert b.finish_reason == a.finish_reason
            if a.logprobs is not None:
                for x, y in zip(a.logprobs, b.logprobs, strict=True):
                    assert set(x) == set(y)
                    for t in x:
                        assert y[t].logprob == pytest.approx(x[t].logprob, abs=1e-4)
                        assert y[t].rank == x[t].rank


@pytest.mark.parametrize("k", [1, 3])
def test_greedy_equals_reference_with_accepted_drafts(mimic, k):
    _, ref = run(mimic, None, mixed_params())
    llm, got = run(mimic, k, mixed_params())
    assert_same(ref, got)
    stats = llm.engine.stats()
    assert stats["spec_num_drafts"] > 0
    assert 0 < stats["spec_accepted_tokens"] <= stats["spec_draft_tokens"]
    assert len(stats["spec_accepted_per_position"]) == k
    assert stats["spec_accepted_per_position"][0] == max(stats["spec_accepted_per_position"])
    assert stats["generation_tokens_total"] == sum(
        len(o.token_ids) for r in got for o in r.outputs)
    assert stats["kv_usage"] == 0


def test_steps_past_the_batch_size_limit_decode_without_drafting(mimic, monkeypatch):
    """With drafting limited to steps of at most 2 rows, the 5 sequences' first steps
    decode one token each (still through the MTP block) and the last ones, once the others
    finished, draft: output stays the reference's and only those steps count drafts."""
    monkeypatch.setattr(spec_decode, "DISABLE_BY_BATCH_SIZE", 2)
    _, ref = run(mimic, None, mixed_params())
    llm, got = run(mimic, 2, mixed_params())
    assert_same(ref, got)
    stats = llm.engine.stats()
    assert 0 < stats["spec_accepted_tokens"] <= stats["spec_draft_tokens"]
    # Only the 30-token pair of n=2 outlives the others (24 and 19 tokens): at most its
    # last 11 tokens (plus a lag step) come from drafting steps, two rows each.
    assert stats["spec_num_drafts"] <= 2 * 12
    # speculative_config's limit overrides the platform's default: 0 rows, no step drafts
    llm = LLM(mimic, dtype="float32", use_param_cache=False, max_num_seqs=8,
              speculative_config={**spec(2), "disable_by_batch_size": 0})
    assert_same(ref, llm.generate([{"prompt_token_ids": p} for p in PROMPTS], mixed_params()))
    assert llm.engine.stats()["spec_num_drafts"] == 0
    assert spec_decode.default_disable_by_batch_size(jax.devices("cpu")[0]) == 2


def test_greedy_equals_reference_with_rejected_drafts(random_mtp):
    _, ref = run(random_mtp, None, mixed_params())
    llm, got = run(random_mtp, 2, mixed_params())
    assert_same(ref, got)
    stats = llm.engine.stats()
    assert stats["spec_draft_tokens"] > stats["spec_accepted_tokens"]


def test_glm_4_5_s_mtp_layer_drafts_behind_grouped_query_attention(tmp_path):
    """GLM-4.5 (glm4_moe) ships its MTP layer as DeepSeek-V3 does (layer N: enorm, hnorm,
    eh_proj, a decoder layer, shared_head.norm) behind GQA attention with biases, q/k norms
    and half-width RoPE: it is loaded and drafts, and greedy output is the reference's."""
    model = str(make_mtp_checkpoint(tmp_path / "glm", name="glm4_moe"))
    _, ref = run(model, None, mixed_params())
    llm, got = run(model, 2, mixed_params())
    assert_same(ref, got)
    assert llm.engine.stats()["spec_num_drafts"] > 0


def test_sampled_requests_share_batches_with_greedy_ones(mimic):
    params = mixed_params()
    params[0] = SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=24,
                               ignore_eos=True)
    params[2] = SamplingParams(temperature=1.0, max_tokens=30, n=2, ignore_eos=True,
                               repetition_penalty=1.2)
    _, ref = run(mimic, None, params)
    _, got = run(mimic, 2, params)
    assert_same(ref[1:2] + ref[3:], got[1:2] + got[3:])
    assert len(got[0].outputs[0].token_ids) == 24
    assert all(len(o.token_ids) == 30 for o in got[2].outputs)


def count_launches(monkeypatch) -> list:
    """Record the k of every speculative step program launched."""
    launched, step = [], spec_decode.spec_step

    def counted(*args, **kwargs):
        launched.append(kwargs["k"])
        return step(*args, **kwargs)

    monkeypatch.setattr(spec_decode, "spec_step", counted)
    return launched


@pytest.mark.parametrize("model", ["mimic", "random_mtp"])
def test_chained_greedy_steps_equal_reference(model, request, monkeypatch):
    """Greedy rows without logprobs launch up to ``num_chained_steps`` speculative steps back
    to back, each from the last one's results on the device; a sequence that stops (stop
    id, ``max_tokens``) inside a chain drops the steps after. Output, counters and KV are as
    one step at a time."""
    path = request.getfixturevalue(model)
    params = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=30, n=2, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=19, stop_token_ids=[316, 45])]
    _, ref = run(path, None, params)
    results = {}
    for chained in (1, 4):
        launched = count_launches(monkeypatch)
        llm = LLM(path, dtype="float32", use_param_cache=False, max_num_seqs=8,
                  speculative_config={**spec(2), "num_chained_steps": chained})
        got = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
        assert_same(ref, got)
        group = llm.engine.groups[0]
        assert group.blocks.num_free_blocks == group.blocks.num_blocks
        assert group.scheduler.num_lookahead_tokens == chained * 3 - 1
        results[chained] = (len(launched), group.steps, llm.engine.stats())
    (one, steps_one, stats_one), (four, steps_four, stats_four) = results[1], results[4]
    assert one == steps_one - 1  # one program a decode step (the first step is a prefill)
    assert four > steps_four and steps_four < steps_one  # chains ran
    assert stats_four["spec_num_drafts"] >= stats_one["spec_num_drafts"]
    assert stats_four["spec_accepted_tokens"] > 0
    assert stats_four["generation_tokens_total"] == stats_one["generation_tokens_total"]


def abort_mid_speculation(llm, driver, max_tokens: int) -> None:
    """Submit ``PROMPTS``, step ``driver`` (a group or an MA pool) until drafts were made,
    abort three requests mid-speculation and run the fourth to ``max_tokens``."""
    engine = llm.engine
    sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    requests = [Request(f"r{i}", None, p, sp, llm.make_sequences(p, sp))
                for i, p in enumerate(PROMPTS)]
    for r in requests:
        engine.submit(r)
    for _ in range(6):
        driver.step()
    assert engine.stats()["spec_num_drafts"] > 0
    for r in requests[:3]:
        engine.abort(r.request_id)
    while driver.step():
        pass
    assert requests[3].finished and len(requests[3].seqs[0].output_ids) == max_tokens


def test_kv_blocks_return_after_aborts_mid_speculation(mimic):
    llm = LLM(mimic, dtype="float32", use_param_cache=False, speculative_config=spec(2),
              max_num_seqs=4)
    group = llm.engine.groups[0]
    abort_mid_speculation(llm, group, 60)
    assert group.blocks.num_free_blocks == group.blocks.num_blocks
    assert not group.runner.pending


def test_an_evacuated_group_keeps_no_drafting_state(mimic):
    """A group taken out of service hands its sequences back and forgets their pending
    hiddens (they stayed in its runner until each sequence finished elsewhere)."""
    llm = LLM(mimic, dtype="float32", use_param_cache=False, speculative_config=spec(2),
              max_num_seqs=4)
    group = llm.engine.groups[0]
    sp = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    for i, p in enumerate(PROMPTS):
        llm.engine.submit(Request(f"r{i}", None, p, sp, llm.make_sequences(p, sp)))
    for _ in range(2):
        group.step()
    assert group.runner.pending
    moves = group.evacuate()
    assert len(moves) == len(PROMPTS) and not group.runner.pending
    group.rejoin()
    assert not group.runner.pending and group.blocks.num_free_blocks == group.blocks.num_blocks


@pytest.mark.parametrize("bad", [{"method": "mtp", "num_speculative_tokens": 0},
                                 {"method": "mtp", "num_speculative_tokens": 5},
                                 {"method": "eagle", "num_speculative_tokens": 1},
                                 {"method": "mtp", "num_speculative_tokens": 1, "x": 1},
                                 {**spec(1), "disable_by_batch_size": -1},
                                 {**spec(1), "disable_by_batch_size": "8"},
                                 {**spec(1), "num_chained_steps": 0},
                                 {**spec(1), "num_chained_steps": 17},
                                 {**spec(1), "num_chained_steps": True}])
def test_bad_speculative_config_is_refused(bad):
    with pytest.raises(ConfigError, match="speculative_config"):
        LLM(str(GOLDEN / "deepseek_v3"), speculative_config=bad)


def test_model_without_mtp_weights_is_refused_at_start_up():
    with pytest.raises(ConfigError, match="MTP weights"):
        LLM(str(GOLDEN / "deepseek_v3"), dtype="float32", use_param_cache=False,
            speculative_config=spec(1))


PD_TP1 = ("name: pd-tp1\nroles:\n"
          "  prefill:\n    devices: {start: 0, count: 1}\n    dp: 1\n    tp: 1\n"
          "  decode:\n    devices: {start: 1, count: 2}\n    dp: 2\n")


@pytest.mark.parametrize("layout", ["tp1", "configs/deployments/cpu8-pd.yaml"])
def test_pd_greedy_equals_reference(mimic, tmp_path, layout):
    """PD: the prefill group (tp=1, or TP=2 in cpu8-pd) runs the MTP block over the prompt
    and sends its pages with the target's KV and the last hidden state with the sequence, so
    decode drafts from its first step exactly as a colocated group does: the same drafts,
    the same acceptances. Output equals the reference."""
    if layout == "tp1":
        layout = tmp_path / "pd.yaml"
        layout.write_text(PD_TP1)
    params = mixed_params()
    _, ref = run(mimic, None, params)
    colocated, _ = run(mimic, 2, params)
    llm, got = run(mimic, 2, params, deployment=str(layout))
    assert_same(ref, got)
    stats, alone = llm.engine.stats(), colocated.engine.stats()
    assert stats["spec_accepted_tokens"] > 0
    for key in ("spec_num_drafts", "spec_draft_tokens", "spec_accepted_per_position"):
        assert stats[key] == alone[key], key
    decode = [g for g in llm.engine.groups if g not in llm.engine.entry]
    assert all(g.blocks.num_free_blocks == g.blocks.num_blocks for g in decode)
