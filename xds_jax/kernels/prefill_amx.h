// Intel AMX tiles of xds-jax's CPU prefill attention kernel (prefill_attention.cc includes this
// file), bfloat16 with head dims a multiple of 32: a group of 16 rows (query tokens times the
// kv head's query heads) per A tile. Both operands of both products are already in AMX's
// layouts: the transposed key panel's words (pairs of head dims) by keys are the B tiles of the
// scores (16 pairs by 16 keys), the value panel's words (pairs of keys) by head dims those of
// the output (16 key pairs by 16 dims); the rows' queries are packed once per group, the
// probabilities are the softmax's rows (pairs of keys a word). TDPBF16PS: pair products exact
// in float32, accumulated in float32 (denormals flushed), as the AVX-512 tiles' pair dot
// product; only the order of the sums differs.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "amx_tiles.h"

namespace xds_kernels {

constexpr int kAmxGroup = 16;  // rows per A tile

// The group's query words [16][dw] (rows past n zeros).
XDS_AMX inline void amx_pack_queries(const Row* rows, int64_t n, int64_t dw, uint32_t* qpack) {
  for (int64_t r = 0; r < kAmxGroup; ++r) {
    uint32_t* dst = qpack + r * dw;
    if (r < n) {
      std::memcpy(dst, rows[r].q, dw * sizeof(uint32_t));
    } else {
      std::memset(dst, 0, dw * sizeof(uint32_t));
    }
  }
}

// scores[r][t0 .. t1) = scale * q_r . key_t for the group's 16 rows (t0, t1 multiples of 64),
// four 16-key accumulators at a time, the head dims in steps of 32 (one A, four B tiles).
XDS_AMX inline void amx_score_group(const uint32_t* qpack, const uint32_t* keys, int64_t lp,
                                    int64_t dw, int64_t t0, int64_t t1, float scale,
                                    float* scores) {
  const __m512 sv = _mm512_set1_ps(scale);
  for (int64_t t = t0; t < t1; t += 64) {
    amx_zero4();
    for (int64_t w = 0; w < dw; w += 16) {
      _tile_loadd(4, qpack + w, dw * 4);
      const uint32_t* kw = keys + w * lp + t;
      _tile_loadd(6, kw, lp * 4);
      _tile_dpbf16ps(0, 4, 6);
      _tile_loadd(7, kw + 16, lp * 4);
      _tile_dpbf16ps(1, 4, 7);
      _tile_loadd(6, kw + 32, lp * 4);
      _tile_dpbf16ps(2, 4, 6);
      _tile_loadd(7, kw + 48, lp * 4);
      _tile_dpbf16ps(3, 4, 7);
    }
    _tile_stored(0, scores + t, lp * 4);
    _tile_stored(1, scores + t + 16, lp * 4);
    _tile_stored(2, scores + t + 32, lp * 4);
    _tile_stored(3, scores + t + 48, lp * 4);
    for (int r = 0; r < kAmxGroup; ++r) {
      float* s = scores + r * lp + t;
      for (int j = 0; j < 4; ++j) {
        _mm512_storeu_ps(s + 16 * j, _mm512_mul_ps(_mm512_loadu_ps(s + 16 * j), sv));
      }
    }
  }
}

// out[r][0 .. D) = sum over key-pair words w0 .. w1 (multiples of 16) of probs[r][w] . vals[w]
// for the group's 16 rows: up to four 16-dim accumulators at a time.
XDS_AMX inline void amx_value_group(const uint32_t* probs, const uint32_t* vals, int64_t lpw,
                                    int64_t D, int64_t w0, int64_t w1, float* out) {
  for (int64_t d0 = 0; d0 < D; d0 += 64) {
    const int tiles = static_cast<int>(std::min<int64_t>(4, (D - d0) / 16));
    amx_zero4();
    for (int64_t w = w0; w < w1; w += 16) {
      _tile_loadd(4, probs + w, lpw * 4);
      const uint32_t* vw = vals + w * D + d0;
      _tile_loadd(6, vw, D * 4);
      _tile_dpbf16ps(0, 4, 6);
      if (tiles > 1) {
        _tile_loadd(7, vw + 16, D * 4);
        _tile_dpbf16ps(1, 4, 7);
      }
      if (tiles > 2) {
        _tile_loadd(6, vw + 32, D * 4);
        _tile_dpbf16ps(2, 4, 6);
      }
      if (tiles > 3) {
        _tile_loadd(7, vw + 48, D * 4);
        _tile_dpbf16ps(3, 4, 7);
      }
    }
    _tile_stored(0, out + d0, D * 4);
    if (tiles > 1) _tile_stored(1, out + d0 + 16, D * 4);
    if (tiles > 2) _tile_stored(2, out + d0 + 32, D * 4);
    if (tiles > 3) _tile_stored(3, out + d0 + 48, D * 4);
  }
}

}  // namespace xds_kernels
