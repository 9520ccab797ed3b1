"""Beam search (``LLM.beam_search``, ``xds_jax/sampling/beam_search.py``) against transformers'
``generate(num_beams=...)`` on the same tiny weights (a golden file) where their rules coincide
(no beam ends: the same beams, the same summed log-probabilities), against a search written
out here over the dense reference logits where beams end and the length penalty ranks them, and
on hand-worked rounds."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tests.helpers import GOLDEN
from xds_jax import LLM, BeamSearchParams
from xds_jax.errors import PromptTooLongError, SamplingParamsError
from xds_jax.model.reference import reference_logits
from xds_jax.outputs import Logprob
from xds_jax.sampling.beam_search import BeamSearch

PROMPTS = [[1, 5, 9, 13], [1, 7], [1, 40, 41, 42, 43, 44, 45, 46, 47, 48]]


@pytest.fixture(scope="module")
def llm():
    return LLM(str(GOLDEN / "llama"), dtype="float32", max_num_seqs=8, use_param_cache=False)


def test_beams_equal_transformers_where_no_beam_ends(llm):
    """transformers' ``generate(num_beams=3)`` on the same weights (tests/golden/
    make_beam_golden.py): the same beams, best first, and their summed log-probabilities
    (transformers scores a beam by that sum over its 6 generated tokens)."""
    cases = json.loads((GOLDEN / "llama" / "beam_search.json").read_text())
    assert [c["prompt"] for c in cases] == PROMPTS
    params = BeamSearchParams(beam_width=3, max_tokens=6, ignore_eos=True)
    outs = llm.beam_search([{"prompt_token_ids": p} for p in PROMPTS], params)
    for case, out in zip(cases, outs, strict=True):
        assert [s.tokens for s in out.sequences] == case["sequences"]
        np.testing.assert_allclose([s.cum_logprob / 6 for s in out.sequences],
                                   case["sequences_scores"], rtol=1e-4, atol=1e-5)
        assert all(s.finish_reason == "length" for s in out.sequences)


def written_out_search(params, cfg, prompt, width, steps, eos, penalty):
    """vLLM's beam search over the reference model's dense logits, written out plainly: each
    round every live beam's 2 x width best next tokens; a candidate ending in ``eos`` is set
    aside; the best ``width`` others live on; at the end the best ``width`` of all, scored
    sum / (prompt + generated, without a final eos) ** penalty."""
    def score(tokens, total, ended):
        return total / (len(prompt) + len(tokens) - ended) ** penalty

    live, done = [([], 0.0)], []
    for _ in range(steps):
        candidates = []
        for tokens, total in live:
            logits = np.asarray(reference_logits(params, cfg, np.array(prompt + tokens)))[-1]
            logp = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
            for t in np.argsort(-logp, kind="stable")[:2 * width]:
                entry = (tokens + [int(t)], total + float(logp[t]))
                (done if int(t) == eos else candidates).append(entry)
        live = sorted(candidates, key=lambda e: score(*e, False), reverse=True)[:width]
    ranked = [(e, score(*e, e[0][-1] == eos and e in done)) for e in done + live]
    return sorted(ranked, key=lambda r: r[1], reverse=True)[:width]


@pytest.mark.parametrize("penalty", [1.0, 0.3, 2.0])
def test_beams_equal_a_written_out_search_where_beams_end(llm, penalty):
    eos = 2
    assert llm.tokenizer is None or eos in llm.tokenizer.eos_token_ids
    prompt = PROMPTS[0]  # beams reach the end-of-sequence token here within 8 tokens
    out = llm.beam_search({"prompt_token_ids": prompt},
                          BeamSearchParams(beam_width=3, max_tokens=8, length_penalty=penalty))
    want = written_out_search(llm.params, llm.cfg, prompt, 3, 8, eos, penalty)
    got = out[0].sequences
    assert [s.tokens[len(prompt):] for s in got] == [e[0] for e, _ in want]
    np.testing.assert_allclose([s.cum_logprob for s in got], [e[1] for e, _ in want],
                               rtol=1e-4, atol=1e-4)
    # ended beams rank first with no strong length penalty; a penalty of 2 favours long ones
    assert any(s.finish_reason == "stop" for s in got) == (penalty <= 1.0)
    for s in got:
        assert (s.finish_reason == "stop") == (s.tokens[-1] == eos)
        assert s.stop_reason == (eos if s.finish_reason == "stop" else None)


def lp(value: float) -> Logprob:
    return Logprob(math.log(value))


def test_hand_worked_rounds():
    """Width 2, prompt of 2 tokens, eos 0. Round 1: 5 (0.6), 6 (0.3), eos (0.1). Round 2 after
    5: 7 (0.5), eos (0.4); after 6: 8 (0.9). Live after round 2: 6,8 (0.27) and 5,7 (0.30)."""
    search = BeamSearch([1, 1], BeamSearchParams(beam_width=2, max_tokens=2), eos_ids={0})
    assert search.round_prompts() == [[1, 1]]
    search.advance([{5: lp(0.6), 6: lp(0.3), 0: lp(0.1)}])
    assert search.round_prompts() == [[1, 1, 5], [1, 1, 6]]
    search.advance([{7: lp(0.5), 0: lp(0.4)}, {8: lp(0.9)}])
    assert search.done
    best = search.best()
    # scores over length (prompt + generated, a final eos not counted), penalty 1:
    # 5,eos: log .24 / 3 = -0.476; 5,7: log .30 / 4 = -0.301; 6,8: log .27 / 4 = -0.327;
    # eos: log .1 / 2 = -1.151
    assert [b.tokens for b in best] == [[5, 7], [6, 8]]
    long = BeamSearch([1, 1], BeamSearchParams(beam_width=2, max_tokens=2, length_penalty=0.0),
                      eos_ids={0})  # no length normalisation: sums alone
    long.advance([{5: lp(0.6), 6: lp(0.3), 0: lp(0.1)}])
    long.advance([{7: lp(0.5), 0: lp(0.4)}, {8: lp(0.9)}])
    assert [b.tokens for b in long.best()] == [[5, 7], [6, 8]]
    kept = BeamSearch([1, 1], BeamSearchParams(beam_width=3, max_tokens=2), eos_ids={0})
    kept.advance([{5: lp(0.6), 6: lp(0.3), 0: lp(0.1)}])
    kept.advance([{7: lp(0.5), 0: lp(0.4)}, {8: lp(0.9)}])
    outs = kept.outputs(None)
    assert [o.token_ids for o in outs] == [[5, 7], [6, 8], [5, 0]]
    assert [o.finish_reason for o in outs] == ["length", "length", "stop"]
    assert outs[2].cumulative_logprob == pytest.approx(math.log(0.24))


def test_bad_parameters_and_prompts_are_refused(llm):
    for fields in [dict(beam_width=0), dict(beam_width=11), dict(max_tokens=0),
                   dict(length_penalty=float("nan")), dict(temperature=-1),
                   dict(beam_width=True)]:
        with pytest.raises(SamplingParamsError):
            BeamSearchParams(**({"beam_width": 2, "max_tokens": 4} | fields))
    with pytest.raises(PromptTooLongError):
        llm.beam_search({"prompt_token_ids": [1] * llm.max_model_len},
                        BeamSearchParams(beam_width=2, max_tokens=4))
