// AVX-512 blocks of xds-jax's decode attention kernel (paged_attention.cc includes this file):
// its arguments, a page's scores in register tiles, the value product over L1-sized chunks of
// keys, the prefetches. Scores: TB tokens of a page per kv head at once (as many accumulators
// a query head as fit beside the G heads' query values and a key vector in 32 registers),
// summed by lane_sums' transposing tree, the running maximum kept in a register; values: 16
// keys at a time, so their rows stay in L1 across the kv heads, the keys in order (the same
// sums whatever the chunks); the next page's keys and the next chunk's values asked for while
// the current ones are used.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "lane_sums.h"

#define XDS_PAGED512 __attribute__((target("avx512f,avx512bw,avx512vl,fma")))

namespace xds_kernels {

// One call's operands (paged_attention.cc's Attend fills them).
struct PagedArgs {
  const void* q = nullptr;      // [B, K, G, D]
  const void* kp = nullptr;     // [P, Pg, K, D]
  const void* vp = nullptr;     // [P, Pg, K, D]
  const int32_t* tables = nullptr;  // [B, N]
  const bool* mask = nullptr;   // [B, N * Pg]
  float* out = nullptr;         // [B, K, G, D]
  int64_t B = 0, K = 0, G = 0, D = 0, P = 0, Pg = 0, N = 0;
  float scale = 1.0f, cap = 0.0f;
  bool bf16 = false;
};

// A query head's dot product with a key as its attention score: scaled, soft-capped where the
// layer caps (both score paths, so they agree).
inline float scaled_score(float dot, const PagedArgs& a) {
  const float sc = dot * a.scale;
  return a.cap > 0.0f ? a.cap * std::tanh(sc / a.cap) : sc;
}

// f(std::integral_constant<int, G>) for the query heads per kv head G in 1 .. 8, the widths
// the register paths are instantiated for; false (nothing run) for any other G.
template <typename F>
inline bool with_heads(int64_t G, F&& f) {
  switch (G) {
    case 1: f(std::integral_constant<int, 1>{}); return true;
    case 2: f(std::integral_constant<int, 2>{}); return true;
    case 3: f(std::integral_constant<int, 3>{}); return true;
    case 4: f(std::integral_constant<int, 4>{}); return true;
    case 5: f(std::integral_constant<int, 5>{}); return true;
    case 6: f(std::integral_constant<int, 6>{}); return true;
    case 7: f(std::integral_constant<int, 7>{}); return true;
    case 8: f(std::integral_constant<int, 8>{}); return true;
    default: return false;
  }
}

// 16 values from p as float32 (bfloat16 bits widened by a shift).
XDS_PAGED512 inline __m512 load16(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
XDS_PAGED512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }

// E values from ``row`` on their way to L1 (``Hint`` T0), or to L2 (T1: further ahead, so
// more lines are in flight than L1's miss buffers hold).
template <typename T, int Hint = _MM_HINT_T0>
inline void prefetch_row(const T* row, int64_t E) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t o = 0; o < E * static_cast<int64_t>(sizeof(T)); o += 64) {
    _mm_prefetch(p + o, static_cast<_mm_hint>(Hint));
  }
}

// Whether page n of a sequence (``mask`` its row) holds a visible key (its first or last:
// the visible keys of a page are a run).
inline bool page_visible(const bool* mask, int64_t n, int64_t N, int64_t Pg) {
  return n < N && (mask[n * Pg] || mask[(n + 1) * Pg - 1]);
}

// out[k G + g][d0 .. d0 + 16 NV) += sum_{i0 <= i < i1} s[(k G + g) L + i] value_i[k][d0 ..]
// for kv head k: the G heads' outputs held in registers over the chunk's keys, each value
// read once; the keys in order, so the sums are the same whatever the chunks.
template <typename T, int G, int NV>
XDS_PAGED512 void value_block(const float* s, int64_t L, const int64_t* keys, int64_t i0,
                              int64_t i1, const T* vp, int64_t E, int64_t k, int64_t D,
                              int64_t d0, float* out) {
  __m512 acc[G][NV];
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < NV; ++j) acc[g][j] = _mm512_loadu_ps(out + (k * G + g) * D + d0 + 16 * j);
  const float* sk = s + k * G * L;
  for (int64_t i = i0; i < i1; ++i) {
    const T* vr = vp + keys[i] * E + k * D + d0;
    __m512 v[NV];
    for (int j = 0; j < NV; ++j) v[j] = load16(vr + 16 * j);
    for (int g = 0; g < G; ++g) {
      const __m512 p = _mm512_set1_ps(sk[g * L + i]);
      for (int j = 0; j < NV; ++j) acc[g][j] = _mm512_fmadd_ps(p, v[j], acc[g][j]);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < NV; ++j) _mm512_storeu_ps(out + (k * G + g) * D + d0 + 16 * j, acc[g][j]);
}

