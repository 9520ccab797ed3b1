// Register-tiled blocks of xds-jax's CPU matmul kernel (few_row_matmul.cc, which includes this
// file): rows r0 .. r0 + M of y against the weight rows (outputs) n .. n + NB, the M x NB
// accumulators held in registers over the whole of K. The dispatch picks M and NB so they fit
// (32 zmm with AVX-512, 16 ymm with AVX2) and calls a block once per group of rows, so the
// block's weights come from L1 after the first group.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <type_traits>

#include "kernel_math.h"
#include "next_lines.h"
#include "lane_sums.h"  // lane_sums; UNROLL: loops over rows and block columns unrolled
                        // whole, so their accumulators stay in registers

namespace xds_kernels {

// The operands of one call. ``x`` is bfloat16 rows; or, with int8 weights, the rows' hi and lo
// halves: as they are (``xh8``, ``xl8`` [M, K]) with their sums, or widened to int16, hi then
// lo (``xq`` [2M, K]).
struct Operands {
  const uint16_t* x = nullptr;
  const float* xf = nullptr;      // float32 rows (float32 weights), AVX-512
  const int16_t* xq = nullptr;    // AVX2
  const int8_t* xh8 = nullptr;    // AVX-512 VNNI
  const int8_t* xl8 = nullptr;
  const int32_t* xsum = nullptr;  // [2M]: each row's sum of hi, then of lo
  const float* x_scale = nullptr;  // [M]
  const void* w = nullptr;
  const float* w_scale = nullptr;  // [N]
  float* y = nullptr;
  int64_t M = 0, N = 0, K = 0;
};

// ---- AVX-512 -----------------------------------------------------------------------------------
#define XDS_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx512vnni")))

// The next block's weights, a share at each k step of each group of rows that runs the current
// block (few_row_matmul.cc's tiles makes it). Issued all in the first group, 32-row float32
// blocks waited on their weights (a burst of more lines than the core keeps in flight: 1.2-1.4x
// slower than spread over the groups); where one group runs the block (a few rows), into L2,
// which keeps more misses in flight than L1: one-row decode 1.07-1.15x (docs/performance.md).
struct NextBlock {
  NextLines<_MM_HINT_T0> l1;
  NextLines<_MM_HINT_T1> l2;
  NextBlock(const void* next, int64_t bytes, int64_t steps, int64_t groups, bool on)
      : l1(next, bytes, steps * groups, on && groups > 1),
        l2(next, bytes, steps, on && groups == 1) {}
  inline void step() {
    l1.step();
    l2.step();
  }
};

template <int M, int NB>
XDS_AVX512 void bf16_block512(const Operands& o, int64_t n, int64_t r0, NextBlock& next) {
  const int64_t K = o.K, kfull = K / 32 * 32;
  const auto* w = static_cast<const uint16_t*>(o.w) + n * K;
  const auto* x = o.x + r0 * K;
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
    next.step();
    __m512i xv[hold ? M : 1];
    if constexpr (hold) {
      UNROLL for (int m = 0; m < M; ++m) xv[m] = _mm512_maskz_loadu_epi16(mask, x + m * K + k);
    }
    UNROLL for (int j = 0; j < NB; ++j) {
      const __m512i wv = _mm512_maskz_loadu_epi16(mask, w + j * K + k);
      UNROLL for (int m = 0; m < M; ++m) {
        const __m512i xm = hold ? xv[hold ? m : 0] : _mm512_maskz_loadu_epi16(mask, x + m * K + k);
        acc[m][j] = _mm512_dpbf16_ps(acc[m][j], (__m512bh)xm, (__m512bh)wv);
      }
    }
  }
  float sums[M * NB];
  lane_sums<M * NB>(&acc[0][0], sums);
  UNROLL for (int m = 0; m < M; ++m)
    UNROLL for (int j = 0; j < NB; ++j) o.y[(r0 + m) * o.N + n + j] = sums[m * NB + j];
}

// float32 rows against float32 weights: FMAs on 16 lanes of K, the rows held in registers.
template <int M, int NB>
XDS_AVX512 void f32_block512(const Operands& o, int64_t n, int64_t r0, NextBlock& next) {
  const int64_t K = o.K, kfull = K / 16 * 16;
  const auto* w = static_cast<const float*>(o.w) + n * K;
  const float* x = o.xf + r0 * K;
  __m512 acc[M][NB];
  UNROLL for (int m = 0; m < M; ++m)
    UNROLL for (int j = 0; j < NB; ++j) acc[m][j] = _mm512_setzero_ps();
  const __mmask16 tail = static_cast<__mmask16>((1u << (K - kfull)) - 1);
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 mask = k < kfull ? static_cast<__mmask16>(0xffff) : tail;
    next.step();
    __m512 xv[M];
    UNROLL for (int m = 0; m < M; ++m) xv[m] = _mm512_maskz_loadu_ps(mask, x + m * K + k);
    UNROLL for (int j = 0; j < NB; ++j) {
      const __m512 wv = _mm512_maskz_loadu_ps(mask, w + j * K + k);
      UNROLL for (int m = 0; m < M; ++m) acc[m][j] = _mm512_fmadd_ps(xv[m], wv, acc[m][j]);
    }
  }
  float sums[M * NB];
  lane_sums<M * NB>(&acc[0][0], sums);
  UNROLL for (int m = 0; m < M; ++m)
    UNROLL for (int j = 0; j < NB; ++j) o.y[(r0 + m) * o.N + n + j] = sums[m * NB + j];
}

