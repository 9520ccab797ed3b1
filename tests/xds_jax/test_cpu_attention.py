"""xds-jax's CPU kernel for one decode token's attention over paged KV
(``xds_jax/kernels/paged_attention.cc``): against the XLA path it replaces and a float64
reference, masks (causal, sliding window, padding rows), soft-capping, page ids past the
pool, both dtypes; the model's lowering and a tiny model's greedy decode with and without it."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xds_jax.model.attention as att
from tests.helpers import (
    assert_same_attention,
    assert_same_greedy,
    attention_layer_with_and_without,
    generate_with_and_without,
    spy,
)
from xds_jax.kernels import cpu_attention

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not cpu_attention.available(),
                                reason="the kernel cannot run here (no x86-64 or compiler)")


def _case(dtype, b=5, k=3, g=2, d=48, pg=4, n=6, pages=40, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((b, k, g, d)), dtype)
    kp = att.as_bits(jnp.asarray(rng.standard_normal((pages, pg, k, d)), dtype))
    vp = att.as_bits(jnp.asarray(rng.standard_normal((pages, pg, k, d)), dtype))
    tables = rng.integers(0, pages, (b, n)).astype(np.int32)
    tables[0, -1] = pages + 7  # past the pool: clipped, as the XLA gather's mode="clip"
    return q, kp, vp, jnp.asarray(tables)


def _float64(q, kp, vp, tables, mask, scale, cap):
    """Attention in float64 from the pages, each query head against its kv head."""
    dtype = q.dtype
    q = np.asarray(q, np.float64)
    keys = np.asarray(att.read_pages(kp, tables, dtype), np.float64)  # [B, L, K, D]
    vals = np.asarray(att.read_pages(vp, tables, dtype), np.float64)
    s = np.einsum("bkgd,blkd->bkgl", q, keys) * scale
    if cap:
        s = cap * np.tanh(s / cap)
    s = np.where(np.asarray(mask)[:, None, None, :], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bkgl,blkd->bkgd", p, vals)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("cap", [0.0, 5.0])
@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("g,d", [(2, 48), (3, 80), (5, 40)])  # value product in registers
def test_kernel_equals_the_xla_path_and_float64(dtype, cap, window, g, d):
    """Head dims in blocks of 64 and 16 (48, 80) or in the plain loop (40; 5 heads a kv
    head); pages of 4 tokens, fewer than the score blocks' (the tail of a block)."""
    _assert_kernel_matches(dtype, cap, window, g, d, 4, [23, 0, 9, 17, 4])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("g", [1, 4, 6, 7, 8])
def test_every_score_block_width_over_pages_of_16(dtype, g):
    """The register-tiled scores (16 / 6 / 4 / 3 / 2 tokens a block, as many heads a kv head
    as fit beside them) and value product over several 16-token pages, a sliding window
    and a soft cap."""
    _assert_kernel_matches(dtype, 0.0, None, g, 64, 16, [90, 0, 40, 17, 63])
    _assert_kernel_matches(dtype, 30.0, 21, g, 32, 16, [90, 0, 40, 17, 63])


@pytest.mark.parametrize("isa", [1, 0])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_the_avx2_and_plain_paths_match_too(isa, dtype):
    """The paths a CPU without AVX-512 (AVX2 + FMA: register tiles on 8 lanes, every score
    block width; a head dim not a multiple of 8 in dot products) or without AVX2 (plain
    loops) takes, run here by lowering the kernel's instruction set."""
    assert cpu_attention.use_isa(isa) <= isa
    try:
        _assert_kernel_matches(dtype, 5.0, 7, 3, 80, 4, [23, 0, 9, 17, 4])
        _assert_kernel_matches(dtype, 0.0, None, 4, 64, 16, [90, 0, 40, 17, 63])
        for g, d in ((1, 64), (2, 48), (5, 40), (8, 32), (2, 36)):
            _assert_kernel_matches(dtype, 0.0, 21, g, d, 16, [90, 0, 40, 17, 63])
    finally:
        cpu_attention.use_isa(2)