// Keys per chunk of the value product: a chunk's value rows (every kv head's) are read from
// memory once and from L1 for the other heads; the next chunk's are prefetched meanwhile.
constexpr int64_t kValueChunk = 16;

template <typename T, int G>
XDS_PAGED512 void value_heads(const float* s, int64_t L, const int64_t* keys, int64_t seen,
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
        for (; d0 + 64 <= D; d0 += 64) {
          value_block<T, G, 4>(s, L, keys, i0, i1, vp, E, k, D, d0, out);
        }
      }
      for (; d0 + 32 <= D; d0 += 32) value_block<T, G, 2>(s, L, keys, i0, i1, vp, E, k, D, d0, out);
      for (; d0 < D; d0 += 16) value_block<T, G, 1>(s, L, keys, i0, i1, vp, E, k, D, d0, out);
    }
  }
}

// Tokens of a page scored together per kv head, TB accumulators a query head: as many as fit
// in 32 registers beside the G heads' query values and a key vector.
template <int G>
constexpr int score_tokens() {
  return G == 1 ? 16 : G == 2 ? 12 : G <= 4 ? 24 / G : G <= 7 ? 3 : 2;
}

// sc[g TB + t] = q[g] . key_t over D for kv head k's G query heads ``qk`` [G, D] and tokens
// t < tb of a page (``kr``: the first one's row at kv head k, rows E apart): products
// accumulated in 16 lanes over D, then summed by lane_sums' tree (45 shuffles and adds per 16
// scores where a horizontal sum each took 8).
template <typename T, int G, int TB>
XDS_PAGED512 void score_block(const float* qk, const T* kr, int64_t E, int64_t D, int tb,
                              float* sc) {
  __m512 acc[G * TB];
  UNROLL for (int g = 0; g < G; ++g)
    UNROLL for (int t = 0; t < TB; ++t) acc[g * TB + t] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += 16) {
    __m512 qv[G];
    UNROLL for (int g = 0; g < G; ++g) qv[g] = _mm512_loadu_ps(qk + g * D + d);
    UNROLL for (int t = 0; t < TB; ++t) {
      if (t < tb) {
        const __m512 kv = load16(kr + t * E + d);
        UNROLL for (int g = 0; g < G; ++g)
          acc[g * TB + t] = _mm512_fmadd_ps(qv[g], kv, acc[g * TB + t]);
      }
    }
  }
  lane_sums<G * TB>(acc, sc);
}

// Phase one of attend_body for sequence b with AVX-512: every visible key's scores (scaled,
// capped) into s[h L + i] and its row into keys[i], i counting the visible keys, TB tokens of
// a page at a time; the next page's keys are prefetched while a page is scored.
template <typename T, int G>
XDS_PAGED512 void page_scores(const PagedArgs& a, int64_t b, const float* qf, float* s,
                              int64_t* keys, float* mx, int64_t& seen) {
  constexpr int TB = score_tokens<G>();
  const int64_t K = a.K, D = a.D, E = K * D, Pg = a.Pg, L = a.N * Pg;
  const T* kp = static_cast<const T*>(a.kp);
  const bool* mask = a.mask + b * L;
  const int32_t* table = a.tables + b * a.N;
  float sc[G * TB];
  int64_t idx[TB];
  const T* vp = static_cast<const T*>(a.vp);
  for (int64_t n = 0; n < a.N; ++n) {
    const int64_t page = std::clamp<int64_t>(table[n], 0, a.P - 1);
    // the next page's keys to L1, the one after to L2, this page's values to L2 (read after
    // the softmax): from memory while this page is scored, not when each is first touched
    if (page_visible(mask, n + 1, a.N, Pg)) {
      prefetch_row(kp + std::clamp<int64_t>(table[n + 1], 0, a.P - 1) * Pg * E, Pg * E);
    }
    if (page_visible(mask, n + 2, a.N, Pg)) {
      prefetch_row<T, _MM_HINT_T1>(kp + std::clamp<int64_t>(table[n + 2], 0, a.P - 1) * Pg * E,
                                   Pg * E);
    }
    if (page_visible(mask, n, a.N, Pg)) prefetch_row<T, _MM_HINT_T1>(vp + page * Pg * E, Pg * E);
    for (int64_t t0 = 0; t0 < Pg; t0 += TB) {
      const int tb = static_cast<int>(std::min<int64_t>(TB, Pg - t0));
      int visible = 0;
      for (int t = 0; t < tb; ++t) idx[t] = mask[n * Pg + t0 + t] ? seen + visible++ : -1;
      if (visible == 0) continue;
      const T* kr = kp + (page * Pg + t0) * E;
      for (int64_t k = 0; k < K; ++k) {
        score_block<T, G, TB>(qf + k * G * D, kr + k * D, E, D, tb, sc);
        for (int g = 0; g < G; ++g) {  // the head's maximum in a register, not through memory
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

}  // namespace xds_kernels
