// Work split in chunks over XLA's intra-op thread pool, shared by xds-jax's CPU kernels
// (few_row_matmul.cc, paged_attention.cc).
//
// The caller drains chunks too, so it never waits on a task that has not started; the work is
// held by a shared_ptr the tasks keep, so a task the pool starts after the call returned finds
// nothing left and exits. Only chunks a running task took are waited for.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace xds_kernels {

struct Chunks {
  int64_t chunks = 0;
  alignas(64) std::atomic<int64_t> next{0};  // own cache lines: grabbed and done by different cores
  alignas(64) std::atomic<int64_t> done{0};

  // Whether a thread takes its next chunk before running the one it holds (run_before): a
  // kernel streaming weights then fetches the next chunk's first ones during this one's last
  // block, instead of starting every chunk cold. A thread holds one chunk more than it runs,
  // so the last chunks' balance is a chunk coarser.
  bool grab_ahead = false;

  virtual ~Chunks() = default;
  virtual void run(int64_t chunk) = 0;
  // ``chunk``, knowing the chunk this thread runs next (``chunks`` or more: none, or not
  // taken ahead).
  virtual void run_before(int64_t chunk, int64_t following) { run(chunk); }

  void drain() {
    int64_t c = next.fetch_add(1, std::memory_order_relaxed);
    while (c < chunks) {
      const int64_t following =
          grab_ahead ? next.fetch_add(1, std::memory_order_relaxed) : chunks;
      run_before(c, following);
      done.fetch_add(1, std::memory_order_release);
      c = grab_ahead ? following : next.fetch_add(1, std::memory_order_relaxed);
    }
  }
};

// Runs work->run(c) for every c < work->chunks on the pool's threads and the caller's.
inline void run_chunks(xla::ffi::ThreadPool& pool, std::shared_ptr<Chunks> work) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t helpers = std::min(threads, work->chunks) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { work->drain(); });
  work->drain();
  for (int spins = 0; work->done.load(std::memory_order_acquire) < work->chunks; ++spins) {
    if (spins < 4096) {
      _mm_pause();
    } else {
      std::this_thread::yield();
    }
  }
}

}  // namespace xds_kernels
