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

// The operands of one call. ``x`` is bfloat16 rows (and ``xe`` them widened where the CPU has
// no AVX-512 BF16); or, with int8 weights, the rows' hi and lo halves as they are (``xh8``,
// ``xl8`` [M, K]) with their sums (AVX-512 VNNI), or the rows' whole 16-bit values 256 hi + lo
// (``xq`` [M, K], AVX2).
struct Operands {
  const uint16_t* x = nullptr;
  const float* xf = nullptr;      // float32 rows (float32 weights)
  const int16_t* xq = nullptr;    // AVX2: [M, K] q = 256 hi + lo
  const float* xe = nullptr;      // bfloat16 rows widened (widen_rows, widen_rows512)
  int xe_step = 0;                // k a step of xe's layout: 16 (AVX2) or 32 (AVX-512)
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
// AVX-512 F/BW/VL (every AVX-512 server core since Skylake): the float32 blocks and the widening
// bfloat16 ones; VNNI (Cascade Lake on) the int8 blocks; BF16 (Cooper Lake, Sapphire Rapids,
// Zen 4 on) the pair-dot bfloat16 blocks.
#define XDS_AVX512F __attribute__((target("avx512f,avx512bw,avx512vl")))
#define XDS_AVX512VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
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
XDS_AVX512F void f32_block512(const Operands& o, int64_t n, int64_t r0, NextBlock& next) {
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

// bfloat16 rows and weights where AVX-512 has no BF16 pair dot product: as bf16_block256 at
// twice the width, 32 weights a step (16 even by a shift, 16 odd by a mask), the rows widened
// once a call in that order (``xe`` [M, K / 32 * 32]: each 32 k, the 16 even then the 16 odd
// values; widen_rows512) and read from L1 as the FMAs' operands. The k % 32 tail from the
// bfloat16 rows.
template <int M, int NB>
XDS_AVX512F void bf16_widen_block512(const Operands& o, int64_t n, int64_t r0, NextBlock& next) {
  const int64_t K = o.K, kfull = K / 32 * 32;
  const auto* w = static_cast<const uint16_t*>(o.w) + n * K;
  const float* xe = o.xe + r0 * kfull;
  const __m512i odd = _mm512_set1_epi32(static_cast<int32_t>(0xffff0000u));
  __m512 acc[M][NB];
  UNROLL for (int m = 0; m < M; ++m)
    UNROLL for (int j = 0; j < NB; ++j) acc[m][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kfull; k += 32) {
    next.step();
    UNROLL for (int j = 0; j < NB; ++j) {
      const __m512i wv = _mm512_loadu_si512(w + j * K + k);
      const __m512 we = _mm512_castsi512_ps(_mm512_slli_epi32(wv, 16));
      const __m512 wo = _mm512_castsi512_ps(_mm512_and_si512(wv, odd));
      UNROLL for (int m = 0; m < M; ++m) {
        acc[m][j] = _mm512_fmadd_ps(_mm512_loadu_ps(xe + m * kfull + k), we, acc[m][j]);
        acc[m][j] = _mm512_fmadd_ps(_mm512_loadu_ps(xe + m * kfull + k + 16), wo, acc[m][j]);
      }
    }
  }
  float sums[M * NB];
  lane_sums<M * NB>(&acc[0][0], sums);
  const uint16_t* x = o.x + r0 * K;
  UNROLL for (int m = 0; m < M; ++m)
    UNROLL for (int j = 0; j < NB; ++j) {
      float s = sums[m * NB + j];
      for (int64_t k = kfull; k < K; ++k) s += value(x[m * K + k]) * value(w[j * K + k]);
      o.y[(r0 + m) * o.N + n + j] = s;
    }
}

// The bfloat16 rows x [M, K] widened for bf16_widen_block512: each 32 k, the even then the odd.
XDS_AVX512F inline void widen_rows512(const uint16_t* x, int64_t M, int64_t K, float* xe) {
  const int64_t kfull = K / 32 * 32;
  const __m512i odd = _mm512_set1_epi32(static_cast<int32_t>(0xffff0000u));
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t k = 0; k < kfull; k += 32) {
      const __m512i v = _mm512_loadu_si512(x + m * K + k);
      float* out = xe + m * kfull + k;
      _mm512_storeu_ps(out, _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)));
      _mm512_storeu_ps(out + 16, _mm512_castsi512_ps(_mm512_and_si512(v, odd)));
    }
  }
}

