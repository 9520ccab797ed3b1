// AVX2 + FMA tiles of xds-jax's CPU prefill attention kernel (prefill_attention.cc includes this
// file after prefill_tiles.h), for CPUs without AVX-512 (an AMD EPYC Zen 3) and for bfloat16 on
// AVX-512 CPUs without BF16's pair dot product. The panels hold float32 (bfloat16 widened when
// packed, exactly), a bfloat16 item's queries are widened once, and both products run as outer
// products on 8 lanes in 3 x 4 register tiles: 12 accumulators, 3 broadcast query (or
// probability) values and a key (or value) vector fill the 16 registers. The softmax is the
// AVX-512 path's on 8 lanes; bfloat16 pages' probabilities are rounded to bfloat16 (the XLA
// path's rounding) and kept as float32.
#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "kernel_math.h"
#include "prefill_tiles.h"

#define XDS_PREFILL256 __attribute__((target("avx2,fma")))

namespace xds_kernels {

constexpr int kRows8 = 3;        // rows per register tile (3 x 4 accumulators)
constexpr int64_t kTile8 = 32;   // keys per score tile: 4 vectors of 8 lanes

// The panel of a sequence's keys [first, first + seen) at kv head kv, as float32: keys [D][lp]
// transposed, values [lp][D]; zeros past the seen keys. ``row(l)``: key l's offset in the pages.
template <typename T, typename RowOf>
void pack_panel_wide(const T* kp, const T* vp, int64_t seen, int64_t lp, int64_t D, RowOf row,
                     float* keys, float* vals) {
  for (int64_t t = 0; t < lp; ++t) {
    float* v = vals + t * D;
    if (t < seen) {
      const int64_t at = row(t);
      for (int64_t d = 0; d < D; ++d) keys[d * lp + t] = value(kp[at + d]);
      for (int64_t d = 0; d < D; ++d) v[d] = value(vp[at + d]);
    } else {
      for (int64_t d = 0; d < D; ++d) keys[d * lp + t] = 0.0f;
      std::memset(v, 0, D * sizeof(float));
    }
  }
}

// scores[r][t0 .. t0 + 32) = scale * q_r . key_t for R rows (float32 queries).
template <int R>
XDS_PREFILL256 void score_tile8(const Row* rows, const float* keys, int64_t lp, int64_t D,
                                int64_t t0, float scale, float* scores) {
  __m256 acc[R][4];
  XDS_UNROLL for (int r = 0; r < R; ++r)
    XDS_UNROLL for (int j = 0; j < 4; ++j) acc[r][j] = _mm256_setzero_ps();
  const float* q[R];
  XDS_UNROLL for (int r = 0; r < R; ++r) q[r] = static_cast<const float*>(rows[r].q);
  for (int64_t d = 0; d < D; ++d) {
    const float* kd = keys + d * lp + t0;
    __m256 qb[R];
    XDS_UNROLL for (int r = 0; r < R; ++r) qb[r] = _mm256_broadcast_ss(q[r] + d);
    XDS_UNROLL for (int j = 0; j < 4; ++j) {
      const __m256 kv = _mm256_loadu_ps(kd + 8 * j);
      XDS_UNROLL for (int r = 0; r < R; ++r) acc[r][j] = _mm256_fmadd_ps(qb[r], kv, acc[r][j]);
    }
  }
  const __m256 sv = _mm256_set1_ps(scale);
  XDS_UNROLL for (int r = 0; r < R; ++r)
    XDS_UNROLL for (int j = 0; j < 4; ++j)
      _mm256_storeu_ps(scores + r * lp + t0 + 8 * j, _mm256_mul_ps(acc[r][j], sv));
}

// out_r[d0 .. d0 + 8 NV) = sum over keys t0 <= t < t1 of prob[r][t] value_t[d0 ..] for R rows.
template <int R, int NV>
XDS_PREFILL256 void value_tile8(Row* rows, const float* probs, const float* vals, int64_t lp,
                                int64_t D, int64_t d0, int64_t t0, int64_t t1) {
  __m256 acc[R][NV];
  XDS_UNROLL for (int r = 0; r < R; ++r)
    XDS_UNROLL for (int j = 0; j < NV; ++j) acc[r][j] = _mm256_setzero_ps();
  for (int64_t t = t0; t < t1; ++t) {
    const float* vt = vals + t * D + d0;
    __m256 pb[R];
    XDS_UNROLL for (int r = 0; r < R; ++r) pb[r] = _mm256_broadcast_ss(probs + r * lp + t);
    XDS_UNROLL for (int j = 0; j < NV; ++j) {
      const __m256 vv = _mm256_loadu_ps(vt + 8 * j);
      XDS_UNROLL for (int r = 0; r < R; ++r) acc[r][j] = _mm256_fmadd_ps(pb[r], vv, acc[r][j]);
    }
  }
  XDS_UNROLL for (int r = 0; r < R; ++r)
    XDS_UNROLL for (int j = 0; j < NV; ++j) _mm256_storeu_ps(rows[r].out + d0 + 8 * j, acc[r][j]);
}

// bf16_bits (kernel_math.h) on 8 lanes: rounded to nearest even, infinities and NaNs kept.
XDS_PREFILL256 inline __m256 round_bf16_8(__m256 v) {
  const __m256i u = _mm256_castps_si256(v), exp = _mm256_set1_epi32(0x7f800000);
  const __m256i bias = _mm256_add_epi32(
      _mm256_set1_epi32(0x7fff), _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)));
  const __m256i special = _mm256_cmpeq_epi32(_mm256_and_si256(u, exp), exp);
  const __m256i r = _mm256_blendv_epi8(_mm256_add_epi32(u, bias), u, special);
  return _mm256_castsi256_ps(_mm256_and_si256(r, _mm256_set1_epi32(0xffff0000)));
}

