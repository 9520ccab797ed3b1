"""``dispatch_rows``: an all-greedy batch takes the step's argmax tokens and launches no
sampler; any other batch samples, and appends the same tokens the sampler alone would."""

import jax.numpy as jnp
import numpy as np
import pytest

from xds_jax.sampling import rows as rows_mod
from xds_jax.sampling.argmax import argmax_last
from xds_jax.sampling.params import SamplingParams
from xds_jax.sampling.rows import append_rows, dispatch_rows
from xds_jax.sequence import Sequence

V = 50


def _logits(b: int) -> jnp.ndarray:
    return jnp.asarray(np.random.default_rng(b).normal(size=(b, V)).astype(np.float32))


def _seqs(*params: SamplingParams) -> list:
    return [Sequence([1, 2, 3], p, seed=7) for p in params]


def test_all_greedy_batch_takes_the_step_argmax_without_a_sampler(monkeypatch):
    logits = _logits(4)
    seqs = _seqs(*[SamplingParams(temperature=0)] * 3) + [None]  # a padding row
    monkeypatch.setattr(rows_mod, "sample", lambda *a: pytest.fail("sampler launched"))
    greedy = argmax_last(logits)
    sampled = dispatch_rows(logits, seqs, V, greedy_B=greedy)
    assert sampled.tokens_B is greedy
    append_rows(sampled, logits)
    assert [s.output_ids for s in seqs[:3]] == [[int(t)] for t in np.argmax(logits, -1)[:3]]


@pytest.mark.parametrize("other", [SamplingParams(temperature=0.8, seed=3),
                                   SamplingParams(temperature=0, logprobs=2),
                                   SamplingParams(temperature=0, min_tokens=2),
                                   SamplingParams(temperature=0, repetition_penalty=1.3)])
def test_other_batches_sample_as_without_the_step_argmax(other):
    logits = _logits(2)
    with_greedy, without = _seqs(SamplingParams(temperature=0), other), \
        _seqs(SamplingParams(temperature=0), other)
    sampled = dispatch_rows(logits, with_greedy, V, greedy_B=argmax_last(logits))
    assert sampled.tokens_B is not None
    append_rows(sampled, logits)
    append_rows(dispatch_rows(logits, without, V), logits)
    assert [s.output_ids for s in with_greedy] == [s.output_ids for s in without]
    assert [s.logprobs for s in with_greedy] == [s.logprobs for s in without]
