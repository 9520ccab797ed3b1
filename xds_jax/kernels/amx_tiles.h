// Intel AMX blocks of xds-jax's bfloat16 and int8 matmuls (few_row_matmul.cc includes this file):
// y[M, N] (float32) = x[M, K] . w[N, K]^T with TDPBF16PS, 16 x 16 float32 tiles of
// 16 weight rows (A: read in place from the output-major weight, a row's 32 values of K per
// tile row) by 16 rows of x (B: x packed once per call into AMX's pair layout, 16 pairs of K by
// 16 rows a tile). Pair products are exact in float32 and accumulate in float32, as AVX-512
// BF16's dot product does (denormals flushed).
//
// Weight-only int8 (TDPBSSD): the rows' int8 halves hi and lo (quant._split_rows) packed the
// same way, 4 values of K a word, against int8 weight tiles: exact int32 sums of each half,
// then ((256 hi + lo) * x_scale) * w_scale, XLA's arithmetic and the AVX-512 path's.
//
// Used where the CPU has AMX-BF16 (AMX-INT8) and Linux lets the process use tile data
// (arch_prctl ARCH_REQ_XCOMP_PERM, asked once), for K a multiple of 32 (64); the outputs past
// the last whole block of tile columns run the AVX-512 blocks.
#pragma once

#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <new>
#include <vector>

#include "next_lines.h"

namespace xds_kernels {

#define XDS_AMX __attribute__((target("amx-tile,amx-bf16,amx-int8,avx512f,avx512bw")))

constexpr int64_t kAmxPanel = 256;  // packed rows of x that stay in L2 while weights pass

using NextRows = NextLines<_MM_HINT_T1>;  // the next block's weight rows, into L2

// Packed rows on whole cache lines (a tile row is one line).
template <typename T>
struct Aligned64 {
  using value_type = T;
  Aligned64() = default;
  template <typename U>
  Aligned64(const Aligned64<U>&) {}
  T* allocate(size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64)));
  }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <typename U>
  bool operator==(const Aligned64<U>&) const { return true; }
  template <typename U>
  bool operator!=(const Aligned64<U>&) const { return false; }
};
using TileBuffer = std::vector<uint32_t, Aligned64<uint32_t>>;

// The calling thread's packing buffer of at least ``words`` words, kept between calls (a call's
// chunks are all done before it returns, so the next call on this thread may reuse it).
inline uint32_t* amx_buffer(int64_t words) {
  thread_local TileBuffer buffer;
  if (static_cast<int64_t>(buffer.size()) < words) buffer.resize(words);
  return buffer.data();
}

// What AMX runs here (1: BF16, 2: INT8, or both): what the CPU has, where the kernel grants
// this process tile data.
inline int amx_usable() {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 24))) return 0;
  constexpr long kReqPerm = 0x1023, kTileData = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
  if (syscall(SYS_arch_prctl, kReqPerm, kTileData) != 0) return 0;
  return (d & (1u << 22) ? 1 : 0) | (d & (1u << 25) ? 2 : 0);
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0-3 accumulate (16 x 16 float32), 4-5 hold weights, 6-7 rows of x: 16 rows of 64 bytes.
XDS_AMX inline void amx_begin() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) cfg.colsb[t] = 64, cfg.rows[t] = 16;
  _tile_loadconfig(&cfg);
}

XDS_AMX inline void amx_end() { _tile_release(); }

XDS_AMX inline void amx_zero4() {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
}

XDS_AMX inline void amx_stored4(float (*t)[256]) {
  _tile_stored(0, t[0], 64);
  _tile_stored(1, t[1], 64);
  _tile_stored(2, t[2], 64);
  _tile_stored(3, t[3], 64);
}

XDS_AMX inline __m512 lo64(__m512 a, __m512 b) {
  return _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
}
XDS_AMX inline __m512 hi64(__m512 a, __m512 b) {
  return _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
}

// r[i] = row i of a 16 x 16 float32 tile becomes column i (32-, 64-bit unpacks, then
// 128-bit lane shuffles).
XDS_AMX inline void transpose16(__m512* r) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = lo64(t[i], t[i + 2]);
    r[i + 1] = hi64(t[i], t[i + 2]);
    r[i + 2] = lo64(t[i + 1], t[i + 3]);
    r[i + 3] = hi64(t[i + 1], t[i + 3]);
  }
  for (int h = 0; h < 16; h += 8) {
    for (int i = 0; i < 4; ++i) {
      t[h + i] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0x88);
      t[h + i + 4] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0xdd);
    }
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
  }
}

