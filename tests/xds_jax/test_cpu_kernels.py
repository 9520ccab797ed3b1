"""xds-jax's CPU kernel for few-row bfloat16 matmuls (``xds_jax.kernels``): against a float32
reference on every instruction-set path the CPU has (AMX, AVX-512 BF16, AVX-512, AVX2), its
lowering (the kernel only where a program sees whole arrays), the transformations, the
model's greedy output, and the fallback where it cannot be built."""

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tests.helpers import assert_greedy_agrees, generate_with_and_without, spy
from xds_jax.kernels import cpu_matmul
from xds_jax.model.layers import matmul_f32

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(cpu_matmul.kernel_isa() == 0,
                                reason="the kernel cannot run here (no AVX2 or no compiler)")


def _operands(m: int, n: int, k: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, k), np.float32), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((n, k), np.float32), jnp.bfloat16)
    ref = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T  # exact products of bf16s
    return x, w, ref


def _kernel(x, w):
    return jax.jit(cpu_matmul.few_row_matmul)(x, w)


@pytest.fixture(params=["amx", 3, 2, 1], ids=["amx", "avx512-bf16", "avx512", "avx2"])
def isa(request):
    """The kernel's paths: Intel AMX tiles (from 2 rows; bfloat16 with K a multiple of 32,
    int8 of 64), AVX-512 BF16 (AMX off), AVX-512 without BF16 (bfloat16 widened to float32
    FMAs) and AVX2."""
    default_amx = cpu_matmul.amx_rows()
    if request.param == "amx":
        if not default_amx:
            pytest.skip("this CPU (or its OS) gives no AMX tiles")
        yield cpu_matmul.use_isa(3)
        return
    if request.param > cpu_matmul.kernel_isa():
        pytest.skip(f"this CPU lacks {cpu_matmul.ISA_NAMES[request.param]}")
    cpu_matmul.use_amx(0)
    yield cpu_matmul.use_isa(request.param)
    cpu_matmul.use_isa(3)
    cpu_matmul.use_amx(default_amx)


# every row count the kernels take (each has its own block width), N off the block widths and
# the 24-column chunk multiples, K with tails past the 32-, 16- and 8-wide steps
SHAPES = [(1, 1, 576), (1, 130, 100), (2, 67, 37), (3, 50, 9), (3, 1000, 64), (4, 576, 1536),
          (5, 67, 37),
          (6, 130, 100), (7, 25, 70), (8, 1000, 64), (11, 1000, 64), (13, 67, 37),
          (21, 67, 37), (32, 130, 100),
          # past 8 rows: groups of rows (3, 4 or 6), each rest, later panels with a rest
          (97, 67, 37), (100, 25, 70), (107, 67, 37), (197, 25, 70),
          # AMX: one tile of rows against 64 weight rows and a tail, pairs of tiles (rows
          # padded) against 32 and a tail, a second panel of 256 rows
          (2, 64, 64), (16, 70, 32), (17, 600, 576), (48, 64, 1536), (300, 96, 64)]


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_kernel_equals_float_reference(isa, m, n, k):
    """float32 accumulation of exact bfloat16 products."""
    x, w, ref = _operands(m, n, k, seed=m * 1000 + n + k)
    got = np.asarray(_kernel(x, w))
    assert got.shape == (m, n) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4 * np.sqrt(k))


@pytest.mark.parametrize("m", [1, 3, 11])
def test_empty_contraction_gives_zeros(isa, m):
    """K = 0 (an empty contraction): zeros, as XLA's dot gives (it divided by zero k steps in
    the weight prefetch and killed the process). (int8's split rows need a maximum: K >= 1.)"""
    for dtype in (jnp.bfloat16, jnp.float32):
        if dtype == jnp.float32 and m > cpu_matmul.max_rows(float32=True):
            continue
        got = _kernel(jnp.ones((m, 0), dtype), jnp.ones((5, 0), dtype))
        np.testing.assert_array_equal(np.asarray(got), np.zeros((m, 5), np.float32))


