// Float32 matmuls of many rows (a prefill chunk, large decode batches) on AVX2 + FMA, for
// xds-jax's CPU matmul kernel (few_row_matmul.cc includes this file after few_row_blocks.h).
//
// The few-row blocks multiply weight rows (K contiguous, the layout the model stores) into
// rows of x as dot products: lane partial sums and a horizontal sum per output, 12
// accumulators of 16 registers, ~130 GFLOP/s on a 2-core AMD EPYC Zen 3 whose FMAs peak near
// 190. At many rows the classic packed GEMM runs closer to the peak: a block of outputs' weights
// is transposed, K steps of 256 at a time, into panels of 16 outputs [k][16] (L1/L2), and 6 x 16
// register tiles (12 accumulators, two panel vectors, a broadcast row value) sweep every row
// over it, the tile's y loaded and stored at each K step after the first.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "few_row_blocks.h"

namespace xds_kernels {

constexpr int kGemmRows = 6;      // rows per register tile
constexpr int64_t kGemmCols = 16;  // outputs per panel (two vectors)
constexpr int64_t kGemmK = 256;    // k per packed step

// 8 x 8 floats transposed: rows src[i * stride ..] (i < 8) into dst[j * 16 + i] (j < 8).
XDS_AVX2 inline void transpose8(const float* src, int64_t stride, float* dst) {
  __m256 r[8], t[8];
  UNROLL for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * stride);
  UNROLL for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  UNROLL for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  // r[j] (r[j + 4]): column j of rows 0-3 (4-7) in its low half, column j + 4 in its high one
  UNROLL for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(dst + i * 16, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * 16, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}

// The panel of outputs n .. n + 16 of w [N, K] over k0 .. k0 + kc: p[k][16].
XDS_AVX2 inline void pack_panel16(const float* w, int64_t K, int64_t n, int64_t k0, int64_t kc,
                                  float* p) {
  const float* src = w + n * K + k0;
  const int64_t whole = kc / 8 * 8;
  for (int64_t k = 0; k < whole; k += 8) {
    transpose8(src + k, K, p + k * 16);
    transpose8(src + 8 * K + k, K, p + k * 16 + 8);
  }
  for (int64_t k = whole; k < kc; ++k) {
    for (int64_t j = 0; j < kGemmCols; ++j) p[k * 16 + j] = src[j * K + k];
  }
}

// y[r][0 .. 16) (+)= sum over k < kc of x[r][k] p[k][..] for R rows (x and y rows ``ldx`` and
// ``ldy`` apart); ``add``: onto y's values (the K steps after the first).
template <int R>
XDS_AVX2 void gemm_tile(const float* x, int64_t ldx, const float* p, int64_t kc, float* y,
                        int64_t ldy, bool add) {
  __m256 acc[R][2];
  UNROLL for (int r = 0; r < R; ++r) {
    acc[r][0] = add ? _mm256_loadu_ps(y + r * ldy) : _mm256_setzero_ps();
    acc[r][1] = add ? _mm256_loadu_ps(y + r * ldy + 8) : _mm256_setzero_ps();
  }
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_loadu_ps(p + k * 16), b1 = _mm256_loadu_ps(p + k * 16 + 8);
    UNROLL for (int r = 0; r < R; ++r) {
      const __m256 a = _mm256_broadcast_ss(x + r * ldx + k);
      acc[r][0] = _mm256_fmadd_ps(a, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(a, b1, acc[r][1]);
    }
  }
  UNROLL for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(y + r * ldy, acc[r][0]);
    _mm256_storeu_ps(y + r * ldy + 8, acc[r][1]);
  }
}

// Outputs n0 .. n1 (multiples of 16) of y [M, N] = x [M, K] . w [N, K]^T: per K step, the
// outputs' panels packed into ``packed``, then every group of rows against each panel.
XDS_AVX2 inline void gemm_columns(const Operands& o, int64_t n0, int64_t n1,
                                  std::vector<float>& packed) {
  const int64_t M = o.M, N = o.N, K = o.K, panels = (n1 - n0) / kGemmCols;
  const auto* w = static_cast<const float*>(o.w);
  if (K == 0) {  // an empty contraction: zeros
    for (int64_t m = 0; m < M; ++m) std::fill(o.y + m * N + n0, o.y + m * N + n1, 0.0f);
    return;
  }
  packed.resize(panels * kGemmCols * std::min(K, kGemmK));
  for (int64_t k0 = 0; k0 < K; k0 += kGemmK) {
    const int64_t kc = std::min(kGemmK, K - k0);
    for (int64_t j = 0; j < panels; ++j) {
      pack_panel16(w, K, n0 + j * kGemmCols, k0, kc, packed.data() + j * kGemmCols * kc);
    }
    for (int64_t m = 0; m < M;) {
      // groups of 6; a rest of 1 or 2 (after 6 or more) as two groups of 3 or 4, whose 6 or 8
      // accumulators keep more FMAs in flight than 2 or 4
      const int64_t left = M - m, rest = left % kGemmRows;
      const int64_t rows = left > kGemmRows && left < 2 * kGemmRows && rest <= 2 ? left / 2
                           : std::min<int64_t>(kGemmRows, left);
      with_rows<kGemmRows>(rows, [&](auto R) {
        for (int64_t j = 0; j < panels; ++j) {
          gemm_tile<R()>(o.xf + m * K + k0, K, packed.data() + j * kGemmCols * kc, kc,
                         o.y + m * N + n0 + j * kGemmCols, N, k0 > 0);
        }
      });
      m += rows;
    }
  }
}

}  // namespace xds_kernels