// VNNI multiplies unsigned by signed bytes: each weight byte is flipped to w + 128 (unsigned,
// one xor a vector) and multiplies the signed halves hi and lo (xh8, xl8 [M, K]), so 128 times
// each row's sum (xsum: hi's M, then lo's M) comes off.
template <int M, int NB>
XDS_AVX512VNNI void int8_block512(const Operands& o, int64_t n, int64_t r0, NextBlock& next) {
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

XDS_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The lanes' sum in int64 (each lane may hold up to 2^31 - 1).
XDS_AVX2 inline int64_t hsum64(__m256i v) {
  const __m256i s = _mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(v)),
                                     _mm256_cvtepi32_epi64(_mm256_extracti128_si256(v, 1)));
  const __m128i t = _mm_add_epi64(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
  return _mm_cvtsi128_si64(t) + _mm_extract_epi64(t, 1);
}

// float32 rows and weights: FMAs on 8 lanes, the rows held in registers.
template <int M, int NB>
XDS_AVX2 void f32_block256(const Operands& o, int64_t n, int64_t r0, NextBlock& next) {
  const int64_t K = o.K, kfull = K / 8 * 8;
  const auto* w = static_cast<const float*>(o.w) + n * K;
  const float* x = o.xf + r0 * K;
  __m256 acc[M][NB];
  UNROLL for (int m = 0; m < M; ++m)
    UNROLL for (int j = 0; j < NB; ++j) acc[m][j] = _mm256_setzero_ps();
  for (int64_t k = 0; k < kfull; k += 8) {
    next.step();
    __m256 xv[M];
    UNROLL for (int m = 0; m < M; ++m) xv[m] = _mm256_loadu_ps(x + m * K + k);
    UNROLL for (int j = 0; j < NB; ++j) {
      const __m256 wv = _mm256_loadu_ps(w + j * K + k);
      UNROLL for (int m = 0; m < M; ++m) acc[m][j] = _mm256_fmadd_ps(xv[m], wv, acc[m][j]);
    }
  }
  UNROLL for (int m = 0; m < M; ++m)
    UNROLL for (int j = 0; j < NB; ++j) {
      float s = hsum(acc[m][j]);
      for (int64_t k = kfull; k < K; ++k) s += x[m * K + k] * w[j * K + k];
      o.y[(r0 + m) * o.N + n + j] = s;
    }
}

// bfloat16 rows and weights with AVX2: 16 weights a step, widened by a shift (the even ones)
// and a mask (the odd ones) where a widening load of 8 took two instructions and a shift; the
// rows come widened in that order (``xe`` [M, K / 16 * 16]: each 16 k, the 8 even then the 8
// odd values, as float32; widen_rows), read from L1 as the FMAs' operands, so blocks of up to
// 14 accumulators fit. The k % 16 tail from the bfloat16 rows.
template <int M, int NB>
XDS_AVX2 void bf16_block256(const Operands& o, int64_t n, int64_t r0, NextBlock& next) {
  const int64_t K = o.K, kfull = K / 16 * 16;
  const auto* w = static_cast<const uint16_t*>(o.w) + n * K;
  const float* xe = o.xe + r0 * kfull;
  const __m256i odd = _mm256_set1_epi32(static_cast<int32_t>(0xffff0000u));
  __m256 acc[M][NB];
  UNROLL for (int m = 0; m < M; ++m)
    UNROLL for (int j = 0; j < NB; ++j) acc[m][j] = _mm256_setzero_ps();
  for (int64_t k = 0; k < kfull; k += 16) {
    next.step();
    UNROLL for (int j = 0; j < NB; ++j) {
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j * K + k));
      const __m256 we = _mm256_castsi256_ps(_mm256_slli_epi32(wv, 16));
      const __m256 wo = _mm256_castsi256_ps(_mm256_and_si256(wv, odd));
      UNROLL for (int m = 0; m < M; ++m) {
        acc[m][j] = _mm256_fmadd_ps(_mm256_loadu_ps(xe + m * kfull + k), we, acc[m][j]);
        acc[m][j] = _mm256_fmadd_ps(_mm256_loadu_ps(xe + m * kfull + k + 8), wo, acc[m][j]);
      }
    }
  }
  const uint16_t* x = o.x + r0 * K;
  UNROLL for (int m = 0; m < M; ++m)
    UNROLL for (int j = 0; j < NB; ++j) {
      float s = hsum(acc[m][j]);
      for (int64_t k = kfull; k < K; ++k) s += value(x[m * K + k]) * value(w[j * K + k]);
      o.y[(r0 + m) * o.N + n + j] = s;
    }
}

