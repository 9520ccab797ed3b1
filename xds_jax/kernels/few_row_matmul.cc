// xds-jax CPU kernels: y[M, N] (float32) = x[M, K] . w[N, K]^T for a few rows M <= 8.
//
// A decode step's matmuls have a handful of rows (batch x tokens) against weights read once:
// the time is the weight stream. XLA:CPU runs a one-row bfloat16 dot as a matrix-vector
// product that converts the weight to float32 on every call, and 2-4-row dots at 13-15 GB/s
// (docs/performance.md). These kernels read each output's weight row once (output-major, the
// layout xds_jax.model.out_major stores on CPU), multiply it into every row of x and split
// the outputs over XLA's intra-op thread pool (the caller takes chunks too, so it never waits
// on a task that has not started).
//
// - XdsBf16Matmul: bfloat16 x and w, float32 accumulation: AVX-512 BF16's pair dot product,
//   or AVX2 FMAs on the widened values.
// - XdsInt8Matmul: weight-only int8 (xds_jax.model.quant): w int8 with float32 scales [N]; the
//   rows arrive as quant._split_rows' 16-bit fixed point, int8 halves hi and lo with a float32
//   scale per row, x ~= (256 hi + lo) * x_scale. Integer products accumulate exactly in int32
//   (AVX-512 VNNI's byte dot product, or AVX2's 16-bit multiply-add), then
//   y = ((256 acc_hi + acc_lo) * x_scale) * w_scale: the same numbers as XLA's int32 dot.
//
// Built and registered by xds_jax/kernels/build.py; used through xds_jax/kernels/cpu_matmul.py.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// Loops over rows and block columns unrolled whole, so their accumulators stay in registers.
#define UNROLL _Pragma("GCC unroll 16")

namespace {

constexpr int64_t kBlocks = 24;  // a multiple of every block width: chunks are multiples of it
constexpr int64_t kChunksPerThread = 16;  // few enough grabs that the counters stay cold
constexpr int64_t kMaxRows = 8;

// The operands of one call. ``x`` is bfloat16 rows; or, with int8 weights, the rows' hi halves
// then their lo halves ([2M, K]): widened to int16 (``xq``) or offset to unsigned (``xq8``).
struct Operands {
  const uint16_t* x = nullptr;
  const int16_t* xq = nullptr;    // AVX2
  const uint8_t* xq8 = nullptr;   // AVX-512 VNNI
  const float* x_scale = nullptr;  // [M]
  const void* w = nullptr;
  const float* w_scale = nullptr;  // [N]
  float* y = nullptr;
  int64_t M = 0, N = 0, K = 0;
};

// Output blocks of NB columns; the tail of a chunk runs with NB = 1.
template <int NB, typename Block>
inline void blocks(int64_t n0, int64_t n1, Block&& block) {
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) block(n, std::integral_constant<int, NB>{});
  for (; n < n1; ++n) block(n, std::integral_constant<int, 1>{});
}

// ---- AVX-512 -----------------------------------------------------------------------------------
#define XDS_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx512vnni")))

