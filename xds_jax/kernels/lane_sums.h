// The transposing tree that sums each of up to 16 AVX-512 accumulators' lanes at once
// (few_row_blocks.h's register tiles, paged_attention.cc's scores): 45 shuffles and adds per
// 16 accumulators, where each alone takes 8. AVX-512F only, so any AVX-512 kernel inlines it.
#pragma once

#include <immintrin.h>

#include <cstdint>

#define UNROLL _Pragma("GCC unroll 16")
#define XDS_LANES __attribute__((target("avx512f")))

namespace xds_kernels {

XDS_LANES inline __m512 add(__m512 a, __m512 b) { return _mm512_add_ps(a, b); }
XDS_LANES inline __m512i add(__m512i a, __m512i b) { return _mm512_add_epi32(a, b); }
XDS_LANES inline __m512 bits(__m512 v) { return v; }
XDS_LANES inline __m512 bits(__m512i v) { return _mm512_castsi512_ps(v); }
XDS_LANES inline __m512 as(__m512 v, __m512) { return v; }  // bits as the second's type
XDS_LANES inline __m512i as(__m512 v, __m512i) { return _mm512_castps_si512(v); }

// Level L of lane_sums' tree: halves of 256 (L = 0), 128, 64 and 32 bits of a and b added
// pairwise, the 512 bits of the result covering both.
template <int L, typename V>
XDS_LANES inline V fold(V a, V b) {
  const __m512 x = bits(a), y = bits(b);
  __m512 lo, hi;
  if constexpr (L == 0) {
    lo = _mm512_shuffle_f32x4(x, y, 0x44), hi = _mm512_shuffle_f32x4(x, y, 0xee);
  } else if constexpr (L == 1) {
    lo = _mm512_shuffle_f32x4(x, y, 0x88), hi = _mm512_shuffle_f32x4(x, y, 0xdd);
  } else if constexpr (L == 2) {
    const __m512d xd = _mm512_castps_pd(x), yd = _mm512_castps_pd(y);
    lo = _mm512_castpd_ps(_mm512_unpacklo_pd(xd, yd));
    hi = _mm512_castpd_ps(_mm512_unpackhi_pd(xd, yd));
  } else {
    lo = _mm512_shuffle_ps(x, y, 0x88), hi = _mm512_shuffle_ps(x, y, 0xdd);
  }
  return add(as(lo, a), as(hi, a));
}

// out[i] = the sum of acc[i]'s 16 lanes (float32 or int32) for i < T: a transposing tree of 45
// shuffles and adds per 16 accumulators, where each alone takes 8 (a quarter of a block's time
// at K = 576); lane 4 (i % 4) + i / 4 of the tree's last vector holds acc[i]'s sum.
template <int T, typename V, typename S>
XDS_LANES inline void lane_sums(const V* acc, S* out) {
  UNROLL for (int g = 0; g < T; g += 16) {
    V v[16];
    UNROLL for (int i = 0; i < 16; ++i)
      v[i] = g + i < T ? acc[g + i] : as(_mm512_setzero_ps(), V{});
    UNROLL for (int i = 0; i < 8; ++i) v[i] = fold<0>(v[2 * i], v[2 * i + 1]);
    UNROLL for (int i = 0; i < 4; ++i) v[i] = fold<1>(v[2 * i], v[2 * i + 1]);
    UNROLL for (int i = 0; i < 2; ++i) v[i] = fold<2>(v[2 * i], v[2 * i + 1]);
    v[0] = fold<3>(v[0], v[1]);
    alignas(64) S lanes[16];
    _mm512_store_ps(reinterpret_cast<float*>(lanes), bits(v[0]));
    UNROLL for (int i = 0; i < 16; ++i)
      if (g + i < T) out[g + i] = lanes[4 * (i % 4) + i / 4];
  }
}

}  // namespace xds_kernels