def _assert_kernel_matches(dtype, cap, window, g, d, pg, positions):
    q, kp, vp, tables = _case(dtype, g=g, d=d, pg=pg, seed=int(cap) + (window or 0) + d + g)
    pos = jnp.asarray(positions)
    k_pos = jnp.arange(tables.shape[1] * kp.shape[1])[None]
    mask = k_pos <= pos[:, None]
    if window:
        mask &= k_pos > pos[:, None] - window
    kw = {"scale": 0.2, "cap": cap}
    got = np.asarray(jax.jit(lambda *a: att._paged_decode.bind(*a, **kw))(q, kp, vp, tables, mask))
    assert cpu_attention.TARGET in jax.jit(lambda *a: att._paged_decode.bind(*a, **kw)).lower(
        q, kp, vp, tables, mask).as_text()
    xla = np.asarray(jax.jit(lambda *a: att._paged_decode_reference(*a, **kw))(
        q, kp, vp, tables, mask))
    exact = _float64(q, kp, vp, tables, mask, 0.2, cap)
    # the XLA path's arithmetic (float32, probabilities rounded to bfloat16 before the values;
    # the kernel multiplies by the sum's reciprocal where XLA divides: a probability a float32
    # ulp apart may round to the neighbouring bfloat16, one bfloat16 ulp (2 ** -8) of p times
    # the value, in a few outputs; the rest agree to float32 rounding)
    if dtype == jnp.bfloat16:
        assert np.isclose(got, xla, rtol=1e-5, atol=1e-5).mean() >= 0.95
        np.testing.assert_allclose(got, xla, rtol=0, atol=4e-3)
    else:
        np.testing.assert_allclose(got, xla, rtol=1e-5, atol=1e-5)
    tol = 2e-2 if dtype == jnp.bfloat16 else 1e-5  # bfloat16: the rounded probabilities
    np.testing.assert_allclose(got, exact, rtol=tol, atol=tol)


def test_padding_rows_get_zeros_and_vmap_sees_the_xla_path():
    q, kp, vp, tables = _case(jnp.float32)
    mask = jnp.zeros((q.shape[0], tables.shape[1] * kp.shape[1]), bool).at[1, :3].set(True)
    got = np.asarray(att._paged_decode.bind(q, kp, vp, tables, mask, scale=0.1, cap=0.0))
    assert not got[[0, 2, 3, 4]].any() and got[1].any()
    batched = jax.vmap(lambda q_: att._paged_decode.bind(q_, kp, vp, tables, mask, scale=0.1,
                                                         cap=0.0))(jnp.stack([q, q]))
    np.testing.assert_allclose(np.asarray(batched[0, 1]), got[1], rtol=1e-5, atol=1e-6)


def test_dtypes_the_kernel_takes():
    q, kp, _, _ = _case(jnp.bfloat16)
    assert cpu_attention.applies(q, kp) and cpu_attention.applies(q[:1], kp)
    assert not cpu_attention.applies(q.astype(jnp.float32), kp)  # float32 q, bf16 pages


def test_tiny_model_decode_with_and_without_the_kernel(monkeypatch):
    """Batched greedy decode of a tiny Llama: the same tokens, logprobs within float32
    rounding, and the decode steps' attention went through the kernel."""
    from xds_jax import SamplingParams

    golden = ROOT / "tests" / "golden" / "llama"
    params = SamplingParams(max_tokens=10, temperature=0.0, logprobs=2)
    prompts = [{"prompt_token_ids": [1, 5, 9, 2, 7]}, {"prompt_token_ids": [3, 3, 8]},
               {"prompt_token_ids": list(range(1, 30))}]
    calls = spy(monkeypatch, cpu_attention, "applies")
    with_kernel, without = generate_with_and_without(
        str(golden), "float32", prompts, params,
        lambda: monkeypatch.setattr(cpu_attention, "applies", lambda *a: False))
    assert any(shape[0] >= 2 and took for shape, took in calls)  # batched decode rows
    assert_same_greedy(with_kernel, without, logprob_tol=1e-4)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_a_few_query_tokens_go_in_as_rows(dtype, monkeypatch):
    """A verify pass's k + 1 tokens per sequence (and padding) through the kernel, each with
    its own causal mask: the same output as XLA's prefill attention, and the cache the same."""
    positions = [[9, 10, 11], [4, 5, -1]]  # the second sequence's last: padding

    def turn_off():
        monkeypatch.setattr(cpu_attention, "applies", lambda *a: False)
        monkeypatch.setattr(cpu_attention, "prefill_applies", lambda *a: False)

    got, want = attention_layer_with_and_without(
        dtype, (2, 3), positions, [[3, 1, 4, 0], [2, 5, 6, 7]], 8, 3, turn_off)
    assert cpu_attention.TARGET in got[2]
    assert cpu_attention.TARGET not in want[2] and cpu_attention.PREFILL_TARGET not in want[2]
    assert_same_attention(got, want, positions, dtype)