template <int M, int NB>
XDS_AVX512 void bf16_block512(const Operands& o, int64_t n) {
  const int64_t K = o.K, kfull = K / 32 * 32;
  const auto* w = static_cast<const uint16_t*>(o.w) + n * K;
  __m512 acc[M][NB];
  UNROLL for (int m = 0; m < M; ++m)
    UNROLL for (int j = 0; j < NB; ++j) acc[m][j] = _mm512_setzero_ps();
  // one loop, the last step masked (masked loads cost as much as plain ones; a lambda for
  // the step kept the accumulators in memory); the rows' values held, one weight at a time
  const __mmask32 tail = (__mmask32)((1ull << (K - kfull)) - 1);
  // rows' values held in registers where they fit beside the accumulators, else read from L1
  constexpr bool hold = M * NB + M + 1 <= 32;
  for (int64_t k = 0; k < K; k += 32) {
    const __mmask32 mask = k < kfull ? ~__mmask32{0} : tail;
    __m512i xv[hold ? M : 1];
    if constexpr (hold) {
      UNROLL for (int m = 0; m < M; ++m) xv[m] = _mm512_maskz_loadu_epi16(mask, o.x + m * K + k);
    }
    UNROLL for (int j = 0; j < NB; ++j) {
      const __m512i wv = _mm512_maskz_loadu_epi16(mask, w + j * K + k);
      UNROLL for (int m = 0; m < M; ++m) {
        const __m512i x = hold ? xv[hold ? m : 0] : _mm512_maskz_loadu_epi16(mask, o.x + m * K + k);
        acc[m][j] = _mm512_dpbf16_ps(acc[m][j], (__m512bh)x, (__m512bh)wv);
      }
    }
  }
  UNROLL for (int m = 0; m < M; ++m)
    UNROLL for (int j = 0; j < NB; ++j) o.y[m * o.N + n + j] = _mm512_reduce_add_ps(acc[m][j]);
}

// VNNI multiplies unsigned by signed bytes, so the halves arrive offset by 128 (xq8: hi + 128
// then lo + 128, [2M, K] bytes) and 128 times each column's weight sum comes off.
template <int M, int NB>
XDS_AVX512 void int8_block512(const Operands& o, int64_t n) {
  const int64_t K = o.K, kfull = K / 64 * 64;
  const auto* w = static_cast<const int8_t*>(o.w) + n * K;
  const __m512i ones = _mm512_set1_epi8(1);
  __m512i hi[M][NB], lo[M][NB], sum[NB];
  UNROLL for (int j = 0; j < NB; ++j) {
    sum[j] = _mm512_setzero_si512();
    UNROLL for (int m = 0; m < M; ++m) hi[m][j] = lo[m][j] = _mm512_setzero_si512();
  }
  const __mmask64 tail = K - kfull == 0 ? 0 : (~__mmask64{0} >> (64 - (K - kfull)));
  for (int64_t k = 0; k < K; k += 64) {
    const __mmask64 mask = k < kfull ? ~__mmask64{0} : tail;
    __m512i h[M], l[M];
    UNROLL for (int m = 0; m < M; ++m) {
      h[m] = _mm512_maskz_loadu_epi8(mask, o.xq8 + m * K + k);
      l[m] = _mm512_maskz_loadu_epi8(mask, o.xq8 + (M + m) * K + k);
    }
    UNROLL for (int j = 0; j < NB; ++j) {
      const __m512i wv = _mm512_maskz_loadu_epi8(mask, w + j * K + k);
      sum[j] = _mm512_dpbusd_epi32(sum[j], ones, wv);
      UNROLL for (int m = 0; m < M; ++m) {
        hi[m][j] = _mm512_dpbusd_epi32(hi[m][j], h[m], wv);
        lo[m][j] = _mm512_dpbusd_epi32(lo[m][j], l[m], wv);
      }
    }
  }
  UNROLL for (int j = 0; j < NB; ++j) {
    const int32_t offset = 128 * _mm512_reduce_add_epi32(sum[j]);
    UNROLL for (int m = 0; m < M; ++m) {
      const float hs = static_cast<float>(_mm512_reduce_add_epi32(hi[m][j]) - offset);
      const float ls = static_cast<float>(_mm512_reduce_add_epi32(lo[m][j]) - offset);
      o.y[m * o.N + n + j] = (hs * 256.0f + ls) * o.x_scale[m] * o.w_scale[n + j];
    }
  }
}

// ---- AVX2 + FMA --------------------------------------------------------------------------------
#define XDS_AVX2 __attribute__((target("avx2,fma")))