@pytest.mark.parametrize("m,n,k", SHAPES + [(64, 130, 100), (512, 30, 40)])
def test_float32_kernel_equals_float64_reference(isa, m, n, k):
    """float32 rows and weights: float32 sums of the products, the lowering the kernel where
    ``applies`` says so (AVX-512 BF16 CPUs and AVX2-only ones to 512 rows, the AVX2 ones on the
    packed GEMM from 48; the AVX2 paths run here at every row count where forced)."""
    if m > cpu_matmul.max_rows(float32=True):
        pytest.skip(f"float32 takes the kernel to {cpu_matmul.max_rows(float32=True)} rows here")
    rng = np.random.default_rng(m * 1000 + n + k)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((n, k)), jnp.float32)
    assert cpu_matmul.applies(x, w, w_transposed=True)
    f = jax.jit(lambda a, b: matmul_f32(a, b, w_transposed=True))
    assert cpu_matmul.F32_TARGET in f.lower(x, w).as_text()
    got = np.asarray(f(x, w))
    ref = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=2e-6 * np.sqrt(k) * np.sqrt(k))


@pytest.mark.parametrize("m,n,k", [(1, 16, 7), (5, 48, 300), (6, 80, 8), (7, 1040, 100),
                                   (13, 32, 600), (64, 576, 1536), (97, 48, 256), (50, 30, 40),
                                   (8, 16, 300), (3, 16, 0), (9, 150, 70), (4, 8, 20)])
def test_float32_packed_gemm_equals_float64_reference(m, n, k):
    """AVX2's packed GEMM (forced from one row): 6-row tiles, each rest (1 or 2 past 6 as two
    groups of 3 or 4), one to 65 panels of 16 outputs (chunks of 16 to 64), K steps of 256
    with tails past the 8-wide transposes, an empty contraction; outputs past the last whole
    panel (30, 150) on the blocks, fewer than one panel (8) all on them."""
    if not cpu_matmul.kernel_isa():
        pytest.skip("the kernel cannot run here")
    default = cpu_matmul.use_gemm(-1)
    assert cpu_matmul.use_isa(1) == 1
    try:
        assert cpu_matmul.use_gemm(1) == 1
        rng = np.random.default_rng(m * 1000 + n + k)
        x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
        w = jnp.asarray(rng.standard_normal((n, k)), jnp.float32)
        calls = cpu_matmul.gemm_calls()
        got = np.asarray(jax.jit(cpu_matmul.few_row_matmul)(x, w))
        assert cpu_matmul.gemm_calls() == calls + (n >= 16)  # the GEMM ran (not under 16)
    finally:
        cpu_matmul.use_gemm(default), cpu_matmul.use_isa(3)
    ref = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=2e-6 * k + 1e-30)


def _tied_rows(m: int, k: int, rng) -> np.ndarray:
    """Normal rows, the first with entries that land halfway between two fixed-point steps
    (its max is the limit, so its scale is 1: 2.5 rounds to 2, -3.5 to -4), a zero and, when
    there are more rows, a row of zeros."""
    from xds_jax.model.quant import _ACT_LIMIT

    x = rng.standard_normal((m, k)).astype(np.float32)
    x[0, :6] = [_ACT_LIMIT, 2.5, -3.5, 0.5, -0.5, 0.0][:k]
    if m > 1:
        x[-1] = 0.0
    return x