// VNNI multiplies unsigned by signed bytes: each weight byte is flipped to w + 128 (unsigned,
// one xor a vector) and multiplies the signed halves hi and lo (xh8, xl8 [M, K]), so 128 times
// each row's sum (xsum: hi's M, then lo's M) comes off.
template <int M, int NB>
XDS_AVX512 void int8_block512(const Operands& o, int64_t n, int64_t r0, NextBlock& next) {
  const int64_t K = o.K, kfull = K / 64 * 64;
  const auto* w = static_cast<const int8_t*>(o.w) + n * K;
  const int8_t* xh = o.xh8 + r0 * K;
  const int8_t* xl = o.xl8 + r0 * K;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512i hi[M][NB], lo[M][NB];
  UNROLL for (int j = 0; j < NB; ++j)
    UNROLL for (int m = 0; m < M; ++m) hi[m][j] = lo[m][j] = _mm512_setzero_si512();
  const __mmask64 tail = K - kfull == 0 ? 0 : (~__mmask64{0} >> (64 - (K - kfull)));
  for (int64_t k = 0; k < K; k += 64) {
    const __mmask64 mask = k < kfull ? ~__mmask64{0} : tail;
    next.step();
    __m512i h[M], l[M];  // zeros past K, so the flipped weights' 128s there add nothing
    UNROLL for (int m = 0; m < M; ++m) {
      h[m] = _mm512_maskz_loadu_epi8(mask, xh + m * K + k);
      l[m] = _mm512_maskz_loadu_epi8(mask, xl + m * K + k);
    }
    UNROLL for (int j = 0; j < NB; ++j) {
      const __m512i wv = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, w + j * K + k), flip);
      UNROLL for (int m = 0; m < M; ++m) {
        hi[m][j] = _mm512_dpbusd_epi32(hi[m][j], wv, h[m]);
        lo[m][j] = _mm512_dpbusd_epi32(lo[m][j], wv, l[m]);
      }
    }
  }
  int32_t his[M * NB], los[M * NB];
  lane_sums<M * NB>(&hi[0][0], his);
  lane_sums<M * NB>(&lo[0][0], los);
  UNROLL for (int m = 0; m < M; ++m) {
    const int32_t hoff = 128 * o.xsum[r0 + m], loff = 128 * o.xsum[o.M + r0 + m];
    UNROLL for (int j = 0; j < NB; ++j) {
      const float hs = static_cast<float>(his[m * NB + j] - hoff);
      const float ls = static_cast<float>(los[m * NB + j] - loff);
      o.y[(r0 + m) * o.N + n + j] = (hs * 256.0f + ls) * o.x_scale[r0 + m] * o.w_scale[n + j];
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

XDS_AVX2 inline __m256 load8(const uint16_t* p) { return widen8(p); }
XDS_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

// bfloat16 (T = uint16_t, rows o.x) or float32 (rows o.xf) rows and weights: FMAs on 8 lanes.
template <int M, int NB, typename T>
XDS_AVX2 void float_block256(const Operands& o, int64_t n, int64_t r0) {
  const int64_t K = o.K, kfull = K / 8 * 8;
  const auto* w = static_cast<const T*>(o.w) + n * K;
  const T* x = (std::is_same_v<T, float> ? reinterpret_cast<const T*>(o.xf)
                                         : reinterpret_cast<const T*>(o.x)) + r0 * K;
  __m256 acc[M][NB];
  UNROLL for (int m = 0; m < M; ++m)
    UNROLL for (int j = 0; j < NB; ++j) acc[m][j] = _mm256_setzero_ps();
  for (int64_t k = 0; k < kfull; k += 8) {
    __m256 xv[M];
    UNROLL for (int m = 0; m < M; ++m) xv[m] = load8(x + m * K + k);
    UNROLL for (int j = 0; j < NB; ++j) {
      const __m256 wv = load8(w + j * K + k);
      UNROLL for (int m = 0; m < M; ++m) acc[m][j] = _mm256_fmadd_ps(xv[m], wv, acc[m][j]);
    }
  }
  UNROLL for (int m = 0; m < M; ++m)
    UNROLL for (int j = 0; j < NB; ++j) {
      float s = hsum(acc[m][j]);
      for (int64_t k = kfull; k < K; ++k) s += value(x[m * K + k]) * value(w[j * K + k]);
      o.y[(r0 + m) * o.N + n + j] = s;
    }
}

template <int M, int NB>
XDS_AVX2 void int8_block256(const Operands& o, int64_t n, int64_t r0) {
  const int64_t K = o.K, kfull = K / 16 * 16;
  const auto* w = static_cast<const int8_t*>(o.w) + n * K;
  const int16_t* xh = o.xq + r0 * K;
  const int16_t* xl = o.xq + (o.M + r0) * K;
  __m256i hi[M][NB], lo[M][NB];
  UNROLL for (int m = 0; m < M; ++m)
    UNROLL for (int j = 0; j < NB; ++j) hi[m][j] = lo[m][j] = _mm256_setzero_si256();
  for (int64_t k = 0; k < kfull; k += 16) {
    __m256i wv[NB];
    UNROLL for (int j = 0; j < NB; ++j)
      wv[j] = _mm256_cvtepi8_epi16(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + j * K + k)));
    UNROLL for (int m = 0; m < M; ++m) {
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xh + m * K + k));
      const __m256i l = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xl + m * K + k));
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
        h += xh[m * K + k] * w[j * K + k];
        l += xl[m * K + k] * w[j * K + k];
      }
      o.y[(r0 + m) * o.N + n + j] = (static_cast<float>(h) * 256.0f + static_cast<float>(l)) *
                                    o.x_scale[r0 + m] * o.w_scale[n + j];
    }
}

}  // namespace xds_kernels
