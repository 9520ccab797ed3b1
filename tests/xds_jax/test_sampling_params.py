"""SamplingParams at the door: every value a client may send is served or named in an error."""

from __future__ import annotations

import math

import pytest

from xds_jax.errors import SamplingParamsError
from xds_jax.sampling.params import MAX_N, SEED_SPACE, SamplingParams, device_seed


@pytest.mark.parametrize("seed", [0, 1, 2**31, SEED_SPACE - 1])
def test_32_bit_seeds_map_to_themselves(seed):
    assert device_seed(seed) == seed


@pytest.mark.parametrize("seed", [-1, -(2**63), SEED_SPACE, 2**64 + 7, 10**40])
def test_other_seeds_hash_into_32_bits_deterministically(seed):
    assert 0 <= device_seed(seed) < SEED_SPACE
    assert device_seed(seed) == device_seed(int(str(seed)))


def test_sample_seeds_are_consecutive_then_mapped():
    assert SamplingParams(n=3, seed=5).sample_seeds() == [5, 6, 7]
    seeds = SamplingParams(n=2, seed=SEED_SPACE - 1).sample_seeds()
    assert seeds[0] == SEED_SPACE - 1 and seeds[1] == device_seed(SEED_SPACE) != seeds[0]
    assert all(0 <= s < SEED_SPACE for s in SamplingParams(n=4).sample_seeds())


@pytest.mark.parametrize("field,value", [
    ("n", 0), ("n", MAX_N + 1), ("n", True), ("temperature", math.inf),
    ("temperature", math.nan), ("top_p", math.nan), ("min_p", -math.inf),
    ("repetition_penalty", math.inf), ("frequency_penalty", math.nan), ("seed", 1.5),
    ("seed", True), ("top_k", -2), ("top_k", 1.0), ("logprobs", 2.5), ("max_tokens", -1),
    ("stop_token_ids", [-1]), ("stop_token_ids", 7), ("stop", 5), ("bad_words", 3),
    ("allowed_token_ids", 4),
])
def test_unrepresentable_values_name_the_field(field, value):
    with pytest.raises(SamplingParamsError, match=f"^{field} "):
        SamplingParams(**{field: value})


def test_huge_top_k_is_accepted_and_means_no_filter():
    assert SamplingParams(top_k=2**70).top_k == 2**70  # the sampler clamps to the vocabulary


def test_vllms_spellings_of_no_seed_and_tiny_temperatures(caplog):
    """vLLM reads seed -1 as no seed, and raises a positive temperature below 0.01 to 0.01
    (logits divided by less may overflow), with a warning; 0 stays greedy."""
    assert SamplingParams(seed=-1).seed is None
    assert len({tuple(SamplingParams(n=2, seed=-1).sample_seeds()) for _ in range(4)}) > 1
    assert SamplingParams(temperature=1e-5).temperature == 0.01
    assert "temperature" in caplog.text
    assert SamplingParams(temperature=0).temperature == 0
    assert SamplingParams(temperature=0.01).temperature == 0.01