// Rows x [M, words] of 32-bit words (pairs of bfloat16, quads of int8) into tiles of 16 rows
// by 16 words: tile (mb, s) at out + (mb * words / 16 + s) * 256, its row r holding word
// 16 s + r of rows 16 mb .. 16 mb + 15 (rows past M zeros; ``mp`` rows in all): a 16 x 16
// transpose per tile.
XDS_AMX inline void amx_pack(const void* x, int64_t M, int64_t words, int64_t mp,
                             uint32_t* out) {
  const int64_t steps = words / 16;
  const auto* x32 = static_cast<const uint32_t*>(x);
  for (int64_t mb = 0; mb < mp / 16; ++mb) {
    for (int64_t s = 0; s < steps; ++s) {
      __m512 r[16];
      for (int j = 0; j < 16; ++j) {
        const int64_t m = mb * 16 + j;
        r[j] = m < M ? _mm512_loadu_ps(reinterpret_cast<const float*>(x32 + m * words + s * 16))
                     : _mm512_setzero_ps();
      }
      transpose16(r);
      float* tile = reinterpret_cast<float*>(out + (mb * steps + s) * 256);
      for (int i = 0; i < 16; ++i) _mm512_store_ps(tile + 16 * i, r[i]);
    }
  }
}

// A tile of y^T (16 weight rows by 16 rows of x) into y [M, N] at (m0, n).
XDS_AMX inline void amx_store(const float* tile, float* y, int64_t m0, int64_t M, int64_t N,
                              int64_t n) {
  __m512 r[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_load_ps(tile + 16 * i);
  transpose16(r);
  for (int j = 0; j < 16 && m0 + j < M; ++j) _mm512_storeu_ps(y + (m0 + j) * N + n, r[j]);
}

// Weight rows n .. n + 64 against one tile of rows (mb): four accumulators.
XDS_AMX inline void amx_block41(const uint16_t* w, const uint32_t* xp, float* y, int64_t M,
                                int64_t N, int64_t K, int64_t n, int64_t mb, bool prefetch) {
  const int64_t steps = K / 32, stride = K * 2;
  const uint32_t* b = xp + mb * steps * 256;
  const uint16_t* a = w + n * K;
  NextRows next(a + 64 * K, 64 * stride, steps, prefetch);
  amx_zero4();
  for (int64_t s = 0; s < steps; ++s) {
    next.step();
    _tile_loadd(6, b + s * 256, 64);
    _tile_loadd(4, a + s * 32, stride);
    _tile_dpbf16ps(0, 4, 6);
    _tile_loadd(5, a + 16 * K + s * 32, stride);
    _tile_dpbf16ps(1, 5, 6);
    _tile_loadd(4, a + 32 * K + s * 32, stride);
    _tile_dpbf16ps(2, 4, 6);
    _tile_loadd(5, a + 48 * K + s * 32, stride);
    _tile_dpbf16ps(3, 5, 6);
  }
  alignas(64) float t[4][256];
  amx_stored4(t);
  for (int i = 0; i < 4; ++i) amx_store(t[i], y, mb * 16, M, N, n + 16 * i);
}

// Weight rows n .. n + 32 against two tiles of rows (mb, mb + 1): four accumulators.
XDS_AMX inline void amx_block22(const uint16_t* w, const uint32_t* xp, float* y, int64_t M,
                                int64_t N, int64_t K, int64_t n, int64_t mb, bool prefetch) {
  const int64_t steps = K / 32, stride = K * 2;
  const uint32_t* b = xp + mb * steps * 256;
  const uint16_t* a = w + n * K;
  NextRows next(a + 32 * K, 32 * stride, steps, prefetch);
  amx_zero4();
  for (int64_t s = 0; s < steps; ++s) {
    next.step();
    _tile_loadd(4, a + s * 32, stride);
    _tile_loadd(6, b + s * 256, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_loadd(7, b + (steps + s) * 256, 64);
    _tile_dpbf16ps(1, 4, 7);
    _tile_loadd(5, a + 16 * K + s * 32, stride);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  alignas(64) float t[4][256];
  amx_stored4(t);
  amx_store(t[0], y, mb * 16, M, N, n);
  amx_store(t[1], y, mb * 16 + 16, M, N, n);
  amx_store(t[2], y, mb * 16, M, N, n + 16);
  amx_store(t[3], y, mb * 16 + 16, M, N, n + 16);
}

// block(n, mb, first) for weight rows n0 .. n1 in steps of 32 against row tiles 0 .. tiles,
// ``step`` at a time: in panels of kAmxPanel rows, so that a panel's packed rows stay in L2
// while the weights pass; ``first``: mb is the panel's first (its block reads the weights from
// memory, the others from cache).
template <typename Block>
inline void amx_panels(int64_t tiles, int64_t step, int64_t n0, int64_t n1, Block&& block) {
  for (int64_t p0 = 0; p0 < tiles; p0 += kAmxPanel / 16) {
    const int64_t p1 = std::min(tiles, p0 + kAmxPanel / 16);
    for (int64_t n = n0; n < n1; n += 32)
      for (int64_t mb = p0; mb < p1; mb += step) block(n, mb, mb == p0);
  }
}

// Outputs n0 .. n1 (a multiple of amx_width(M)) for every row of x.
XDS_AMX inline void amx_columns(const uint16_t* w, const uint32_t* xp, float* y, int64_t M,
                                int64_t N, int64_t K, int64_t n0, int64_t n1) {
  amx_begin();
  if (M <= 16) {
    for (int64_t n = n0; n < n1; n += 64) amx_block41(w, xp, y, M, N, K, n, 0, n + 128 <= n1);
  } else {
    amx_panels((M + 31) / 32 * 2, 2, n0, n1, [&](int64_t n, int64_t mb, bool first) {
      amx_block22(w, xp, y, M, N, K, n, mb, first && n + 64 <= n1);
    });
  }
  amx_end();
}

// Int8 weight rows n .. n + 32 against tile mb of the rows' hi and lo halves (packed one after
// the other, ``lo_at`` words apart): four int32 accumulators, then y as the AVX-512 path.
XDS_AMX inline void amx_int8_block(const int8_t* w, const uint32_t* xp, int64_t lo_at,
                                   const float* x_scale, const float* w_scale, float* y,
                                   int64_t M, int64_t N, int64_t K, int64_t n, int64_t mb,
                                   bool prefetch) {
  const int64_t steps = K / 64;
  const uint32_t* b = xp + mb * steps * 256;
  const int8_t* a = w + n * K;
  NextRows next(a + 32 * K, 32 * K, steps, prefetch);
  amx_zero4();
  for (int64_t s = 0; s < steps; ++s) {
    next.step();
    _tile_loadd(6, b + s * 256, 64);
    _tile_loadd(7, b + lo_at + s * 256, 64);
    _tile_loadd(4, a + s * 64, K);
    _tile_dpbssd(0, 4, 6);
    _tile_dpbssd(1, 4, 7);
    _tile_loadd(5, a + 16 * K + s * 64, K);
    _tile_dpbssd(2, 5, 6);
    _tile_dpbssd(3, 5, 7);
  }
  alignas(64) int32_t t[4][256];
  amx_stored4(reinterpret_cast<float(*)[256]>(t));
  for (int h = 0; h < 2; ++h) {  // weight rows n + 16 h ..
    __m512 r[16];
    for (int i = 0; i < 16; ++i) {
      const __m512 hs = _mm512_cvtepi32_ps(_mm512_load_si512(t[2 * h] + 16 * i));
      const __m512 ls = _mm512_cvtepi32_ps(_mm512_load_si512(t[2 * h + 1] + 16 * i));
      r[i] = _mm512_add_ps(_mm512_mul_ps(hs, _mm512_set1_ps(256.0f)), ls);
    }
    transpose16(r);
    const __m512 ws = _mm512_loadu_ps(w_scale + n + 16 * h);
    for (int j = 0; j < 16 && mb * 16 + j < M; ++j) {
      const __m512 v = _mm512_mul_ps(_mm512_mul_ps(r[j], _mm512_set1_ps(x_scale[mb * 16 + j])), ws);
      _mm512_storeu_ps(y + (mb * 16 + j) * N + n + 16 * h, v);
    }
  }
}

// Int8 outputs n0 .. n1 (a multiple of 32) for every row.
XDS_AMX inline void amx_int8_columns(const int8_t* w, const uint32_t* xp, int64_t lo_at,
                                     const float* x_scale, const float* w_scale, float* y,
                                     int64_t M, int64_t N, int64_t K, int64_t n0, int64_t n1) {
  amx_begin();
  amx_panels((M + 15) / 16, 1, n0, n1, [&](int64_t n, int64_t mb, bool first) {
    amx_int8_block(w, xp, lo_at, x_scale, w_scale, y, M, N, K, n, mb, first && n + 64 <= n1);
  });
  amx_end();
}

// Weight rows per AMX block: 64 for one tile of rows, 32 for pairs.
inline int64_t amx_width(int64_t M) { return M <= 16 ? 64 : 32; }

// Rows of x packed: one tile, or whole pairs of tiles.
inline int64_t amx_rows(int64_t M) { return M <= 16 ? 16 : (M + 31) / 32 * 32; }

}  // namespace xds_kernels
