// The lines of the block a kernel reads next, asked for a share at each of the current
// block's k steps so that they arrive while it computes (few_row_blocks.h's AVX-512 blocks into
// L1, amx_tiles.h's AMX blocks into L2). A block reads its weight rows interleaved, a line of
// each at a time, and the hardware prefetcher stops at every 4 KB page and follows only so
// many streams: one-row int8 blocks streamed 15 GB/s, 8-32-row AMX blocks 7-19, against the
// ~21 GB/s two threads read here (docs/performance.md).
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace xds_kernels {

// ``bytes`` from ``next`` (contiguous) over ``steps`` calls of step(); nothing where ``on`` is
// false (the block's weights come from cache, or the next block is another thread's).
template <int Hint>
struct NextLines {
  const char* p;
  int64_t lines, per, line = 0;
  NextLines(const void* next, int64_t bytes, int64_t steps, bool on)
      : p(static_cast<const char*>(next)), lines(on ? bytes / 64 : 0),
        per(steps > 0 ? (lines + steps - 1) / steps : 0) {}
  inline void step() {
    for (int64_t i = 0; i < per && line < lines; ++i, ++line) {
      _mm_prefetch(p + line * 64, static_cast<_mm_hint>(Hint));
    }
  }
};

}  // namespace xds_kernels