// The bfloat16 rows x [M, K] widened for bf16_block256: each 16 k, the even then the odd values.
XDS_AVX2 inline void widen_rows(const uint16_t* x, int64_t M, int64_t K, float* xe) {
  const int64_t kfull = K / 16 * 16;
  const __m256i odd = _mm256_set1_epi32(static_cast<int32_t>(0xffff0000u));
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t k = 0; k < kfull; k += 16) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + m * K + k));
      float* out = xe + m * kfull + k;
      _mm256_storeu_ps(out, _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)));
      _mm256_storeu_ps(out + 8, _mm256_castsi256_ps(_mm256_and_si256(v, odd)));
    }
  }
}

// Weight-only int8 with AVX2: each row's 16-bit fixed point q = 256 hi + lo (|q| <= 32639) as
// int16 (``xq`` [M, K]) against the weights widened to int16, 16-bit multiply-adds into int32
// lanes. A lane gains at most 2 * 32639 * 128 a step, so 256 steps (4096 k) fit in int32; the
// lanes are summed into int64 every 4096 k. One multiply-add a weight and row where the hi and
// lo halves took two (the AVX-512 path's byte products need them): t = 256 h + l exactly, so
// the float32 result is XLA's (float(h) * 256 + float(l), both exact) wherever |h| and |l| are
// at most 2^24 (every K <= 1024: |hi| <= 127, |lo| <= 128, |w| <= 128); beyond, at most one
// rounding apart (docs/performance.md).
template <int M, int NB>
XDS_AVX2 void int8_block256(const Operands& o, int64_t n, int64_t r0, NextBlock& next) {
  constexpr int64_t kSpan = 4096;  // k per int32 span
  const int64_t K = o.K, kfull = K / 16 * 16;
  const auto* w = static_cast<const int8_t*>(o.w) + n * K;
  const int16_t* x = o.xq + r0 * K;
  int64_t total[M][NB] = {};
  for (int64_t k0 = 0; k0 < kfull; k0 += kSpan) {
    const int64_t k1 = std::min(kfull, k0 + kSpan);
    __m256i acc[M][NB];
    UNROLL for (int m = 0; m < M; ++m)
      UNROLL for (int j = 0; j < NB; ++j) acc[m][j] = _mm256_setzero_si256();
    for (int64_t k = k0; k < k1; k += 16) {
      next.step();
      __m256i xv[M];
      UNROLL for (int m = 0; m < M; ++m)
        xv[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + m * K + k));
      UNROLL for (int j = 0; j < NB; ++j) {
        const __m256i wv = _mm256_cvtepi8_epi16(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + j * K + k)));
        UNROLL for (int m = 0; m < M; ++m)
          acc[m][j] = _mm256_add_epi32(acc[m][j], _mm256_madd_epi16(xv[m], wv));
      }
    }
    UNROLL for (int m = 0; m < M; ++m)
      UNROLL for (int j = 0; j < NB; ++j) total[m][j] += hsum64(acc[m][j]);
  }
  UNROLL for (int m = 0; m < M; ++m)
    UNROLL for (int j = 0; j < NB; ++j) {
      int64_t t = total[m][j];
      for (int64_t k = kfull; k < K; ++k) t += int64_t{x[m * K + k]} * w[j * K + k];
      o.y[(r0 + m) * o.N + n + j] =
          static_cast<float>(t) * o.x_scale[r0 + m] * o.w_scale[n + j];
    }
}

}  // namespace xds_kernels
