"""The blocked inverse-CDF draw picks the token a cumulative sum over the whole row picks, never
a token of probability 0, and follows the distribution."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xds_jax.sampling.draws import BLOCK, inverse_cdf


def reference(probs: np.ndarray, u: float) -> int:
    cdf = np.cumsum(probs.astype(np.float64))
    return int(np.argmax(cdf > u * cdf[-1] * (1 - 1e-6)))


@pytest.mark.parametrize("v", [7, BLOCK, BLOCK + 3, 5000])
def test_the_draw_is_the_first_token_past_u(v):
    rng = np.random.default_rng(v)
    x = (rng.standard_normal((64, v)) * 3).astype(np.float32)
    x[rng.random((64, v)) < 0.6] = -np.inf  # masked tokens
    x[:, -1] = 0.0
    probs = np.asarray(jax.nn.softmax(jnp.asarray(x), axis=-1))
    u = rng.random(64).astype(np.float32)
    u[:4] = [0.0, 1 - 2**-24, 0.5, 0.999999]
    got = np.asarray(jax.jit(inverse_cdf)(jnp.asarray(probs), jnp.asarray(u)))
    assert (probs[np.arange(64), got] > 0).all()
    want = [reference(probs[i], u[i]) for i in range(64)]
    assert got.tolist() == want  # (fixed inputs: no u lies within rounding of an edge)


def test_draws_follow_the_distribution():
    probs = np.zeros(3 * BLOCK, np.float32)
    probs[[5, BLOCK + 1, 3 * BLOCK - 1]] = [0.2, 0.5, 0.3]
    u = jax.random.uniform(jax.random.key(0), (20000,))
    got = np.asarray(jax.jit(inverse_cdf)(jnp.tile(jnp.asarray(probs), (20000, 1)), u))
    counts = {t: (got == t).mean() for t in (5, BLOCK + 1, 3 * BLOCK - 1)}
    assert set(np.unique(got)) == set(counts)
    np.testing.assert_allclose(list(counts.values()), [0.2, 0.5, 0.3], atol=0.015)


def test_a_target_in_the_rounding_gap_before_a_block_draws_a_possible_token():
    """The mass before a block, taken as its cumulative sum less its own sum, can round above
    the previous block's cumulative sum; a target between them must not draw the block's first
    token when that has probability 0 (a review found such rows)."""
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(100):
        probs = np.zeros(4 * BLOCK, np.float32)
        for b in range(4):  # mass only in the second half of each block
            probs[b * BLOCK + BLOCK // 2:(b + 1) * BLOCK] = rng.random(BLOCK // 2)
        probs /= probs.sum()
        sums = probs.reshape(4, BLOCK).sum(-1, dtype=np.float32)
        cdf = np.cumsum(sums, dtype=np.float32)
        total = float(cdf[-1]) * (1 - 1e-6)
        us = [np.float32(cdf[b - 1] / total) for b in range(1, 4) if cdf[b] - sums[b] > cdf[b - 1]]
        us = [np.float32(u + d * np.spacing(u)) for u in us for d in range(-3, 4)]
        if us:
            got = np.asarray(jax.jit(inverse_cdf)(jnp.tile(jnp.asarray(probs), (len(us), 1)),
                                                  jnp.asarray(us)))
            assert (probs[got] > 0).all()
            checked += len(us)
    assert checked