// softmax_row (prefill_tiles.h) on 8 lanes: the row's probabilities as float32 into probs
// [lp] (zeros outside its visible keys), rounded to bfloat16 where ``bf16``.
XDS_PREFILL256 inline void softmax_row8(float* s, const Row& row, int64_t lp, float cap, bool bf16,
                                        float* probs) {
  const int64_t lo = row.lo, n = row.hi - row.lo + 1, whole = n / 8 * 8;
  float* x = s + lo;
  if (cap > 0.0f) {
    for (int64_t i = 0; i < n; ++i) x[i] = cap * std::tanh(x[i] / cap);
  }
  __m256 top8 = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t i = 0; i < whole; i += 8) top8 = _mm256_max_ps(top8, _mm256_loadu_ps(x + i));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, top8);
  float top = lanes[0];
  for (int i = 1; i < 8; ++i) top = std::max(top, lanes[i]);
  for (int64_t i = whole; i < n; ++i) top = std::max(top, x[i]);
  const __m256 mx = _mm256_set1_ps(top);
  __m256 sum8 = _mm256_setzero_ps();
  for (int64_t i = 0; i < whole; i += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), mx));
    sum8 = _mm256_add_ps(sum8, e);
    _mm256_storeu_ps(x + i, e);
  }
  _mm256_store_ps(lanes, sum8);
  float sum = 0.0f;
  for (int i = 0; i < 8; ++i) sum += lanes[i];
  for (int64_t i = whole; i < n; ++i) sum += (x[i] = exp_nonpositive(x[i] - top));
  // times the sum's reciprocal: within an ulp of dividing, at a multiply's throughput
  const float inv = 1.0f / sum;
  const __m256 inv8 = _mm256_set1_ps(inv);
  std::memset(probs, 0, lp * sizeof(float));
  float* p = probs + lo;
  for (int64_t i = 0; i < whole; i += 8) {
    const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x + i), inv8);
    _mm256_storeu_ps(p + i, bf16 ? round_bf16_8(v) : v);
  }
  for (int64_t i = whole; i < n; ++i) p[i] = bf16 ? round_bf16(x[i] * inv) : x[i] * inv;
}

// A work item's scratch on the AVX2 path: a bfloat16 item's queries widened, its rows'
// scores and probabilities.
struct WideScratch {
  std::vector<float> q, scores, probs;
};

// An item's M rows on the AVX2 tiles, 3 at a time (a bfloat16 item's queries widened first):
// the scores over the 32-key tiles up to the group's last visible key, each row's softmax, the
// value product over the keys the group sees.
XDS_PREFILL256 inline void attend_rows8(Row* rows, int64_t M, bool bf16, const float* keys,
                                        const float* vals, int64_t lp, int64_t D, float scale,
                                        float cap, WideScratch& ws) {
  if (bf16) {
    ws.q.resize(M * D);
    for (int64_t r = 0; r < M; ++r) {
      const uint16_t* q = static_cast<const uint16_t*>(rows[r].q);
      float* w = ws.q.data() + r * D;
      for (int64_t d = 0; d < D; ++d) w[d] = value(q[d]);
      rows[r].q = w;
    }
  }
  ws.scores.resize(M * lp);
  ws.probs.resize(M * lp);
  float* scores = ws.scores.data();
  float* probs = ws.probs.data();
  for (int64_t r0 = 0; r0 < M; r0 += kRows8) {
    const int64_t n = std::min<int64_t>(kRows8, M - r0);
    int64_t lo = lp, hi = -1;
    for (int64_t r = r0; r < r0 + n; ++r) {
      if (rows[r].hi >= rows[r].lo) lo = std::min(lo, rows[r].lo), hi = std::max(hi, rows[r].hi);
    }
    if (hi < lo) continue;  // every row is padding, its output already zeros
    float* sc = scores + r0 * lp;
    float* pr = probs + r0 * lp;
    with_rows<kRows8>(n, [&](auto R) {
      for (int64_t t0 = lo / kTile8 * kTile8; t0 <= hi; t0 += kTile8) {
        score_tile8<R()>(rows + r0, keys, lp, D, t0, scale, sc);
      }
    });
    for (int64_t r = 0; r < n; ++r) {
      if (rows[r0 + r].hi >= rows[r0 + r].lo) {
        softmax_row8(sc + r * lp, rows[r0 + r], lp, cap, bf16, pr + r * lp);
      }
    }
    // rows without a visible key multiply stale probabilities: their outputs are zeroed below
    with_rows<kRows8>(n, [&](auto R) {
      int64_t d0 = 0;
      for (; d0 + 32 <= D; d0 += 32) {
        value_tile8<R(), 4>(rows + r0, pr, vals, lp, D, d0, lo, hi + 1);
      }
      for (; d0 < D; d0 += 16) value_tile8<R(), 2>(rows + r0, pr, vals, lp, D, d0, lo, hi + 1);
    });
    for (int64_t r = r0; r < r0 + n; ++r) {
      if (rows[r].hi < rows[r].lo) std::fill(rows[r].out, rows[r].out + D, 0.0f);
    }
  }
}

}  // namespace xds_kernels
