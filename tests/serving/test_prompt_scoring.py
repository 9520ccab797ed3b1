"""``serving.core.prompt_scoring``: the head runs over chunks of positions sized to the
vocabulary, and any chunking gives the scores of one pass over the reference logits."""

from __future__ import annotations

import jax
import numpy as np

from serving.core import prompt_scoring
from serving.core.prompt_scoring import head_chunk, score_tokens
from tests.helpers import tiny
from xds_jax.model.reference import reference_logits


def test_head_chunk_fits_the_logits_budget():
    assert head_chunk(2048, 49152) == 512  # SmolLM2
    assert head_chunk(2048, 128256) == 256  # Llama 3
    assert head_chunk(2048, 262144) == 128  # Gemma 3
    assert head_chunk(32, 49152) == 32  # never past the prompt's bucket
    assert head_chunk(1 << 20, 1 << 30) == 16  # at least 16 positions a pass
    for positions in (16, 64, 1024, 8192):
        for vocab in (320, 32000, 151936, 256000):
            assert positions % head_chunk(positions, vocab) == 0


def test_chunked_head_equals_one_pass_over_the_reference_logits(monkeypatch):
    """50 prompt tokens (a 64-position bucket) scored in 4 head passes of 16 positions: each
    position's log-probability of the next token, its rank and the top 7 equal the
    log-softmax of the reference logits."""
    m = tiny("llama")
    ids = np.random.default_rng(3).integers(0, m.cfg.vocab_size, 50).astype(np.int32)
    monkeypatch.setattr(prompt_scoring, "MAX_HEAD_CHUNK", 16)
    tokens = np.zeros((64,), np.int32)
    tokens[:50] = ids
    logprob, rank, top_ids, top_lps = (np.asarray(a)[:49] for a in score_tokens(
        m.params, tokens, cfg=m.cfg, top_n=7))
    want = np.asarray(jax.nn.log_softmax(reference_logits(m.params, m.cfg, ids), axis=-1))[:-1]
    own = want[np.arange(49), ids[1:]]
    np.testing.assert_allclose(logprob, own, atol=2e-5)
    np.testing.assert_array_equal(rank, 1 + (want > own[:, None]).sum(-1))
    np.testing.assert_array_equal(top_ids, np.argsort(-want, axis=-1, kind="stable")[:, :7])
    np.testing.assert_allclose(top_lps, np.sort(want, axis=-1)[:, ::-1][:, :7], atol=2e-5)


def test_top_counts_share_a_program_and_each_request_keeps_its_own():
    """Scoring with 3 and then 4 top entries runs one program (width 4, the power of two
    ``logprobs_width`` gives); each request gets exactly its own count."""
    m = tiny("llama")
    scorer = prompt_scoring.PromptScorer(m.params, m.cfg, jax.devices()[0], None)
    ids = np.random.default_rng(4).integers(0, m.cfg.vocab_size, 20).tolist()
    before = score_tokens._cache_size()
    three, four = scorer.score(ids, 3), scorer.score(ids, 4)
    assert score_tokens._cache_size() == before + 1
    for i, token in enumerate(ids[1:], start=1):
        assert len(three[i]) - (token not in list(three[i])[:3]) == 3
        assert list(three[i])[:3] == list(four[i])[:3] and len(four[i]) >= 4
