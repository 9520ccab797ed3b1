"""On-device sampling: filters never leak excluded tokens, seeds reproduce, penalties and
logprobs match a numpy reference."""

import numpy as np
import pytest

from xds_jax.errors import SamplingParamsError
from xds_jax.sampling.params import SamplingParams
from xds_jax.sampling.sampler import flags_for, make_batch, sample

V = 50


def run(params, logits, steps=None, prompts=None, outputs=None, banned=None):
    n = len(params)
    flags = flags_for(params)
    batch = make_batch(params, [p.seed or 0 for p in params], steps or [0] * n,
                       prompts or [[]] * n, outputs or [[]] * n, banned or [[]] * n, V, flags)
    return [np.asarray(a) for a in sample(np.asarray(logits, np.float32), batch, flags)]


def logits_rows(n, seed=0):
    return np.random.default_rng(seed).normal(0, 2, (n, V)).astype(np.float32)


def test_greedy_is_argmax():
    logits = logits_rows(4)
    tokens = run([SamplingParams(temperature=0)] * 4, logits)[0]
    np.testing.assert_array_equal(tokens, logits.argmax(-1))


def test_seed_reproduces_whatever_the_batch():
    logits = logits_rows(1)
    p = SamplingParams(temperature=1.0, seed=1234)
    alone = run([p], logits, steps=[7])[0][0]
    others = [SamplingParams(temperature=0.5, seed=i) for i in range(5)]
    mixed = run(others + [p], np.concatenate([logits_rows(5, 1), logits]), steps=[0] * 5 + [7])
    assert mixed[0][-1] == alone
    draws = {int(run([SamplingParams(temperature=1.0, seed=s)], logits)[0][0]) for s in range(40)}
    assert len(draws) > 3  # different seeds really sample


def draws(params, logits, n=300):
    rows = [SamplingParams(**{**params, "seed": s}) for s in range(n)]
    return run(rows, np.repeat(logits, n, axis=0))[0]


def test_top_k_never_leaves_the_top_k():
    logits = logits_rows(1)
    allowed = set(np.argsort(-logits[0])[:3].tolist())
    got = set(draws({"temperature": 1.5, "top_k": 3}, logits).tolist())
    assert got <= allowed and len(got) == 3


def test_top_p_stays_inside_the_nucleus():
    logits = logits_rows(1, seed=3)
    probs = np.exp(logits[0] - logits[0].max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    mass_before = np.cumsum(probs[order]) - probs[order]
    nucleus = set(order[mass_before < 0.6].tolist())
    got = set(draws({"temperature": 1.0, "top_p": 0.6}, logits).tolist())
    assert got <= nucleus and len(got) >= 1


def test_min_p_drops_unlikely_tokens():
    logits = logits_rows(1, seed=5)
    probs = np.exp(logits[0] - logits[0].max())
    allowed = set(np.nonzero(probs >= 0.2 * probs.max())[0].tolist())
    got = set(draws({"temperature": 1.0, "min_p": 0.2}, logits).tolist())
    assert got <= allowed


def test_min_p_comes_before_top_p_as_in_vllm_v1():
    """vLLM V1: temperature, min_p, then top-k / top-p over what min_p left (renormalised).
    Here min_p 0.3 keeps tokens 0-2 (0.3, 0.25, 0.2 of the mass), whose nucleus at 0.6 is
    tokens 0 and 1 (0.4 + 0.33 of their mass); top_p first kept token 2 as well."""
    probs = np.full(V, 0.25 / (V - 3))
    probs[:3] = 0.3, 0.25, 0.2
    got = draws({"temperature": 1.0, "min_p": 0.3, "top_p": 0.6}, np.log(probs)[None])
    assert set(got.tolist()) == {0, 1}


def test_penalties_follow_vllm():
    logits = logits_rows(1, seed=7)
    prompt, output = [1, 2], [3, 3, 4]
    p = SamplingParams(temperature=0, repetition_penalty=1.7, frequency_penalty=0.5,
                       presence_penalty=0.3)
    ref = logits[0].copy()
    for t in {1, 2, 3, 4}:
        ref[t] = ref[t] / 1.7 if ref[t] > 0 else ref[t] * 1.7
    for t, c in {3: 2, 4: 1}.items():
        ref[t] -= 0.5 * c + 0.3
    got = run([p], logits, prompts=[prompt], outputs=[output])[0][0]
    assert got == ref.argmax()


def test_banned_tokens_are_never_sampled():
    logits = logits_rows(1)
    best = int(logits[0].argmax())
    assert run([SamplingParams(temperature=0)], logits, banned=[[best]])[0][0] != best


def test_logprobs_are_raw_log_softmax_with_ranks():
    logits = logits_rows(2)
    tokens, lp, rank, top_ids, top_lp = run(
        [SamplingParams(temperature=0.8, seed=1, logprobs=5),
         SamplingParams(temperature=0, logprobs=2)], logits)
    ref = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
    ref -= logits.max(-1, keepdims=True)
    for i in range(2):
        np.testing.assert_allclose(lp[i], ref[i, tokens[i]], rtol=1e-5, atol=1e-5)
        assert rank[i] == 1 + (ref[i] > ref[i, tokens[i]]).sum()
        # every count computes the top 20 (one program for the 20 allowed counts, instead
        # of one per width); each request keeps its own top N (Sequence.append)
        assert top_ids.shape[1] == 20
        np.testing.assert_array_equal(top_ids[i], np.argsort(-ref[i])[:20])
    assert rank[1] == 1


@pytest.mark.parametrize("kwargs, field", [
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_k": -5}, "top_k"),
    ({"max_tokens": -1}, "max_tokens"), ({"logprobs": 100}, "logprobs"), ({"n": 0}, "n"),
    ({"prompt_logprobs": 21}, "prompt_logprobs"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"), ({"stop": [""]}, "stop"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
])
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(SamplingParamsError, match=field):
        SamplingParams(**kwargs)
