// Intel AMX blocks of xds-jax's bfloat16 matmul (few_row_matmul.cc includes this file):
// y[M, N] (float32) = x[M, K] . w[N, K]^T with TDPBF16PS, 16 x 16 float32 tiles of
// 16 weight rows (A: read in place from the output-major weight, a row's 32 values of K per
// tile row) by 16 rows of x (B: x packed once per call into AMX's pair layout, 16 pairs of K by
// 16 rows a tile). Pair products are exact in float32 and accumulate in float32, as AVX-512
// BF16's dot product does (denormals flushed).
//
// Used where the CPU has AMX-BF16 and Linux lets the process use tile data (arch_prctl
// ARCH_REQ_XCOMP_PERM, asked once), for K a multiple of 32; the outputs past the last whole
// block of tile columns run the AVX-512 blocks.
#pragma once

#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace xds_kernels {

#define XDS_AMX __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw")))

constexpr int64_t kAmxPanel = 256;  // packed rows of x that stay in L2 while weights pass

// Whether AMX-BF16 runs here: the CPU has it and the kernel grants this process tile data.
inline bool amx_usable() {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool tile = d & (1u << 24), bf16 = d & (1u << 22);
  constexpr long kReqPerm = 0x1023, kTileData = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
  return tile && bf16 && syscall(SYS_arch_prctl, kReqPerm, kTileData) == 0;
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

// x [M, K] bfloat16 into tiles of 16 rows by 32 values of K: tile (mb, s) at
// (mb * K / 32 + s) * 512, its row r holding the pairs x[16 mb + j][32 s + 2 r .. + 1] for
// j < 16 (rows past M zeros). ``mp``: rows rounded up to a whole number of tile pairs.
inline void amx_pack(const uint16_t* x, int64_t M, int64_t K, int64_t mp,
                     std::vector<uint32_t>& out) {
  const int64_t steps = K / 32;
  out.assign(mp * K / 2, 0);
  const auto* x32 = reinterpret_cast<const uint32_t*>(x);
  for (int64_t m = 0; m < M; ++m) {
    uint32_t* tiles = out.data() + (m / 16) * steps * 256 + m % 16;
    const uint32_t* row = x32 + m * (K / 2);
    for (int64_t s = 0; s < steps; ++s)
      for (int r = 0; r < 16; ++r) tiles[s * 256 + r * 16] = row[s * 16 + r];
  }
}

XDS_AMX inline __m512 lo64(__m512 a, __m512 b) {
  return _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
}
XDS_AMX inline __m512 hi64(__m512 a, __m512 b) {
  return _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
}

// A tile of y^T (16 weight rows by 16 rows of x) into y [M, N] at (m0, n): transposed in
// registers (32-, 64-bit unpacks, then 128-bit lane shuffles).
XDS_AMX inline void amx_store(const float* tile, float* y, int64_t m0, int64_t M, int64_t N,
                              int64_t n) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_load_ps(tile + 16 * i);
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
  for (int j = 0; j < 16 && m0 + j < M; ++j) _mm512_storeu_ps(y + (m0 + j) * N + n, r[j]);
}

// Weight rows n .. n + 64 against one tile of rows (mb): four accumulators.
XDS_AMX inline void amx_block41(const uint16_t* w, const uint32_t* xp, float* y, int64_t M,
                                int64_t N, int64_t K, int64_t n, int64_t mb) {
  const int64_t steps = K / 32, stride = K * 2;
  const uint32_t* b = xp + mb * steps * 256;
  const uint16_t* a = w + n * K;
  amx_zero4();
  for (int64_t s = 0; s < steps; ++s) {
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
                                int64_t N, int64_t K, int64_t n, int64_t mb) {
  const int64_t steps = K / 32, stride = K * 2;
  const uint32_t* b = xp + mb * steps * 256;
  const uint16_t* a = w + n * K;
  amx_zero4();
  for (int64_t s = 0; s < steps; ++s) {
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

// Outputs n0 .. n1 (a multiple of amx_width(M)) for every row of x.
XDS_AMX inline void amx_columns(const uint16_t* w, const uint32_t* xp, float* y, int64_t M,
                                int64_t N, int64_t K, int64_t n0, int64_t n1) {
  amx_begin();
  if (M <= 16) {
    for (int64_t n = n0; n < n1; n += 64) amx_block41(w, xp, y, M, N, K, n, 0);
  } else {
    const int64_t tiles = (M + 31) / 32 * 2;
    for (int64_t p0 = 0; p0 < tiles; p0 += kAmxPanel / 16) {
      const int64_t p1 = std::min(tiles, p0 + kAmxPanel / 16);
      for (int64_t n = n0; n < n1; n += 32)
        for (int64_t mb = p0; mb < p1; mb += 2) amx_block22(w, xp, y, M, N, K, n, mb);
    }
  }
  amx_end();
}

// Weight rows per AMX block: 64 for one tile of rows, 32 for pairs.
inline int64_t amx_width(int64_t M) { return M <= 16 ? 64 : 32; }

// Rows of x packed: one tile, or whole pairs of tiles.
inline int64_t amx_rows(int64_t M) { return M <= 16 ? 16 : (M + 31) / 32 * 32; }

}  // namespace xds_kernels
