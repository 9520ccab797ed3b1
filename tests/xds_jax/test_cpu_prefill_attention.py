"""xds-jax's CPU kernel for a prefill chunk's attention over paged KV
(``xds_jax/kernels/prefill_attention.cc``): against the XLA paths it replaces (dense and
blockwise) and a float64 reference, both dtypes, head dims that are not a multiple of 64,
sliding windows, soft-capping, padding rows, page ids past the pool, long contexts (few query
tokens per work item), on each instruction-set path the CPU has (AVX-512, AVX2); the model's
attention and a tiny model's generation with and without it."""

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
pytestmark = pytest.mark.skipif(not cpu_attention.prefill_available(),
                                reason="the kernel cannot run here (no AVX2 or compiler)")


@pytest.fixture(params=[2, 1], ids=["avx512", "avx2"])
def isa(request):
    """The kernel on AVX-512 tiles (bfloat16 there on AVX-512 BF16's where the CPU has it,
    AMX's where it has them, else the AVX2 tiles) and on the AVX2 tiles, where the CPU has
    each."""
    if cpu_attention.use_prefill_isa(request.param) != request.param:
        cpu_attention.use_prefill_isa(2)
        pytest.skip(f"this CPU has no {request.node.callspec.id} path")
    yield request.param
    cpu_attention.use_prefill_isa(2)


def _case(dtype, s=37, k=3, g=2, d=48, pg=4, n=16, pages=70, start=(5, 20), seed=0):
    """Two sequences of ``s`` query tokens from positions ``start``, the second's last four
    padding; random pages, one table entry past the pool."""
    rng = np.random.default_rng(seed)
    b = len(start)
    q = jnp.asarray(rng.standard_normal((b, s, k, g, d)), dtype)
    kp = att.as_bits(jnp.asarray(rng.standard_normal((pages, pg, k, d)), dtype))
    vp = att.as_bits(jnp.asarray(rng.standard_normal((pages, pg, k, d)), dtype))
    tables = rng.permutation(pages)[:b * n].reshape(b, n).astype(np.int32)
    tables[0, -1] = pages + 9  # past the pool: clipped, as the XLA gather's mode="clip"
    pos = np.stack([np.arange(s) + p0 for p0 in start]).astype(np.int32)
    pos[-1, -4:] = -1
    return q, kp, vp, jnp.asarray(tables), jnp.asarray(pos)


def _float64(q, kp, vp, tables, pos, scale, cap, window):
    dtype = q.dtype
    q = np.asarray(q, np.float64)
    keys = np.asarray(att.read_pages(kp, tables, dtype), np.float64)  # [B, L, K, D]
    vals = np.asarray(att.read_pages(vp, tables, dtype), np.float64)
    s = np.einsum("bskgd,blkd->bskgl", q, keys) * scale
    if cap:
        s = cap * np.tanh(s / cap)
    mask = np.asarray(att.causal_mask(pos, keys.shape[1], window or None))
    s = np.where(mask[:, :, None, None, :], s, -np.inf)
    with np.errstate(invalid="ignore"):  # padding rows see no key: NaN, not compared
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
    return np.einsum("bskgl,blkd->bskgd", p, vals).reshape(q.shape[0], q.shape[1], -1)


def _run(args, **kw):
    f = jax.jit(lambda *a: att._paged_prefill.bind(*a, **kw))
    assert cpu_attention.PREFILL_TARGET in f.lower(*args).as_text()
    ref = jax.jit(lambda *a: att._paged_prefill_reference(*a, **kw))
    return np.asarray(f(*args)), np.asarray(ref(*args))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("cap", [0.0, 5.0])
