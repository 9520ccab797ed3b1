// xds-jax CPU kernel: causal grouped-query attention of a prefill chunk over a paged KV cache.
//
// out[b, s, k, g, :] = softmax_l(cap(scale * q[b, s, k, g, :] . K[l, k, :])) . V[l, k, :] over
// the keys l the query at position p = positions[b, s] sees: l <= p, and l > p - window where
// the layer has a sliding window; key l of sequence b lives at page tables[b, l / Pg], offset
// l % Pg. XLA:CPU runs it (attention._prefill_attention) as a page gather and dense [S, L]
// scores, softmax and value product in memory: 30-40% of a 512-token SmolLM2 prefill.
//
// A work item is one (sequence, kv head, block of query tokens); its rows are the block's
// tokens times the kv head's G query heads. It copies the keys its rows can see into a
// transposed panel and the values into pairs of rows (so that both products run as outer
// products in registers, each output a lane, no horizontal sums), then per row group: the
// scores over 64-key tiles up to the group's last visible key (half the dense work, causally),
// a float32 softmax over each row's visible range, the probabilities rounded to the values'
// dtype (bfloat16 pages), and the value product over the visible keys; float32 accumulation
// throughout (AVX-512 BF16's pair dot product, or float32 FMAs), the XLA path's arithmetic up
// to the order of the sums. A row whose position is negative (padding) gets zeros.
//
// On a CPU with AMX-BF16, bfloat16 items with head dims a multiple of 32 run both products on
// AMX tiles instead (prefill_amx.h), 16 rows a group; the softmax stays AVX-512.
//
// Without AVX-512 (and for bfloat16 without AVX-512 BF16) the items run AVX2 + FMA tiles on
// float32 panels (prefill_avx2.h). Needs AVX2 + FMA (cpu_attention.prefill_applies checks);
// built and registered by xds_jax/kernels/build.py, used through xds_jax/kernels/cpu_attention.py.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "kernel_math.h"
#include "pool_chunks.h"
#include "prefill_tiles.h"
#include "prefill_avx2.h"
#include "prefill_amx.h"

namespace ffi = xla::ffi;

namespace {

using namespace xds_kernels;

constexpr int64_t kTile = 64;   // keys per score tile: 4 vectors of 16 lanes
constexpr int64_t kScratch = 384 << 10;  // bytes of scores + probabilities per item (L2)
constexpr size_t kKeepPanels = 4 << 20;  // panel words kept allocated between calls

struct Args {
  const void* q = nullptr;           // [B, S, K, G, D]
  const void* kp = nullptr;          // [P, Pg, K, D]
  const void* vp = nullptr;          // [P, Pg, K, D]
  const int32_t* tables = nullptr;   // [B, N]
  const int32_t* positions = nullptr;  // [B, S]
  float* out = nullptr;              // [B, S, K, G, D]
  int64_t B = 0, S = 0, K = 0, G = 0, D = 0, P = 0, Pg = 0, N = 0;
  int64_t window = 0;  // 0: none
  int64_t tq = 1, q_blocks = 1;  // query tokens per item, items per (sequence, kv head)
  float scale = 1.0f, cap = 0.0f;
  bool bf16 = false;
  bool wide = false;  // the AVX2 path: float32 panels (bfloat16 widened), one value a word
  // per sequence: the keys any of its queries sees [first, last] (last < first: none), and
  // per (sequence, kv head) panel the offset of its words in keys and vals
  std::vector<int64_t> first, last, offset;
  uint32_t* keys = nullptr;  // panels: [D / per_word][Lp] words, Lp = keys seen rounded to 64
  uint32_t* vals = nullptr;  // panels: [Lp / per_word][D] words (bf16: keys 2t, 2t + 1 paired)

