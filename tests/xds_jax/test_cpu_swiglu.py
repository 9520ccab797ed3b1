"""xds-jax's CPU kernel for SwiGLU's activation of the fused gate/up projection
(``xds_jax/kernels/swiglu.cc``): against XLA's computation of the same (rows and widths off the
16-lane steps, gates past the exponential's range, both result dtypes), its lowering (the
kernel only where a program sees whole arrays), the transformations, and a tiny model's
generation with and without it."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tests.helpers import assert_same_greedy, generate_with_and_without, spy
from xds_jax.kernels import cpu_swiglu

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not cpu_swiglu.available(),
                                reason="the kernel cannot run here (no AVX-512 or compiler)")


def _gate_up(shape, seed=0):
    y = np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 6
    flat = y.reshape(-1)
    edges = [-100.0, -88.8, -88.6, 0.0, 88.8, 1e-30]  # gates at the exponential's edges
    n = min(len(edges), flat.size // 2)
    flat[0:2 * n:2] = edges[:n]
    return jnp.asarray(y)


@pytest.mark.parametrize("shape", [(1, 2 * 1536), (512, 2 * 576), (7, 2 * 17), (3, 2 * 5),
                                   (2, 3, 2 * 40), (1, 2)])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_kernel_equals_xla(shape, dtype):
    y = _gate_up(shape, seed=shape[-1])
    f = jax.jit(lambda v: cpu_swiglu.silu_mul(v, dtype))
    assert cpu_swiglu.TARGET in f.lower(y).as_text()
    got = np.asarray(f(y), np.float32)
    want = np.asarray(jax.jit(lambda v: cpu_swiglu.reference(v, dtype))(y), np.float32)
    assert got.shape == shape[:-1] + (shape[-1] // 2,) and f(y).dtype == dtype
    if dtype == jnp.float32:  # the exponentials differ by a few ulps
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-30)
    else:  # rounded to bfloat16: equal but where a value sits on a rounding boundary
        np.testing.assert_allclose(got, want, rtol=8e-3, atol=0)
        assert (got != want).mean() < 1e-3
    gates = np.asarray(y).reshape(-1, 2)[:, 0].reshape(got.shape)
    assert not got[gates < -88.72].any()  # exp(-g) past float32: XLA's 0


def test_bfloat16_ties_and_specials_round_as_xla_converts():
    """Gates of 32 (silu(32) is 32 in float32: its sigmoid rounds to 1) times ups whose
    products sit halfway between two bfloat16 values (both directions, both signs, the largest
    rounding to infinity) or off a tie, a small normal value, an infinity and NaNs with
    payloads and signs: the kernel's integer rounding to nearest even is XLA's conversion bit
    for bit (a NaN XLA's quiet NaN with its sign)."""
    products = np.array([0x3F808000, 0x3F818000, 0xBF808000, 0xBF818000, 0x3F80FFFF, 0x3F808001,
                         0x7F7F8000, 0x7F7F7FFF, 0x03818000, 0x7F800000, 0xFFC12345, 0x7FBFFFFF,
                         0x7FC00001], np.uint32)
    ups = products.view(np.float32) / np.float32(32)  # exact: powers of two, normal values
    y = jnp.asarray(np.stack([np.full_like(ups, 32.0), ups], -1).reshape(1, -1))
    got = np.asarray(jax.jit(lambda v: cpu_swiglu.silu_mul(v, jnp.bfloat16))(y)).view(np.uint16)
    want = np.asarray(jax.jit(lambda v: cpu_swiglu.reference(v, jnp.bfloat16))(y))
    want = want.view(np.uint16)
    np.testing.assert_array_equal(got, want)
    assert got[0, 6] == 0x7F80 and got[0, 0] == 0x3F80 and got[0, 1] == 0x3F82  # to even
    assert got[0, 8] == 0x0382 and list(got[0, -3:]) == [0xFFC0, 0x7FC0, 0x7FC0]


def test_partitioned_programs_keep_xla():
    """A GSPMD program over two devices lowers to XLA's computation; a fully manual
    ``shard_map`` body takes the kernel."""
    y = _gate_up((4, 2 * 32))
    want = np.asarray(cpu_swiglu.reference(y, jnp.float32))
    mesh = Mesh(np.array(jax.devices()[:2]), ("dp",))
    ys = jax.device_put(y, NamedSharding(mesh, PartitionSpec("dp")))
    f = jax.jit(lambda v: cpu_swiglu.silu_mul(v, jnp.float32))
    compiled = f.lower(ys).compile()
    assert cpu_swiglu.TARGET not in compiled.as_text()
    np.testing.assert_allclose(np.asarray(compiled(ys)), want, rtol=2e-6)
    g = jax.jit(jax.shard_map(lambda v: cpu_swiglu.silu_mul(v, jnp.float32), mesh=mesh,
                              in_specs=PartitionSpec("dp"), out_specs=PartitionSpec("dp")))
    assert cpu_swiglu.TARGET in g.lower(ys).as_text()
    np.testing.assert_allclose(np.asarray(g(ys)), want, rtol=2e-6)


def test_gradients_and_vmap_see_xla():
    y = _gate_up((3, 2 * 8))
    got = jax.grad(lambda v: cpu_swiglu.silu_mul(v, jnp.float32).sum())(y)
    want = jax.grad(lambda v: cpu_swiglu.reference(v, jnp.float32).sum())(y)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)
    batched = jax.vmap(lambda v: cpu_swiglu.silu_mul(v, jnp.float32))(jnp.stack([y, -y]))
    np.testing.assert_allclose(np.asarray(batched[1]),
                               np.asarray(cpu_swiglu.reference(-y, jnp.float32)), rtol=2e-6)


def test_applies_only_to_float32_pairs():
    y = _gate_up((2, 8))
    assert cpu_swiglu.applies(y, jnp.bfloat16) and cpu_swiglu.applies(y, jnp.float32)
    assert not cpu_swiglu.applies(y.astype(jnp.bfloat16), jnp.bfloat16)
    assert not cpu_swiglu.applies(y[:, :7], jnp.float32)
    assert not cpu_swiglu.applies(y, jnp.float16)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_tiny_model_generation_with_and_without_the_kernel(dtype, monkeypatch):
    """Greedy generation of a tiny Llama (prefill and decode): the same tokens, logprobs
    within the dtype's rounding, and the MLP went through the kernel."""
    from xds_jax import SamplingParams

    golden = ROOT / "tests" / "golden" / "llama"
    params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=2)
    prompts = [{"prompt_token_ids": list(range(1, 40))}, {"prompt_token_ids": [3, 3, 8, 1]}]
    calls = spy(monkeypatch, cpu_swiglu, "silu_mul")
    with_kernel, without = generate_with_and_without(
        str(golden), dtype, prompts, params,
        lambda: monkeypatch.setattr(cpu_swiglu, "applies", lambda *a: False))
    assert calls
    assert_same_greedy(with_kernel, without, logprob_tol=3e-2 if dtype == "bfloat16" else 1e-4)
