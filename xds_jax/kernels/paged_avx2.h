// AVX2 + FMA blocks of xds-jax's decode attention kernel (paged_attention.cc includes this file
// after paged_blocks.h): paged_blocks.h's page-wise register tiles on 8 lanes and 16 registers,
// for CPUs without AVX-512 (an AMD EPYC Zen 3). Scores: TB tokens of a page per kv head at once,
// each accumulator summed across its lanes at the end (the tree of lane_sums needs AVX-512);
// values: 16 keys a chunk, the G heads' outputs in registers. The same prefetches as the
// AVX-512 blocks: the next page's keys, this page's values, the next chunk's values.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "paged_blocks.h"

#define XDS_PAGED256 __attribute__((target("avx2,fma")))

namespace xds_kernels {

// 8 values from p as float32 (bfloat16 bits widened by a shift).
XDS_PAGED256 inline __m256 load8(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
XDS_PAGED256 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

XDS_PAGED256 inline float lanes_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Tokens of a page scored together per kv head on 16 registers: TB accumulators a query head
// beside the G heads' query values and a key vector.
template <int G>
constexpr int score_tokens8() {
  return G == 1 ? 8 : G == 2 ? 6 : G == 3 ? 4 : G <= 5 ? 2 : 1;
}

// sc[g TB + t] = q[g] . key_t over D (a multiple of 8) for kv head k's G query heads ``qk``
// [G, D] and tokens t < tb of a page (``kr``: the first one's row at kv head k, rows E apart).
template <typename T, int G, int TB>
XDS_PAGED256 void score_block8(const float* qk, const T* kr, int64_t E, int64_t D, int tb,
                               float* sc) {
  __m256 acc[G * TB];
  UNROLL for (int i = 0; i < G * TB; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; d += 8) {
    __m256 qv[G];
    UNROLL for (int g = 0; g < G; ++g) qv[g] = _mm256_loadu_ps(qk + g * D + d);
    UNROLL for (int t = 0; t < TB; ++t) {
      if (t < tb) {
        const __m256 kv = load8(kr + t * E + d);
        UNROLL for (int g = 0; g < G; ++g)
          acc[g * TB + t] = _mm256_fmadd_ps(qv[g], kv, acc[g * TB + t]);
      }
    }
  }
  UNROLL for (int i = 0; i < G * TB; ++i) sc[i] = lanes_sum(acc[i]);
}

// page_scores (paged_blocks.h) on 8 lanes: every visible key's scores into s[h L + i], its row
// into keys[i], TB tokens of a page at a time.
template <typename T, int G>
XDS_PAGED256 void page_scores8(const PagedArgs& a, int64_t b, const float* qf, float* s,
                               int64_t* keys, float* mx, int64_t& seen) {
  constexpr int TB = score_tokens8<G>();
  const int64_t K = a.K, D = a.D, E = K * D, Pg = a.Pg, L = a.N * Pg;
  const T* kp = static_cast<const T*>(a.kp);
  const T* vp = static_cast<const T*>(a.vp);
  const bool* mask = a.mask + b * L;
  const int32_t* table = a.tables + b * a.N;
  float sc[G * TB];
  int64_t idx[TB];
  for (int64_t n = 0; n < a.N; ++n) {
    const int64_t page = std::clamp<int64_t>(table[n], 0, a.P - 1);
    if (page_visible(mask, n + 1, a.N, Pg)) {
      prefetch_row(kp + std::clamp<int64_t>(table[n + 1], 0, a.P - 1) * Pg * E, Pg * E);
    }
    if (page_visible(mask, n, a.N, Pg)) prefetch_row<T, _MM_HINT_T1>(vp + page * Pg * E, Pg * E);
    for (int64_t t0 = 0; t0 < Pg; t0 += TB) {
      const int tb = static_cast<int>(std::min<int64_t>(TB, Pg - t0));
      int visible = 0;
      for (int t = 0; t < tb; ++t) idx[t] = mask[n * Pg + t0 + t] ? seen + visible++ : -1;
      if (visible == 0) continue;
      const T* kr = kp + (page * Pg + t0) * E;
      for (int64_t k = 0; k < K; ++k) {
        score_block8<T, G, TB>(qf + k * G * D, kr + k * D, E, D, tb, sc);
        for (int g = 0; g < G; ++g) {
          float* sh = s + (k * G + g) * L;
          float top = mx[k * G + g];
          for (int t = 0; t < tb; ++t) {
            if (idx[t] < 0) continue;
            const float v = scaled_score(sc[g * TB + t], a);
            sh[idx[t]] = v;
            top = std::max(top, v);
          }
          mx[k * G + g] = top;
        }
      }
      for (int t = 0; t < tb; ++t) {
        if (idx[t] >= 0) keys[idx[t]] = page * Pg + t0 + t;
      }
      seen += visible;
    }
  }
}

// value_block (paged_blocks.h) on 8 lanes: out[k G + g][d0 .. d0 + 8 NV) += the chunk's keys'
// probabilities times their values, in key order.
template <typename T, int G, int NV>
XDS_PAGED256 void value_block8(const float* s, int64_t L, const int64_t* keys, int64_t i0,
                               int64_t i1, const T* vp, int64_t E, int64_t k, int64_t D,
                               int64_t d0, float* out) {
  __m256 acc[G][NV];
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < NV; ++j) acc[g][j] = _mm256_loadu_ps(out + (k * G + g) * D + d0 + 8 * j);
  const float* sk = s + k * G * L;
  for (int64_t i = i0; i < i1; ++i) {
    const T* vr = vp + keys[i] * E + k * D + d0;
    __m256 v[NV];
    for (int j = 0; j < NV; ++j) v[j] = load8(vr + 8 * j);
    for (int g = 0; g < G; ++g) {
      const __m256 p = _mm256_set1_ps(sk[g * L + i]);
      for (int j = 0; j < NV; ++j) acc[g][j] = _mm256_fmadd_ps(p, v[j], acc[g][j]);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < NV; ++j) _mm256_storeu_ps(out + (k * G + g) * D + d0 + 8 * j, acc[g][j]);
}

template <typename T, int G>
XDS_PAGED256 void value_heads8(const float* s, int64_t L, const int64_t* keys, int64_t seen,
                               const T* vp, int64_t K, int64_t D, float* out) {
  const int64_t E = K * D;
  for (int64_t i0 = 0; i0 < seen; i0 += kValueChunk) {
    const int64_t i1 = std::min(seen, i0 + kValueChunk);
    for (int64_t i = i1; i < std::min(seen, i1 + kValueChunk); ++i) {
      prefetch_row(vp + keys[i] * E, E);
    }
    for (int64_t k = 0; k < K; ++k) {
      int64_t d0 = 0;
      if constexpr (G <= 4) {
        for (; d0 + 16 <= D; d0 += 16) {
          value_block8<T, G, 2>(s, L, keys, i0, i1, vp, E, k, D, d0, out);
        }
      }
      for (; d0 < D; d0 += 8) value_block8<T, G, 1>(s, L, keys, i0, i1, vp, E, k, D, d0, out);
    }
  }
}

}  // namespace xds_kernels