  int64_t per_word() const { return bf16 && !wide ? 2 : 1; }
};

// One item's scratch, per thread: its rows, scores [M][Lp] and the probabilities [M][Lp] in
// the values' dtype (M rounded up to a group of AMX rows), the AMX path's packed queries and
// outputs of a group; the AVX2 path's (prefill_avx2.h).
struct Scratch {
  std::vector<Row> rows;
  std::vector<uint32_t> probs, qpack;
  std::vector<float> scores, outs;
  WideScratch wide;
};

// The instruction set the kernel runs here: 2 AVX-512 F/BW/VL, 1 AVX2 + FMA, 0 none (not run).
const int kIsa = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") ? 2
                 : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 1 : 0;
// Whether bfloat16 items can take AVX-512 BF16's pair dot product (else the AVX2 path).
const bool kBf16Dot = kIsa == 2 && __builtin_cpu_supports("avx512bf16");
std::atomic<int> g_isa{kIsa};  // lowered by xds_prefill_attention_use_isa (tests, benchmarks)
// Whether bfloat16 items with head dims a multiple of 32 run AMX tiles (prefill_amx.h): where
// the CPU has AMX-BF16 and the OS grants tile data; xds_prefill_attention_use_amx (tests).
const bool kAmxBf16 = kBf16Dot && (amx_usable() & 1) != 0;
std::atomic<bool> g_amx{kAmxBf16};

inline int64_t panel_width(const Args& a, int64_t b) {
  const int64_t seen = a.last[b] - a.first[b] + 1;
  return seen <= 0 ? 0 : (seen + kTile - 1) / kTile * kTile;
}

// The panel of sequence b and kv head kv: the keys it sees transposed, the values in word
// rows, zeros past the last.
template <typename T>
void pack_panel(const Args& a, int64_t panel) {
  constexpr int pw = Words<T>::per_word;
  const int64_t kv = panel % a.K, b = panel / a.K, D = a.D, dw = D / pw;
  const int64_t lp = panel_width(a, b), lv = a.last[b] - a.first[b] + 1;
  const T* kp = static_cast<const T*>(a.kp);
  const T* vp = static_cast<const T*>(a.vp);
  auto row = [&](int64_t t) {  // the offset of key first + t in the pages
    const int64_t l = a.first[b] + t;
    const int64_t page = std::clamp<int64_t>(a.tables[b * a.N + l / a.Pg], 0, a.P - 1);
    return ((page * a.Pg + l % a.Pg) * a.K + kv) * D;
  };
  if (a.wide) {
    return pack_panel_wide(kp, vp, lv, lp, D, row,
                           reinterpret_cast<float*>(a.keys + a.offset[panel]),
                           reinterpret_cast<float*>(a.vals + a.offset[panel]));
  }
  uint32_t* keys = a.keys + a.offset[panel];
  T* vals = reinterpret_cast<T*>(a.vals + a.offset[panel]);
  for (int64_t t = 0; t < lp; ++t) {
    T* v = vals + (t / pw * D) * pw + t % pw;  // value d of key t at v[d * pw]
    if (t < lv) {
      const int64_t at = row(t);
      for (int64_t w = 0; w < dw; ++w) keys[w * lp + t] = word(kp + at + w * pw);
      for (int64_t d = 0; d < D; ++d) v[d * pw] = vp[at + d];
    } else {
      for (int64_t w = 0; w < dw; ++w) keys[w * lp + t] = 0;
      for (int64_t d = 0; d < D; ++d) v[d * pw] = T{};
    }
  }
}

// The keys [lo, hi] any of n rows sees (hi < lo: none, every row padding).
inline void visible_span(const Row* rows, int64_t n, int64_t lp, int64_t& lo, int64_t& hi) {
  lo = lp, hi = -1;
  for (int64_t r = 0; r < n; ++r) {
    if (rows[r].hi < rows[r].lo) continue;
    lo = std::min(lo, rows[r].lo), hi = std::max(hi, rows[r].hi);
  }
}

// An item's rows on AMX tiles, 16 at a time (bfloat16, D a multiple of 32): scores over the
// 64-key tiles up to the group's last visible key, each row's softmax, the value product over
// the 32-key steps the group sees.
XDS_AMX void attend_rows_amx(const Args& a, Row* rows, int64_t M, const uint32_t* keys,
                             const uint32_t* vals, int64_t lp, Scratch& sc) {
  const int64_t D = a.D, dw = D / 2, lpw = lp / 2;
  sc.qpack.resize(kAmxGroup * dw);
  sc.outs.resize(kAmxGroup * D);
  amx_begin();
  for (int64_t r0 = 0; r0 < M; r0 += kAmxGroup) {
    const int64_t n = std::min<int64_t>(kAmxGroup, M - r0);
    int64_t lo, hi;
    visible_span(rows + r0, n, lp, lo, hi);
    if (hi < lo) continue;  // every row is padding, its output already zeros
    float* scores = sc.scores.data() + r0 * lp;
    uint32_t* probs = sc.probs.data() + r0 * lpw;
    amx_pack_queries(rows + r0, n, dw, sc.qpack.data());
    amx_score_group(sc.qpack.data(), keys, lp, dw, lo / 64 * 64, (hi / 64 + 1) * 64, a.scale,
                    scores);
    for (int64_t r = 0; r < n; ++r) {
      if (rows[r0 + r].hi >= rows[r0 + r].lo) {
        softmax_row<uint16_t>(scores + r * lp, rows[r0 + r], lp, a.cap, probs + r * lpw);
      }
    }
    // rows past n and padding rows multiply stale probabilities: their outputs are not kept
    amx_value_group(probs, vals, lpw, D, lo / 32 * 16, (hi / 32 + 1) * 16, sc.outs.data());
    for (int64_t r = 0; r < n; ++r) {
      const Row& row = rows[r0 + r];
      if (row.hi >= row.lo) std::memcpy(row.out, sc.outs.data() + r * D, D * sizeof(float));
    }
  }
  amx_end();
}

// Work item ``item``'s rows into sc.rows, padding rows' outputs zeroed; returns their count, 0
// where every row is padding.
template <typename T>
int64_t item_rows(const Args& a, int64_t item, Scratch& sc) {
  const int64_t kv = item % a.K, b = item / a.K % a.B;
  const int64_t qb = a.q_blocks - 1 - item / (a.K * a.B);  // the longest blocks first
  const int64_t s0 = qb * a.tq, s1 = std::min(a.S, s0 + a.tq), G = a.G, D = a.D;
  const int64_t L = a.N * a.Pg, M = (s1 - s0) * G, first = a.first[b];
  const int32_t* pos = a.positions + b * a.S;
  sc.rows.resize(M);
  Row* rows = sc.rows.data();
  const T* q = static_cast<const T*>(a.q);
  bool any = false;
  for (int64_t s = s0; s < s1; ++s) {
    const int64_t p = pos[s], hi = std::min<int64_t>(p, L - 1);
    const int64_t lo = a.window ? std::max<int64_t>(p - a.window + 1, 0) : 0;
    any |= p >= 0;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t off = (((b * a.S + s) * a.K + kv) * G + g) * D;
      Row& row = rows[(s - s0) * G + g];
      row.q = q + off, row.out = a.out + off;
      row.lo = p < 0 ? 1 : lo - first, row.hi = p < 0 ? 0 : hi - first;
      if (row.hi < row.lo) std::fill(row.out, row.out + D, 0.0f);
    }
  }
  return any ? M : 0;
}