XDS_AVX2 inline __m256 widen8(const uint16_t* p) {  // 8 bfloat16 -> float32: a 16-bit shift
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

XDS_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

XDS_AVX2 inline int32_t hsum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

inline float bf16_value(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  __builtin_memcpy(&f, &bits, sizeof f);
  return f;
}

template <int M, int NB>
XDS_AVX2 void bf16_block256(const Operands& o, int64_t n) {
  const int64_t K = o.K, kfull = K / 8 * 8;
  const auto* w = static_cast<const uint16_t*>(o.w) + n * K;
  __m256 acc[M][NB];
  UNROLL for (int m = 0; m < M; ++m)
    UNROLL for (int j = 0; j < NB; ++j) acc[m][j] = _mm256_setzero_ps();
  for (int64_t k = 0; k < kfull; k += 8) {
    __m256 xv[M];
    UNROLL for (int m = 0; m < M; ++m) xv[m] = widen8(o.x + m * K + k);
    UNROLL for (int j = 0; j < NB; ++j) {
      const __m256 wv = widen8(w + j * K + k);
      UNROLL for (int m = 0; m < M; ++m) acc[m][j] = _mm256_fmadd_ps(xv[m], wv, acc[m][j]);
    }
  }
  UNROLL for (int m = 0; m < M; ++m)
    UNROLL for (int j = 0; j < NB; ++j) {
      float s = hsum(acc[m][j]);
      for (int64_t k = kfull; k < K; ++k)
        s += bf16_value(o.x[m * K + k]) * bf16_value(w[j * K + k]);
      o.y[m * o.N + n + j] = s;
    }
}

template <int M, int NB>
XDS_AVX2 void int8_block256(const Operands& o, int64_t n) {
  const int64_t K = o.K, kfull = K / 16 * 16;
  const auto* w = static_cast<const int8_t*>(o.w) + n * K;
  __m256i hi[M][NB], lo[M][NB];
  UNROLL for (int m = 0; m < M; ++m)
    UNROLL for (int j = 0; j < NB; ++j) hi[m][j] = lo[m][j] = _mm256_setzero_si256();
  for (int64_t k = 0; k < kfull; k += 16) {
    __m256i wv[NB];
    UNROLL for (int j = 0; j < NB; ++j)
      wv[j] = _mm256_cvtepi8_epi16(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + j * K + k)));
    UNROLL for (int m = 0; m < M; ++m) {
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(o.xq + m * K + k));
      const __m256i l =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(o.xq + (M + m) * K + k));
      UNROLL for (int j = 0; j < NB; ++j) {
        hi[m][j] = _mm256_add_epi32(hi[m][j], _mm256_madd_epi16(h, wv[j]));
        lo[m][j] = _mm256_add_epi32(lo[m][j], _mm256_madd_epi16(l, wv[j]));
      }
    }
  }
  UNROLL for (int m = 0; m < M; ++m)
    UNROLL for (int j = 0; j < NB; ++j) {
      int32_t h = hsum(hi[m][j]), l = hsum(lo[m][j]);
      for (int64_t k = kfull; k < K; ++k) {
        h += o.xq[m * K + k] * w[j * K + k];
        l += o.xq[(M + m) * K + k] * w[j * K + k];
      }
      o.y[m * o.N + n + j] =
          (static_cast<float>(h) * 256.0f + static_cast<float>(l)) * o.x_scale[m] *
          o.w_scale[n + j];
    }
}

// ---- dispatch -----------------------------------------------------------------------------------
int detect_isa() {
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16") &&
      __builtin_cpu_supports("avx512vnni")) {
    return 2;
  }
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 1 : 0;
}

// 2: AVX-512 (BF16, VNNI), 1: AVX2 + FMA, 0: neither. Lowered by xds_few_row_use_isa (tests).
std::atomic<int> g_isa{detect_isa()};

