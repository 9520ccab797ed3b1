"""``argmax_last`` / ``first_true`` equal ``jnp.argmax``: ties within and across groups of 128,
NaN, -inf, a vocabulary tail that 128 does not divide, 16-bit and integer inputs, batches."""

import jax.numpy as jnp
import numpy as np
import pytest

from xds_jax.sampling.argmax import argmax_last, first_true

WIDTHS = [7, 128, 200, 256, 1000, 1024, 50257 // 16]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.int32])
@pytest.mark.parametrize("width", WIDTHS)
def test_argmax_last_equals_jnp_argmax(dtype, width):
    rng = np.random.default_rng(width)
    # Few distinct values: many ties, in several groups and the tail; the first must win.
    x = jnp.asarray(rng.integers(-30, 3, size=(6, 2, width)).astype(np.float32), dtype)
    np.testing.assert_array_equal(argmax_last(x), jnp.argmax(x, axis=-1))
    assert argmax_last(x).dtype == jnp.int32


@pytest.mark.parametrize("width", WIDTHS)
def test_argmax_last_special_values(width):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, width)).astype(np.float32)
    x[0, [width // 2, width - 1]] = np.nan  # first NaN wins, as jnp.argmax
    x[1, width - 1] = np.nan  # a NaN in the tail only
    x[2] = -np.inf  # all masked: index 0
    x[3, [1, width - 1]] = np.inf
    x[4, width - 1] = 100.0  # the maximum in the tail
    x[5, [0, width - 1]] = 100.0  # tied with the tail: the first
    x[6, : width // 2] = -np.inf
    np.testing.assert_array_equal(argmax_last(jnp.asarray(x)), jnp.argmax(x, axis=-1))


@pytest.mark.parametrize("width", WIDTHS)
def test_first_true_equals_argmax_of_mask(width):
    rng = np.random.default_rng(0)
    mask = rng.random((6, width)) < 0.01
    mask[2] = False  # no True: 0, as jnp.argmax
    mask[3] = True
    mask[4] = False
    mask[4, -1] = True
    np.testing.assert_array_equal(first_true(jnp.asarray(mask)),
                                  jnp.argmax(jnp.asarray(mask), axis=-1))