@pytest.mark.parametrize("window", [0, 9])
@pytest.mark.parametrize("d", [48, 80])
def test_kernel_equals_the_xla_path_and_float64(dtype, cap, window, d, isa):
    args = _case(dtype, d=d, seed=d + int(cap) + window)
    kw = {"scale": 0.15, "cap": cap, "window": float(window)}
    got, xla = _run(args, **kw)
    real = np.asarray(args[4]) >= 0
    assert not got[~real].any()  # padding rows: zeros
    # the XLA path's arithmetic up to the order of its sums: bfloat16 probabilities may round
    # the other way
    tol = 2e-3 if dtype == jnp.bfloat16 else 1e-5
    np.testing.assert_allclose(got[real], xla[real], rtol=tol, atol=tol)
    exact = _float64(*args, 0.15, cap, window)
    tol = 2e-2 if dtype == jnp.bfloat16 else 1e-5
    np.testing.assert_allclose(got[real], exact[real], rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_a_table_wider_than_the_keys_seen(dtype, isa):
    """200 query tokens against tables of 1,024 keys of which they see at most 220: the
    items are sized by the keys seen (64 tokens), not by the table's width (24)."""
    args = _case(dtype, s=200, g=3, d=64, pg=16, n=64, pages=140, seed=11)
    got, xla = _run(args, scale=0.15, cap=0.0, window=0.0)
    real = np.asarray(args[4]) >= 0
    assert not got[~real].any()
    tol = 2e-3 if dtype == jnp.bfloat16 else 1e-5
    np.testing.assert_allclose(got[real], xla[real], rtol=tol, atol=tol)
    exact = _float64(*args, 0.15, 0.0, 0)
    tol = 2e-2 if dtype == jnp.bfloat16 else 1e-5
    np.testing.assert_allclose(got[real], exact[real], rtol=tol, atol=tol)


@pytest.mark.skipif(not cpu_attention.prefill_amx(), reason="this CPU (or OS) has no AMX tiles")
@pytest.mark.parametrize("cap", [0.0, 5.0])
@pytest.mark.parametrize("window", [0, 9])
@pytest.mark.parametrize("d", [64, 96])
def test_amx_tiles_equal_the_avx512_path_and_float64(cap, window, d):
    """bfloat16 with head dims a multiple of 32 on AMX tiles (96: a 64- and a 32-dim step of
    the value product; 37 tokens x 3 heads: a last group of 15 rows), against the same kernel
    with AMX off, the XLA path and float64."""
    args = _case(jnp.bfloat16, g=3, d=d, seed=d + int(cap) + window)
    kw = {"scale": 0.15, "cap": cap, "window": float(window)}
    got, xla = _run(args, **kw)
    assert not cpu_attention.use_prefill_amx(False)
    try:
        avx512, _ = _run(args, **kw)
    finally:
        assert cpu_attention.use_prefill_amx(True)
    real = np.asarray(args[4]) >= 0
    assert not got[~real].any()  # padding rows: zeros
    for want in (avx512, xla):  # the order of the sums differs: probabilities may round apart
        np.testing.assert_allclose(got[real], want[real], rtol=2e-3, atol=2e-3)
    exact = _float64(*args, 0.15, cap, window)
    np.testing.assert_allclose(got[real], exact[real], rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_long_context_against_the_blockwise_path(dtype, isa):
    """A 240-token chunk at positions 2800.. over 3072 slots (few query tokens per work item),
    and a window: the reference there is XLA's blockwise attention."""
    for window in (0, 700):
        args = _case(dtype, s=240, k=2, g=3, d=64, pg=16, n=192, pages=400, start=(2800, 10),
                     seed=window)
        assert att.use_blockwise(6, 240, 3072)
        got, xla = _run(args, scale=0.125, cap=0.0, window=float(window))
        real = np.asarray(args[4]) >= 0
        # bfloat16: the blockwise path rounds unnormalised probabilities, the kernel (as the
        # dense path and Hugging Face's eager attention) normalised ones
        tol = 1e-2 if dtype == jnp.bfloat16 else 1e-5
        np.testing.assert_allclose(got[real], xla[real], rtol=tol, atol=tol)
        q, kp, vp, tables, pos = args
        dense = np.asarray(jax.jit(lambda *a: att._prefill_attention(*a, 0.125))(
            q, att.read_pages(kp, tables, dtype), att.read_pages(vp, tables, dtype),
            att.causal_mask(pos, 3072, window or None)))
        tol = 2e-3 if dtype == jnp.bfloat16 else 1e-5
        np.testing.assert_allclose(got[real], dense[real], rtol=tol, atol=tol)


def test_applies_and_vmap_sees_the_xla_path():
    q, kp, vp, tables, pos = _case(jnp.float32)
    assert cpu_attention.prefill_applies(q, kp)
    assert not cpu_attention.prefill_applies(q[..., :40], kp)  # head dims not a multiple of 16
    assert not cpu_attention.prefill_applies(q.astype(jnp.bfloat16), kp)  # float32 pages
    bf16 = (q.astype(jnp.bfloat16), att.as_bits(jnp.zeros(kp.shape, jnp.bfloat16)))
    assert cpu_attention.prefill_applies(*bf16)
    kw = {"scale": 0.1, "cap": 0.0, "window": 0.0}
    got = np.asarray(att._paged_prefill.bind(q, kp, vp, tables, pos, **kw))
    batched = jax.vmap(lambda q_: att._paged_prefill.bind(q_, kp, vp, tables, pos, **kw))(
        jnp.stack([q, q]))
    real = np.asarray(pos) >= 0
    np.testing.assert_allclose(np.asarray(batched[1])[real], got[real], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_model_attention_with_and_without_the_kernel(dtype, monkeypatch):
    """A tiny Llama layer's prefill of a 13-token chunk after 6 cached tokens (and a padded
    sequence): the same output as XLA's prefill attention, the same cache."""
    from tests.helpers import tiny

    if tiny("llama").cfg.head_dim % 16:
        pytest.skip("the tiny model's heads are not a multiple of 16 dims")
    positions = [list(range(6, 19)), list(range(9)) + [-1] * 4]
    got, want = attention_layer_with_and_without(
        dtype, (2, 13), positions, [[3, 1, 4, 0, 9], [2, 5, 6, 7, 8]], 10, 4,
        lambda: monkeypatch.setattr(cpu_attention, "prefill_applies", lambda *a: False))
    assert cpu_attention.PREFILL_TARGET in got[2]
    assert cpu_attention.PREFILL_TARGET not in want[2]
    assert_same_attention(got, want, positions, dtype)


def test_tiny_model_generation_with_and_without_the_kernel(monkeypatch):
    """Greedy generation of a tiny Llama from prompts of several lengths: the same tokens,
    logprobs within float32 rounding, and the prompts' attention went through the kernel."""
    from xds_jax import SamplingParams

    golden = ROOT / "tests" / "golden" / "llama"
    params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=2)
    prompts = [{"prompt_token_ids": list(range(1, 40))}, {"prompt_token_ids": [3, 3, 8, 1]},
               {"prompt_token_ids": [int(t) for t in np.arange(70) % 50 + 1]}]
    calls = spy(monkeypatch, cpu_attention, "prefill_applies")
    with_kernel, without = generate_with_and_without(
        str(golden), "float32", prompts, params,
        lambda: monkeypatch.setattr(cpu_attention, "prefill_applies", lambda *a: False))
    assert any(took for _, took in calls)  # the prompts' attention went through it
    assert_same_greedy(with_kernel, without, logprob_tol=1e-4)