// Block widths keep the accumulators, the rows' values and a weight in registers: 32 zmm
// (AVX-512) or 16 ymm (AVX2); each divides kBlocks. The int8 path was chosen when the call's
// rows were prepared (xq8 or xq).
template <int M>
void columns(const Operands& o, int64_t n0, int64_t n1) {
  if (o.xq8 != nullptr) {  // 2M x NB accumulators, NB weight sums, 2M rows
    constexpr int NB = M <= 1 ? 8 : M <= 2 ? 4 : M <= 3 ? 3 : M <= 4 ? 2 : 1;
    blocks<NB>(n0, n1, [&](int64_t n, auto nb) { int8_block512<M, nb()>(o, n); });
  } else if (o.xq != nullptr) {
    constexpr int NB = M <= 1 ? 4 : M <= 2 ? 2 : 1;
    blocks<NB>(n0, n1, [&](int64_t n, auto nb) { int8_block256<M, nb()>(o, n); });
  } else if (g_isa.load(std::memory_order_relaxed) == 2) {  // M x NB accumulators, M rows
    constexpr int NB = M <= 3 ? 8 : M <= 4 ? 6 : 3;
    blocks<NB>(n0, n1, [&](int64_t n, auto nb) { bf16_block512<M, nb()>(o, n); });
  } else {
    constexpr int NB = M <= 1 ? 8 : M <= 2 ? 6 : M <= 3 ? 3 : M <= 4 ? 2 : 1;
    blocks<NB>(n0, n1, [&](int64_t n, auto nb) { bf16_block256<M, nb()>(o, n); });
  }
}

void columns(const Operands& o, int64_t n0, int64_t n1) {
  switch (o.M) {
    case 1: return columns<1>(o, n0, n1);
    case 2: return columns<2>(o, n0, n1);
    case 3: return columns<3>(o, n0, n1);
    case 4: return columns<4>(o, n0, n1);
    case 5: return columns<5>(o, n0, n1);
    case 6: return columns<6>(o, n0, n1);
    case 7: return columns<7>(o, n0, n1);
    default: return columns<8>(o, n0, n1);
  }
}

// One call's outputs, handed out in chunks to the caller and the pool's tasks. Shared so that
// a task the pool starts after the call returned finds nothing left and exits.
struct Work {
  Operands o;
  std::vector<int16_t> xq;
  std::vector<uint8_t> xq8;
  int64_t chunk = 0, chunks = 0;
  alignas(64) std::atomic<int64_t> next{0};  // own cache lines: grabbed and done by different cores
  alignas(64) std::atomic<int64_t> done{0};

  void drain() {
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < chunks;) {
      const int64_t n0 = c * chunk;
      columns(o, n0, std::min(o.N, n0 + chunk));
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error Run(ffi::ThreadPool& pool, std::shared_ptr<Work> work) {
  if (g_isa.load(std::memory_order_relaxed) == 0) {
    return ffi::Error::Internal("xds few-row matmul: this CPU has neither AVX-512 nor AVX2");
  }
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t pieces = threads * kChunksPerThread;
  const int64_t per_chunk = (work->o.N + pieces - 1) / pieces;
  work->chunk = (per_chunk + kBlocks - 1) / kBlocks * kBlocks;
  work->chunks = (work->o.N + work->chunk - 1) / work->chunk;
  const int64_t helpers = std::min(threads, work->chunks) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { work->drain(); });
  work->drain();
  // only chunks a running task took are left: wait for them
  for (int spins = 0; work->done.load(std::memory_order_acquire) < work->chunks; ++spins) {
    if (spins < 4096) {
      _mm_pause();
    } else {
      std::this_thread::yield();
    }
  }
  return ffi::Error::Success();
}

bool rows_ok(ffi::AnyBuffer& x, ffi::AnyBuffer& w, ffi::AnyBuffer& y) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y.dimensions();
  return xd.size() == 2 && wd.size() == 2 && yd.size() == 2 && xd[1] == wd[1] && xd[0] >= 1 &&
         xd[0] <= kMaxRows && yd[0] == xd[0] && yd[1] == wd[0] &&
         y.element_type() == ffi::DataType::F32;
}

