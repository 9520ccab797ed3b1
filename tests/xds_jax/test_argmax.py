"""``argmax_last`` / ``first_true`` equal ``jnp.argmax`` (ties, NaN, -inf, 16-bit, batches)."""

import jax.numpy as jnp
import numpy as np
import pytest

from xds_jax.sampling.argmax import argmax_last, first_true


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(1, 7), (5, 49), (3, 4, 129), (2, 1)])
def test_argmax_last_equals_jnp_argmax(dtype, shape):
    rng = np.random.default_rng(sum(shape))
    # Few distinct values: many ties, whose first index must win.
    x = jnp.asarray(rng.integers(-3, 3, size=shape).astype(np.float32), dtype)
    np.testing.assert_array_equal(argmax_last(x), jnp.argmax(x, axis=-1))
    assert argmax_last(x).dtype == jnp.int32


def test_argmax_last_special_values():
    x = jnp.asarray([[0.0, jnp.nan, 5.0, jnp.nan],  # first NaN, as jnp.argmax
                     [-jnp.inf, -jnp.inf, -jnp.inf, -jnp.inf],  # all masked: index 0
                     [1.0, jnp.inf, 2.0, jnp.inf],
                     [-1.0, -2.0, -0.5, -0.5]])
    np.testing.assert_array_equal(argmax_last(x), jnp.argmax(x, axis=-1))
    np.testing.assert_array_equal(argmax_last(x), [1, 0, 1, 2])


def test_argmax_last_integers():
    x = jnp.asarray([[3, 9, 9, 1], [-5, -7, -5, -9]], jnp.int32)
    np.testing.assert_array_equal(argmax_last(x), [1, 0])


def test_first_true_equals_argmax_of_mask():
    rng = np.random.default_rng(0)
    mask = rng.random((6, 33)) < 0.1
    mask[2] = False  # no True: 0, as jnp.argmax
    mask[3] = True
    np.testing.assert_array_equal(first_true(jnp.asarray(mask)),
                                  jnp.argmax(jnp.asarray(mask), axis=-1))