// An item's M rows of panel ``panel`` on the AVX-512 tiles (or AMX's).
template <typename T>
XDS_PREFILL_AVX512 void attend_rows512(const Args& a, int64_t panel, int64_t M, Scratch& sc) {
  constexpr int pw = Words<T>::per_word;
  Row* rows = sc.rows.data();
  const int64_t D = a.D, lp = panel_width(a, panel / a.K), dw = D / pw;
  const uint32_t* keys = a.keys + a.offset[panel];
  const uint32_t* vals = a.vals + a.offset[panel];
  const int64_t padded = (M + kAmxGroup - 1) / kAmxGroup * kAmxGroup;  // whole AMX groups
  sc.scores.resize(padded * lp);
  sc.probs.resize(padded * lp / pw);
  if constexpr (sizeof(T) == 2) {
    if (D % 32 == 0 && g_amx.load(std::memory_order_relaxed)) {
      return attend_rows_amx(a, rows, M, keys, vals, lp, sc);
    }
  }
  for (int64_t r0 = 0; r0 < M; r0 += kRows) {
    const int64_t n = std::min<int64_t>(kRows, M - r0);
    int64_t lo, hi;
    visible_span(rows + r0, n, lp, lo, hi);
    if (hi < lo) continue;
    float* scores = sc.scores.data() + r0 * lp;
    uint32_t* probs = sc.probs.data() + r0 * lp / pw;
    with_rows<kRows>(n, [&](auto R) {
      for (int64_t t0 = lo / kTile * kTile; t0 <= hi; t0 += kTile) {
        score_tile<T, R()>(rows + r0, keys, lp, dw, t0, a.scale, scores);
      }
    });
    for (int64_t r = 0; r < n; ++r) {
      if (rows[r0 + r].hi >= rows[r0 + r].lo) {
        softmax_row<T>(scores + r * lp, rows[r0 + r], lp, a.cap, probs + r * lp / pw);
      }
    }
    // rows without a visible key multiply stale probabilities: their outputs are zeroed below
    const int64_t w0 = lo / pw, w1 = hi / pw + 1;
    with_rows<kRows>(n, [&](auto R) {
      int64_t d0 = 0;
      for (; d0 + 64 <= D; d0 += 64) {
        value_tile<T, R(), 4>(rows + r0, probs, vals, lp / pw, D, d0, w0, w1);
      }
      for (; d0 < D; d0 += 16) {
        value_tile<T, R(), 1>(rows + r0, probs, vals, lp / pw, D, d0, w0, w1);
      }
    });
    for (int64_t r = r0; r < r0 + n; ++r) {
      if (rows[r].hi < rows[r].lo) std::fill(rows[r].out, rows[r].out + D, 0.0f);
    }
  }
}

