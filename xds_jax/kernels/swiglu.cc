// xds-jax CPU kernel: SwiGLU's activation of a fused gate/up projection.
//
// out[m, f] = silu(y[m, 2f]) * y[m, 2f + 1], silu(g) = g * (1 / (1 + exp(-g))): gate and up
// interleaved as xds_jax/model/fused.py lays them out (so that a tensor-parallel block of
// columns holds matching pairs). XLA:CPU's loop over the strided halves runs at a third of the
// rate of the same loop over contiguous ones (a 512-token SmolLM2 prefill: ~0.8 ms a layer);
// here 16 pairs at a time are split in registers (two permutes), with XLA's arithmetic: the
// exponential of the kernels' softmax (kernel_math.h: within a few ulps of XLA's), a division,
// the two products in XLA's order, and the result rounded to nearest even where it is
// bfloat16. A gate below -88.7 (its exponential past float32's range) gives 0, as XLA's
// infinity does.
//
// AVX-512 F/BW/VL (cpu_swiglu.available checks; the bfloat16 rounding is integer arithmetic,
// so CPUs without AVX-512 BF16 run it too); built and registered by xds_jax/kernels/build.py,
// used through xds_jax/kernels/cpu_swiglu.py.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <memory>

#include "xla/ffi/api/ffi.h"
#include "kernel_math.h"
#include "pool_chunks.h"

namespace ffi = xla::ffi;

namespace {

using namespace xds_kernels;

#define XDS_SWIGLU __attribute__((target("avx512f,avx512bw,avx512vl")))

constexpr int64_t kChunkValues = 1 << 12;  // outputs per chunk: a batch-32 step's 49,152 take both cores

XDS_SWIGLU inline __m512 silu_mul16(__m512 g, __m512 u) {
  const __m512 neg = _mm512_sub_ps(_mm512_setzero_ps(), g);
  const __m512 e = exp16(_mm512_min_ps(neg, _mm512_set1_ps(88.0f)));
  __m512 d = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_add_ps(e, _mm512_set1_ps(1.0f)));
  const __mmask16 big = _mm512_cmp_ps_mask(neg, _mm512_set1_ps(88.7228394f), _CMP_GT_OQ);
  d = _mm512_mask_mov_ps(d, big, _mm512_setzero_ps());
  return _mm512_mul_ps(_mm512_mul_ps(g, d), u);
}

// 16 float32 values rounded to bfloat16, nearest even, as XLA converts them: a NaN becomes the
// quiet NaN 0x7fc0 with its sign (no payload).
XDS_SWIGLU inline __m256i bf16x16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i top = _mm512_srli_epi32(bits, 16);
  const __m512i even = _mm512_add_epi32(_mm512_and_si512(top, _mm512_set1_epi32(1)),
                                        _mm512_set1_epi32(0x7fff));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, even), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_or_epi32(r, nan, _mm512_and_si512(top, _mm512_set1_epi32(0x8000)),
                           _mm512_set1_epi32(0x7fc0));
  return _mm512_cvtepi32_epi16(r);
}

// Outputs [i0, i1) of the flattened [M, F] result.
XDS_SWIGLU void silu_mul_range(const float* y, int64_t F, void* out, bool bf16, int64_t i0,
                               int64_t i1) {
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odd = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
  for (int64_t m = i0 / F; m * F < i1; ++m) {
    const int64_t f0 = std::max<int64_t>(i0 - m * F, 0), f1 = std::min<int64_t>(i1 - m * F, F);
    const float* row = y + m * 2 * F;
    for (int64_t f = f0; f < f1; f += 16) {
      const int64_t n = std::min<int64_t>(16, f1 - f);  // pairs here: 2n values
      const __mmask16 lo = lanes16(2 * n, 0), hi = n > 8 ? lanes16(2 * n, 16) : 0;
      const __m512 a = _mm512_maskz_loadu_ps(lo, row + 2 * f);
      const __m512 b = _mm512_maskz_loadu_ps(hi, row + 2 * f + 16);
      const __m512 v = silu_mul16(_mm512_permutex2var_ps(a, even, b),
                                  _mm512_permutex2var_ps(a, odd, b));
      const int64_t at = m * F + f;
      if (bf16) {
        _mm256_mask_storeu_epi16(static_cast<uint16_t*>(out) + at, lanes16(n, 0), bf16x16(v));
      } else {
        _mm512_mask_storeu_ps(static_cast<float*>(out) + at, lanes16(n, 0), v);
      }
    }
  }
}

struct Work : Chunks {
  const float* y = nullptr;
  void* out = nullptr;
  int64_t F = 0, total = 0;
  bool bf16 = false;

  void run(int64_t chunk) override {
    const int64_t i0 = chunk * kChunkValues;
    silu_mul_range(y, F, out, bf16, i0, std::min(total, i0 + kChunkValues));
  }
};

ffi::Error SiluMul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> y, ffi::Result<ffi::AnyBuffer> out) {
  const auto yd = y.dimensions();
  const bool bf16 = out->element_type() == ffi::DataType::BF16;
  if (yd.size() < 1 || yd.back() % 2 != 0 ||
      out->element_count() * 2 != y.element_count() ||
      !(bf16 || out->element_type() == ffi::DataType::F32)) {
    return ffi::Error::InvalidArgument(
        "xds_silu_mul: float32 y [..., 2F] (gate/up pairs) and a bfloat16 or float32 result "
        "[..., F] expected");
  }
  auto work = std::make_shared<Work>();
  work->y = y.typed_data(), work->out = out->untyped_data(), work->bf16 = bf16;
  work->F = yd.back() / 2, work->total = static_cast<int64_t>(out->element_count());
  if (work->total == 0) return ffi::Error::Success();
  work->chunks = (work->total + kChunkValues - 1) / kChunkValues;
  run_chunks(pool, work);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(XdsSiluMul, SiluMul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>());

// Whether this CPU runs the kernel (AVX-512 F/BW/VL).
extern "C" int xds_swiglu_ok() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl");
}