@pytest.mark.parametrize("m,n,k", SHAPES[::2] + [(2, 130, 100), (5, 67, 37), (97, 67, 37)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_int8_kernel_equals_xla_s_int32_dot(isa, m, n, k, dtype):
    """Weight-only int8: float32 or bfloat16 rows split in the kernel into 16-bit halves
    against int8 weights, exact int32 sums: the same float32 numbers as XLA's split and int32
    dot (``quant.int8_matmul``'s arithmetic; rows with ties and a row of zeros), and the
    quantised matmul the model calls within int8 rounding of the float32 product."""
    from xds_jax.model.quant import _ACT_LIMIT, int8_matmul

    rng = np.random.default_rng(m * 1000 + n + k)
    x = jnp.asarray(_tied_rows(m, k, rng), dtype)
    w_q = jnp.asarray(rng.integers(-127, 128, (n, k), dtype=np.int8))
    scale = jnp.asarray(rng.uniform(1e-3, 2e-2, n), jnp.float32)
    kernel = jax.jit(cpu_matmul.few_row_int8_matmul, static_argnums=3)
    assert cpu_matmul.INT8_TARGET in kernel.lower(x, w_q, scale, _ACT_LIMIT).as_text()
    got = np.asarray(kernel(x, w_q, scale, _ACT_LIMIT))
    xla = jax.jit(functools.partial(cpu_matmul._int8_dot, act_limit=_ACT_LIMIT))
    want = np.asarray(xla(x, w_q, scale))
    assert got.shape == (m, n) and got.dtype == np.float32
    np.testing.assert_array_equal(got, want)
    if m <= cpu_matmul.max_rows(int8=True):
        via = np.asarray(jax.jit(int8_matmul, static_argnums=3)(x, w_q, scale, True))
        np.testing.assert_array_equal(via, got)
        w = np.asarray(w_q, np.float64) * np.asarray(scale, np.float64)[:, None]
        exact = np.asarray(x, np.float64) @ w.T
        # the rows' 16-bit fixed point is off by half a step per element, at most
        step = np.abs(np.asarray(x, np.float64)).max(axis=1, keepdims=True) / (127 * 256 + 127)
        bound = 0.5 * step * np.abs(w).sum(axis=1)[None, :] + 1e-5 * np.abs(exact)
        assert np.all(np.abs(via - exact) <= bound)


@pytest.mark.parametrize("m", [1, 2, 5])
@pytest.mark.parametrize("k", [1024, 2 * 4096 + 37])
def test_int8_kernel_sums_extreme_rows_past_int32(isa, m, k):
    """Rows at the fixed point's limit (every value the largest, 32639) against weights at
    int8's (-128 and 127): each int32 lane of the AVX2 path meets the bound of its 4096-k span
    (2 x 32639 x 128 a step), the whole sum far past int32. At K = 1024 the halves' sums stay
    within float32's exact integers, so the result is XLA's bit for bit; at 8229, the exact
    sum within one float32 rounding."""
    from xds_jax.model.quant import _ACT_LIMIT

    n = 30
    x = np.ones((m, k), np.float32)
    w = np.where(np.arange(n)[:, None] % 2 == 0, -128, 127) * np.ones((1, k), np.int64)
    w = w.astype(np.int8)
    scale = np.full(n, 1e-3, np.float32)
    args = (jnp.asarray(x), jnp.asarray(w), jnp.asarray(scale))
    got = np.asarray(jax.jit(cpu_matmul.few_row_int8_matmul, static_argnums=3)(
        *args, _ACT_LIMIT))
    q = np.round(x * _ACT_LIMIT).astype(np.int64)  # max|row| = 1 maps to the limit
    sums = q @ w.T.astype(np.int64)
    assert np.abs(sums).max() > 2**31 or k == 1024
    if k == 1024:
        xla = jax.jit(functools.partial(cpu_matmul._int8_dot, act_limit=_ACT_LIMIT))
        np.testing.assert_array_equal(got, np.asarray(xla(*args)))
    exact = sums * (np.float64(1) / _ACT_LIMIT) * 1e-3
    np.testing.assert_allclose(got, exact, rtol=4e-7)


@pytest.mark.skipif(cpu_matmul.kernel_isa() < 2, reason="this CPU lacks AVX-512")
@pytest.mark.parametrize("m,n,k", [(1, 130, 100), (3, 50, 9), (8, 1000, 64), (97, 67, 37)])
def test_int8_on_avx512_without_vnni_equals_xla(m, n, k):
    """An AVX-512 CPU without VNNI (a Skylake-SP): the rows split by the AVX-512 code, the
    products by AVX2's 16-bit blocks; XLA's numbers (K <= 1024)."""
    from xds_jax.model.quant import _ACT_LIMIT

    rng = np.random.default_rng(m + n + k)
    x = jnp.asarray(_tied_rows(m, k, rng), jnp.bfloat16)
    w_q = jnp.asarray(rng.integers(-127, 128, (n, k), dtype=np.int8))
    scale = jnp.asarray(rng.uniform(1e-3, 2e-2, n), jnp.float32)
    xla = jax.jit(functools.partial(cpu_matmul._int8_dot, act_limit=_ACT_LIMIT))
    kernel = jax.jit(cpu_matmul.few_row_int8_matmul, static_argnums=3)
    isa, vnni = cpu_matmul.use_isa(2), cpu_matmul.use_vnni(False)
    try:
        assert isa == 2 and not vnni
        got = np.asarray(kernel(x, w_q, scale, _ACT_LIMIT))
    finally:
        cpu_matmul.use_isa(3), cpu_matmul.use_vnni(True)
    np.testing.assert_array_equal(got, np.asarray(xla(x, w_q, scale)))


def test_matmul_f32_takes_the_kernel_only_where_it_applies():
    x4, w, _ = _operands(4, 64, 32)
    assert cpu_matmul.applies(x4, w, w_transposed=True)
    assert not cpu_matmul.applies(x4, w.T, w_transposed=False)  # [K, N]: XLA's dot
    x4f, wf = x4.astype(jnp.float32), w.astype(jnp.float32)
    assert cpu_matmul.applies(x4f, wf, True) == (cpu_matmul.kernel_isa() > 0)
    assert not cpu_matmul.applies(x4f, w, True)  # mixed dtypes: XLA's dot
    x_past = jnp.ones((cpu_matmul.max_rows() + 1, 32), jnp.bfloat16)  # past it: XLA's dot
    assert not cpu_matmul.applies(x_past, w, w_transposed=True)
    w_q = jnp.ones((64, 32), jnp.int8)
    assert cpu_matmul.applies_int8(x4, w_q, w_transposed=True)
    assert not cpu_matmul.applies_int8(x4, w_q.T, w_transposed=False)
    # int8 takes any rows (ahead of XLA's int32 dot at every count, AVX-512 and AVX2)
    x_many = jnp.ones((600, 32), jnp.bfloat16)
    assert cpu_matmul.applies_int8(x_many, w_q, True) == (cpu_matmul.kernel_isa() > 0)
    assert not cpu_matmul.applies_int8(x4, w, w_transposed=True)  # not int8
    # matmul_f32 over leading dims: [B, S, K] rows flattened, the same numbers either way
    x_BSK = x4.reshape(2, 2, 32)
    text = jax.jit(lambda a, b: matmul_f32(a, b, w_transposed=True)).lower(x_BSK, w).as_text()
    assert cpu_matmul.TARGET in text
    np.testing.assert_allclose(
        np.asarray(matmul_f32(x_BSK, w, w_transposed=True)).reshape(4, 64),
        np.asarray(cpu_matmul._dot(x4, w)), rtol=1e-5, atol=1e-4)


def test_row_limits_follow_the_instruction_set(monkeypatch):
    monkeypatch.setattr(cpu_matmul, "kernel_isa", lambda: 3)
    assert cpu_matmul.max_rows(float32=True) == cpu_matmul.MAX_ROWS_F32
    assert cpu_matmul.max_rows() == cpu_matmul.MAX_ROWS
    monkeypatch.setattr(cpu_matmul, "kernel_isa", lambda: 2)  # AVX-512 without BF16
    assert cpu_matmul.max_rows(float32=True) == cpu_matmul.MAX_ROWS_F32_AVX512
    assert cpu_matmul.max_rows() == cpu_matmul.MAX_ROWS
    assert cpu_matmul.max_rows(int8=True) == sys.maxsize
    monkeypatch.setattr(cpu_matmul, "kernel_isa", lambda: 1)
    assert cpu_matmul.max_rows() == cpu_matmul.MAX_ROWS_AVX2
    assert cpu_matmul.max_rows(int8=True) == sys.maxsize  # ahead of XLA's at every count
    assert cpu_matmul.max_rows(float32=True) == cpu_matmul.MAX_ROWS_F32_AVX2
    monkeypatch.setattr(cpu_matmul, "kernel_isa", lambda: 0)
    assert cpu_matmul.max_rows() == cpu_matmul.max_rows(int8=True) == 0
    assert not cpu_matmul.applies(*_operands(2, 8, 16)[:2], w_transposed=True)


def test_partitioned_programs_keep_the_dot():
    """A GSPMD program over two devices lowers to XLA's dot (no gather of a sharded weight
    for the kernel); one device and a fully manual ``shard_map`` body take the kernel."""
    x, w, ref = _operands(2, 128, 64)
    f = jax.jit(lambda a, b: matmul_f32(a, b, w_transposed=True))
    assert cpu_matmul.TARGET in f.lower(x, w).as_text(dialect="hlo")
    mesh = Mesh(np.array(jax.devices()[:2]), ("tp",))
    w_sharded = jax.device_put(w, NamedSharding(mesh, PartitionSpec("tp", None)))
    x_repl = jax.device_put(x, NamedSharding(mesh, PartitionSpec()))
    compiled = f.lower(x_repl, w_sharded).compile()
    assert cpu_matmul.TARGET not in compiled.as_text()
    np.testing.assert_allclose(np.asarray(compiled(x_repl, w_sharded)), ref, rtol=1e-5,
                               atol=1e-3)

    def local(a, b):
        return matmul_f32(a, b, w_transposed=True)

    g = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(PartitionSpec(), PartitionSpec("tp")),
                              out_specs=PartitionSpec(None, "tp")))
    assert cpu_matmul.TARGET in g.lower(x_repl, w_sharded).as_text(dialect="hlo")
    np.testing.assert_allclose(np.asarray(g(x_repl, w_sharded)), ref, rtol=1e-5, atol=1e-3)