template <typename T>
void attend_item(const Args& a, int64_t item, Scratch& sc) {
  const int64_t M = item_rows<T>(a, item, sc);
  if (M == 0) return;
  const int64_t panel = item % (a.K * a.B);  // b K + kv
  if (a.wide) {
    attend_rows8(sc.rows.data(), M, a.bf16,
                 reinterpret_cast<const float*>(a.keys + a.offset[panel]),
                 reinterpret_cast<const float*>(a.vals + a.offset[panel]),
                 panel_width(a, panel / a.K), a.D, a.scale, a.cap, sc.wide);
  } else {
    attend_rows512<T>(a, panel, M, sc);
  }
}

// The panels, one chunk each, then the items, over XLA's intra-op pool (pool_chunks.h).
struct Pack : Chunks {
  std::shared_ptr<Args> a;

  void run(int64_t panel) override {
    if (a->bf16) {
      pack_panel<uint16_t>(*a, panel);
    } else {
      pack_panel<float>(*a, panel);
    }
  }
};

struct Work : Chunks {
  std::shared_ptr<Args> a;

  void run(int64_t item) override {
    thread_local Scratch scratch;
    if (a->bf16) {
      attend_item<uint16_t>(*a, item, scratch);
    } else {
      attend_item<float>(*a, item, scratch);
    }
  }
};