ffi::Error Bf16Matmul(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w,
                      ffi::Result<ffi::AnyBuffer> y) {
  if (!rows_ok(x, w, *y) || x.element_type() != ffi::DataType::BF16 ||
      w.element_type() != ffi::DataType::BF16) {
    return ffi::Error::InvalidArgument(
        "xds_bf16_matmul: bfloat16 x [M <= 8, K] and w [N, K] to a float32 [M, N] expected");
  }
  auto work = std::make_shared<Work>();
  work->o.x = reinterpret_cast<const uint16_t*>(x.untyped_data());
  work->o.w = w.untyped_data();
  work->o.y = reinterpret_cast<float*>(y->untyped_data());
  work->o.M = x.dimensions()[0];
  work->o.N = w.dimensions()[0];
  work->o.K = w.dimensions()[1];
  return Run(pool, std::move(work));
}

ffi::Error Int8Matmul(ffi::ThreadPool pool, ffi::AnyBuffer hi, ffi::AnyBuffer lo,
                      ffi::AnyBuffer x_scale, ffi::AnyBuffer w, ffi::AnyBuffer w_scale,
                      ffi::Result<ffi::AnyBuffer> y) {
  const int64_t M = hi.dimensions().size() == 2 ? hi.dimensions()[0] : 0;
  if (!rows_ok(hi, w, *y) || hi.element_type() != ffi::DataType::S8 ||
      lo.element_type() != ffi::DataType::S8 || lo.element_count() != hi.element_count() ||
      w.element_type() != ffi::DataType::S8 || x_scale.element_type() != ffi::DataType::F32 ||
      x_scale.element_count() != static_cast<size_t>(M) ||
      w_scale.element_type() != ffi::DataType::F32 ||
      w_scale.element_count() != static_cast<size_t>(w.dimensions()[0])) {
    return ffi::Error::InvalidArgument(
        "xds_int8_matmul: int8 hi, lo [M <= 8, K], float32 x_scale [M], int8 w [N, K] and "
        "float32 w_scale [N] to a float32 [M, N] expected");
  }
  auto work = std::make_shared<Work>();
  const int64_t K = w.dimensions()[1];
  const auto* h = reinterpret_cast<const int8_t*>(hi.untyped_data());
  const auto* l = reinterpret_cast<const int8_t*>(lo.untyped_data());
  if (g_isa.load(std::memory_order_relaxed) == 2) {
    work->xq8.resize(2 * M * K);
    auto offset = [](int8_t v) { return static_cast<uint8_t>(v ^ 0x80); };  // v + 128
    std::transform(h, h + M * K, work->xq8.begin(), offset);
    std::transform(l, l + M * K, work->xq8.begin() + M * K, offset);
    work->o.xq8 = work->xq8.data();
  } else {
    work->xq.assign(h, h + M * K);
    work->xq.insert(work->xq.end(), l, l + M * K);
    work->o.xq = work->xq.data();
  }
  work->o.x_scale = reinterpret_cast<const float*>(x_scale.untyped_data());
  work->o.w = w.untyped_data();
  work->o.w_scale = reinterpret_cast<const float*>(w_scale.untyped_data());
  work->o.y = reinterpret_cast<float*>(y->untyped_data());
  work->o.M = M;
  work->o.N = w.dimensions()[0];
  work->o.K = K;
  return Run(pool, std::move(work));
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(XdsBf16Matmul, Bf16Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(XdsInt8Matmul, Int8Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

// The instruction set the kernels run: 2 AVX-512 (BF16, VNNI), 1 AVX2 + FMA, 0 none (not used).
extern "C" int xds_few_row_isa() { return g_isa.load(); }

// Run at most ``isa`` (never above what the CPU has); returns the one now in use.
extern "C" int xds_few_row_use_isa(int isa) {
  g_isa.store(std::min(isa, detect_isa()));
  return g_isa.load();
}