def test_gradients_and_vmap_see_the_dot():
    x, w, _ = _operands(3, 48, 40)
    xf, wf = x.astype(jnp.float32), w.astype(jnp.float32)

    def loss(fn, a, b):
        return jnp.sum(jnp.sin(fn(a, b)))

    got = jax.grad(lambda a, b: loss(cpu_matmul.few_row_matmul, a, b), argnums=(0, 1))(x, w)
    want = jax.grad(lambda a, b: loss(cpu_matmul._dot, a, b), argnums=(0, 1))(x, w)
    for g_, w_ in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g_, np.float32), np.asarray(w_, np.float32),
                                   rtol=2e-2, atol=2e-2)
    xs = jnp.stack([x, x[::-1]])
    batched = jax.vmap(cpu_matmul.few_row_matmul, in_axes=(0, None))(xs, w)
    np.testing.assert_allclose(np.asarray(batched[1]), np.asarray(xf[::-1] @ wf.T), rtol=1e-5,
                               atol=1e-3)


def test_tiny_model_greedy_output_is_the_dot_s(monkeypatch):
    """A bfloat16 decode through the kernel (a tiny model's rows pad to 4) gives XLA's dot's
    greedy tokens and logits within bfloat16 rounding (on an AVX2-only CPU one step of this
    random model was a near-tie, 79 against 111 within 0.004, that the two orders of
    summation broke differently)."""
    from xds_jax import SamplingParams

    golden = ROOT / "tests" / "golden" / "llama"
    params = SamplingParams(max_tokens=12, temperature=0.0, logprobs=3)
    prompts = [{"prompt_token_ids": [1, 5, 9, 2, 7]}, {"prompt_token_ids": [3, 3, 8]}]
    traced = spy(monkeypatch, cpu_matmul, "few_row_matmul")
    with_kernel, without = generate_with_and_without(
        str(golden), "bfloat16", prompts, params,
        lambda: monkeypatch.setattr(cpu_matmul, "applies", lambda *a: False))
    assert traced  # the decode steps' projections went through it
    assert_greedy_agrees(with_kernel, without, logprob_tol=3e-2)