ffi::Error Attend(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer kp, ffi::AnyBuffer vp,
                  ffi::Buffer<ffi::S32> tables, ffi::Buffer<ffi::S32> positions, float scale,
                  float cap, float window, ffi::Result<ffi::Buffer<ffi::F32>> out) {
  const auto qd = q.dimensions(), kd = kp.dimensions(), td = tables.dimensions();
  const bool bf16 = q.element_type() == ffi::DataType::BF16;
  const bool dtypes_ok = bf16 ? kp.element_type() == ffi::DataType::U16
                              : q.element_type() == ffi::DataType::F32 &&
                                    kp.element_type() == ffi::DataType::F32;
  if (qd.size() != 5 || kd.size() != 4 || td.size() != 2 || !dtypes_ok ||
      vp.element_type() != kp.element_type() || vp.element_count() != kp.element_count() ||
      kd[2] != qd[2] || kd[3] != qd[4] || qd[4] % 16 != 0 || td[0] != qd[0] ||
      positions.element_count() != static_cast<size_t>(qd[0] * qd[1]) ||
      out->element_count() != q.element_count() || kd[0] < 1) {
    return ffi::Error::InvalidArgument(
        "xds_prefill_attention: q [B, S, K, G, D] (bfloat16 or float32, D a multiple of 16), "
        "pages [P, Pg, K, D] (uint16 bits or float32), int32 tables [B, N] and positions "
        "[B, S] expected");
  }
  const int isa = g_isa.load(std::memory_order_relaxed);
  if (isa == 0) return ffi::Error::InvalidArgument("xds_prefill_attention: needs AVX2 and FMA");
  auto args = std::make_shared<Args>();
  Args& a = *args;
  a.q = q.untyped_data();
  a.kp = kp.untyped_data();
  a.vp = vp.untyped_data();
  a.tables = tables.typed_data();
  a.positions = positions.typed_data();
  a.out = out->typed_data();
  a.B = qd[0], a.S = qd[1], a.K = qd[2], a.G = qd[3], a.D = qd[4];
  a.P = kd[0], a.Pg = kd[1], a.N = td[1];
  a.scale = scale, a.cap = cap, a.bf16 = bf16, a.wide = isa == 1 || (bf16 && !kBf16Dot);
  a.window = static_cast<int64_t>(window);
  if (a.B == 0 || a.S == 0) return ffi::Error::Success();
  const int64_t L = std::max<int64_t>(a.N * a.Pg, 1);
  a.first.assign(a.B, L), a.last.assign(a.B, -1), a.offset.assign(a.B * a.K + 1, 0);
  for (int64_t b = 0; b < a.B; ++b) {
    for (int64_t s = 0; s < a.S; ++s) {
      const int64_t p = a.positions[b * a.S + s];
      if (p < 0) continue;
      a.last[b] = std::max(a.last[b], std::min(p, L - 1));
      a.first[b] = std::min(a.first[b], a.window ? std::max<int64_t>(p - a.window + 1, 0) : 0);
    }
    for (int64_t kv = 0; kv < a.K; ++kv) {
      const int64_t words = panel_width(a, b) * a.D / a.per_word();
      a.offset[b * a.K + kv + 1] = a.offset[b * a.K + kv] + words;
    }
  }
  thread_local std::vector<uint32_t> keys, vals;  // kept between calls: no page faults
  keys.resize(a.offset.back()), vals.resize(a.offset.back());
  a.keys = keys.data(), a.vals = vals.data();
  // query tokens per item: scores and probabilities of its rows (over the widest panel: the
  // keys a sequence sees, not the table's width) within kScratch, at most 64, and enough
  // items for the pool
  int64_t widest = kTile;
  for (int64_t b = 0; b < a.B; ++b) widest = std::max(widest, panel_width(a, b));
  const int64_t row_bytes = widest * (sizeof(float) + 4 / a.per_word());
  int64_t tq = std::max<int64_t>(1, kScratch / (row_bytes * a.G));
  tq = std::min({tq, int64_t{64}, a.S});
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  while (tq > 8 && a.B * a.K * ((a.S + tq - 1) / tq) < 8 * threads) tq /= 2;
  a.tq = std::max<int64_t>(tq, 1);
  a.q_blocks = (a.S + a.tq - 1) / a.tq;
  auto pack = std::make_shared<Pack>();
  pack->a = args, pack->chunks = a.B * a.K;
  run_chunks(pool, pack);
  auto work = std::make_shared<Work>();
  work->a = args, work->chunks = a.q_blocks * a.B * a.K;
  run_chunks(pool, work);
  if (keys.size() > kKeepPanels) {  // a long prompt's panels are not held on to
    std::vector<uint32_t>().swap(keys), std::vector<uint32_t>().swap(vals);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(XdsPrefillAttention, Attend,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<float>("scale")
                                  .Attr<float>("cap")
                                  .Attr<float>("window")
                                  .Ret<ffi::Buffer<ffi::F32>>());

// Whether this CPU runs the kernel (AVX2 + FMA or AVX-512; bfloat16 and float32 alike).
extern "C" int xds_prefill_attention_ok() { return kIsa > 0 ? 1 : 0; }

// Run at most instruction set ``isa`` (2: AVX-512, 1: AVX2; never above the CPU's, never below
// 1 where the CPU has one); returns the one in use (tests and benchmarks check the AVX2 path).
extern "C" int xds_prefill_attention_use_isa(int isa) {
  g_isa.store(std::clamp(isa, std::min(kIsa, 1), kIsa));
  return g_isa.load();
}

// Whether bfloat16 prefill attention runs AMX tiles (1) or not (0: AVX-512 BF16 or AVX2 tiles);
// ``on`` 0 turns them off, 1 back on where the CPU has them (tests and benchmarks compare paths).
extern "C" int xds_prefill_attention_amx() { return g_amx.load() && g_isa.load() == 2 ? 1 : 0; }
extern "C" void xds_prefill_attention_use_amx(int on) { g_amx.store(on != 0 && kAmxBf16); }
