// Register tiles of xds-jax's CPU prefill attention kernel (prefill_attention.cc, which
// includes this file): both products as outer products, a vector of 16 outputs (keys for the
// scores, value dims for the output) per accumulator and a broadcast word of the other
// operand, AVX-512 BF16's pair dot product (bfloat16) or FMAs (float32); the row softmax.
#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "kernel_math.h"

namespace xds_kernels {

#define XDS_UNROLL _Pragma("GCC unroll 16")
#define XDS_PREFILL_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,fma")))

constexpr int kRows = 6;  // rows per register tile (6 x 4 accumulators)

// A value type's 32-bit words: bfloat16 in pairs (AVX-512 BF16's dot product of pairs),
// float32 one each (FMA). ``per_word``: values per word.
template <typename T>
struct Words;
template <>
struct Words<uint16_t> {
  static constexpr int per_word = 2;
  XDS_PREFILL_AVX512 static __m512 madd(__m512 acc, __m512i a, __m512i b) {
    return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
  }
};
template <>
struct Words<float> {
  static constexpr int per_word = 1;
  XDS_PREFILL_AVX512 static __m512 madd(__m512 acc, __m512i a, __m512i b) {
    return _mm512_fmadd_ps(_mm512_castsi512_ps(a), _mm512_castsi512_ps(b), acc);
  }
};

inline uint32_t word(const uint16_t* p) {  // values p[0] (low half) and p[1]
  uint32_t w;
  std::memcpy(&w, p, sizeof w);
  return w;
}
inline uint32_t word(const float* p) {
  uint32_t w;
  std::memcpy(&w, p, sizeof w);
  return w;
}

// Rows of one item: their query words and output, and the visible keys [lo, hi] relative to
// the item's first key.
struct Row {
  const void* q;
  float* out;
  int64_t lo, hi;  // hi < lo: no visible key
};

// scores[r][t0 .. t0 + 64) = scale * q_r . key_t for R rows, keys from the transposed panel.
template <typename T, int R>
XDS_PREFILL_AVX512 void score_tile(const Row* rows, const uint32_t* keys, int64_t lp,
                                   int64_t words, int64_t t0, float scale, float* scores) {
  __m512 acc[R][4];
  XDS_UNROLL for (int r = 0; r < R; ++r)
    XDS_UNROLL for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_ps();
  const uint32_t* qw[R];
  XDS_UNROLL for (int r = 0; r < R; ++r) qw[r] = static_cast<const uint32_t*>(rows[r].q);
  for (int64_t w = 0; w < words; ++w) {
    const uint32_t* kw = keys + w * lp + t0;
    __m512i kv[4];
    XDS_UNROLL for (int j = 0; j < 4; ++j) kv[j] = _mm512_loadu_si512(kw + 16 * j);
    XDS_UNROLL for (int r = 0; r < R; ++r) {
      const __m512i qb = _mm512_set1_epi32(static_cast<int>(qw[r][w]));
      XDS_UNROLL for (int j = 0; j < 4; ++j) acc[r][j] = Words<T>::madd(acc[r][j], qb, kv[j]);
    }
  }
  const __m512 sv = _mm512_set1_ps(scale);
  XDS_UNROLL for (int r = 0; r < R; ++r)
    XDS_UNROLL for (int j = 0; j < 4; ++j)
      _mm512_storeu_ps(scores + r * lp + t0 + 16 * j, _mm512_mul_ps(acc[r][j], sv));
}

// out_r[d0 .. d0 + 16 NV) = sum over the group's keys of prob[r][t] value_t[d0 ..] for R rows;
// words w0 .. w1 of the probabilities (pairs of keys for bf16).
template <typename T, int R, int NV>
XDS_PREFILL_AVX512 void value_tile(Row* rows, const uint32_t* probs, const uint32_t* vals,
                                   int64_t lpw, int64_t D, int64_t d0, int64_t w0, int64_t w1) {
  __m512 acc[R][NV];
  XDS_UNROLL for (int r = 0; r < R; ++r)
    XDS_UNROLL for (int j = 0; j < NV; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t w = w0; w < w1; ++w) {
    __m512i vv[NV];
    XDS_UNROLL for (int j = 0; j < NV; ++j) vv[j] = _mm512_loadu_si512(vals + w * D + d0 + 16 * j);
    XDS_UNROLL for (int r = 0; r < R; ++r) {
      const __m512i pb = _mm512_set1_epi32(static_cast<int>(probs[r * lpw + w]));
      XDS_UNROLL for (int j = 0; j < NV; ++j) acc[r][j] = Words<T>::madd(acc[r][j], pb, vv[j]);
    }
  }
  XDS_UNROLL for (int r = 0; r < R; ++r)
    XDS_UNROLL for (int j = 0; j < NV; ++j) _mm512_storeu_ps(rows[r].out + d0 + 16 * j, acc[r][j]);
}

// Softmax of one row's visible scores [lo, hi]; its probabilities (zeros elsewhere, up to lp)
// in the values' dtype, as words: 16 lanes at a time, the last ones masked.
template <typename T>
XDS_PREFILL_AVX512 void softmax_row(float* s, const Row& row, int64_t lp, float cap,
                                    uint32_t* probs) {
  const int64_t lo = row.lo, n = row.hi - row.lo + 1;
  float* x = s + lo;
  auto mask = [n](int64_t i) { return lanes16(n, i); };
  if (cap > 0.0f) {
    for (int64_t i = 0; i < n; ++i) x[i] = cap * std::tanh(x[i] / cap);
  }
  __m512 top = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t i = 0; i < n; i += 16) {
    top = _mm512_mask_max_ps(top, mask(i), top, _mm512_maskz_loadu_ps(mask(i), x + i));
  }
  // times the sum's reciprocal: within an ulp of dividing, at a multiply's throughput
  const __m512 inv = _mm512_set1_ps(1.0f / exp_sum(x, n, _mm512_reduce_max_ps(top)));
  if constexpr (sizeof(T) == 2) {
    auto* p = reinterpret_cast<uint16_t*>(probs);
    std::memset(p, 0, lp * sizeof(uint16_t));
    for (int64_t i = 0; i < n; i += 16) {
      const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask(i), x + i), inv);
      _mm256_mask_storeu_epi16(p + lo + i, mask(i), (__m256i)_mm512_cvtneps_pbh(v));
    }
  } else {
    auto* p = reinterpret_cast<float*>(probs);
    std::memset(p, 0, lp * sizeof(float));
    for (int64_t i = 0; i < n; i += 16) {
      _mm512_mask_storeu_ps(p + lo + i, mask(i),
                            _mm512_mul_ps(_mm512_maskz_loadu_ps(mask(i), x + i), inv));
    }
  }
}

}  // namespace xds_kernels
