"""``kernels.materialize``: the identity, computed once into memory on an unpartitioned CPU
program (RoPE's cos/sin no longer recomputed inside every layer's rotation), XLA's fusion
as before in a partitioned one, and transparent to ``grad`` and ``vmap``."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tests.helpers import tiny
from xds_jax.kernels import materialize as mat
from xds_jax.model.layers import apply_rope, rope_cos_sin, rope_inv_freq

pytestmark = pytest.mark.skipif(not mat.available(),
                                reason="the kernel cannot be built here (no C++ compiler)")


def _rotations(cfg, layers: int):
    def step(x, positions):  # what every layer's attention does to its q (or k)
        for _ in range(layers):
            cos, sin = rope_cos_sin(cfg, positions)
            x = apply_rope(x, cos, sin, cfg.rope.interleaved)
        return x
    return step


def _ops(compiled_text: str, op: str) -> int:
    return len(re.findall(rf"= \S+ {op}\(", compiled_text))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.int32, jnp.uint16])
def test_materialize_is_the_identity(dtype):
    x = jnp.asarray(np.arange(-40, 80).reshape(2, 3, 20), dtype)
    y = jax.jit(lambda a: mat.materialize(a * 2) + 1)(x)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x * 2 + 1))
    assert mat.TARGET in jax.jit(mat.materialize).lower(x).as_text(dialect="hlo")
    np.testing.assert_array_equal(np.asarray(mat.materialize(x)), np.asarray(x))  # eager


def test_rope_cos_sin_computed_once_for_every_layer():
    """Four layers' rotations of one step compile to one cos and one sin (XLA fuses them into
    each rotation otherwise, once per rotated element), with the same numbers as the
    rotation built straight from ``jnp.cos``."""
    cfg = tiny("llama").cfg
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 24, 4, cfg.head_dim)),
                    jnp.bfloat16)
    positions = jnp.arange(48, dtype=jnp.int32).reshape(2, 24) * 37
    step = jax.jit(_rotations(cfg, 4))
    text = step.lower(x, positions).compile().as_text()
    assert _ops(text, "cosine") == 1 and _ops(text, "sine") == 1
    assert mat.TARGET in text

    inv, factor = rope_inv_freq(cfg.rope, cfg.rope_dim)
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv)
    want = x
    for _ in range(4):
        want = apply_rope(want, jnp.cos(freqs) * factor, jnp.sin(freqs) * factor,
                          cfg.rope.interleaved)
    np.testing.assert_array_equal(np.asarray(step(x, positions), np.float32),
                                  np.asarray(jax.jit(lambda v: v)(want), np.float32))


def test_partitioned_programs_fuse_as_before():
    """A GSPMD program over two devices keeps XLA's fusion (a custom call there would gather
    its operand); a fully manual ``shard_map`` body takes the kernel. Same values."""
    cfg = tiny("llama").cfg
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 8, 4, cfg.head_dim)),
                    jnp.float32)
    positions = jnp.arange(16, dtype=jnp.int32).reshape(2, 8)
    step = _rotations(cfg, 2)
    want = np.asarray(jax.jit(step)(x, positions))
    mesh = Mesh(np.array(jax.devices()[:2]), ("dp",))
    xs = jax.device_put(x, NamedSharding(mesh, PartitionSpec("dp")))
    ps = jax.device_put(positions, NamedSharding(mesh, PartitionSpec("dp")))
    compiled = jax.jit(step).lower(xs, ps).compile()
    assert mat.TARGET not in compiled.as_text()
    np.testing.assert_array_equal(np.asarray(compiled(xs, ps)), want)
    manual = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=PartitionSpec("dp"),
                                   out_specs=PartitionSpec("dp")))
    assert mat.TARGET in manual.lower(xs, ps).as_text(dialect="hlo")
    np.testing.assert_array_equal(np.asarray(manual(xs, ps)), want)


def test_gradients_and_vmap_pass_through():
    x = jnp.linspace(-2.0, 2.0, 12).reshape(3, 4)
    grad = jax.grad(lambda a: jnp.sum(jnp.sin(mat.materialize(a * a))))(x)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(2 * x * jnp.cos(x * x)), rtol=1e-6)
    batched = jax.vmap(lambda a: mat.materialize(a) * 3, in_axes=1)(x)
    np.testing.assert_array_equal(np.asarray(batched), np.asarray(x.T * 3))