def _probe(env: dict, tmp_path: Path, cache: Path | None = None) -> str:
    code = ("import logging, sys; logging.basicConfig(stream=sys.stdout, level=logging.WARNING)\n"
            "import jax.numpy as jnp\n"
            "from xds_jax.kernels import cpu_matmul\n"
            "from xds_jax.model.layers import matmul_f32\n"
            "y = matmul_f32(jnp.ones((1, 8), jnp.bfloat16), jnp.ones((3, 8), jnp.bfloat16), True)\n"
            "print('isa', cpu_matmul.kernel_isa(), 'sum', float(y.sum()))\n")
    run_env = {**os.environ, "XDS_CACHE_DIR": str(cache or tmp_path), **env}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=run_env, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_without_the_kernel_xla_runs_the_matmuls(tmp_path, monkeypatch):
    """Turned off, or no compiler: the same numbers from XLA's dot, the reason logged; an
    unwritable cache directory: the kernel from the temporary directory."""
    from xds_jax.kernels import build

    for off in ("0", "false", "OFF"):
        monkeypatch.setenv("XDS_CPU_KERNELS", off)
        assert not build.enabled()
    monkeypatch.delenv("XDS_CPU_KERNELS")
    assert build.enabled()
    out = _probe({"CXX": "/nonexistent/g++", "XDS_CPU_KERNELS": "1"}, tmp_path)
    assert "isa 0 sum 24.0" in out and "no C++ compiler" in out
    # where the cache directory cannot be made (a file there) the libraries come from TMPDIR
    # (copied there: building them there is tests/xds_jax/test_kernel_build.py's)
    (tmp_path / "not-a-dir").write_text("")
    fallback = tmp_path / "tmp" / "xds_jax-kernels"
    fallback.mkdir(parents=True)
    compiler = build._compiler()
    for name in build.library_names():
        shutil.copy(build.build(name, compiler), fallback)
    env = {"XDS_CPU_KERNELS": "1", "TMPDIR": str(tmp_path / "tmp")}
    built = _probe(env, tmp_path, cache=tmp_path / "not-a-dir" / "cache")
    assert f"isa {cpu_matmul.kernel_isa()} sum 24.0" in built
    assert list(fallback.glob(f"{cpu_matmul.LIBRARY}-*.so"))
