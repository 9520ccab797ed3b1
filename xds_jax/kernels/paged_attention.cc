// xds-jax CPU kernel: one decode token's grouped-query attention over a paged KV cache.
//
// out[b, k, g, :] = softmax_l(mask[b, l] ? cap(scale * q[b, k, g, :] . K[l, k, :]) : -inf) . V
// where key l of sequence b lives at page tables[b, l / Pg], offset l % Pg. XLA:CPU runs this
// as a page gather, small batched dots (every query head against all heads' keys, the layout
// attention._decode_attention explains) and a softmax: 18 of a batch-32 SmolLM2 step's 63 ms
// with ~80-token contexts (docs/performance.md). Here each (sequence, kv head) reads its own
// keys and values once, straight from the pages, with the arithmetic of the XLA path: scores
// accumulated in float32, a float32 softmax, the probabilities rounded to the values' dtype
// (bfloat16 pages) before the value product, accumulated in float32. A row without a visible
// key (padding) gets zeros. Pages hold bfloat16 as its uint16 bits, or float32.
//
// Built and registered by xds_jax/kernels/build.py; used through xds_jax/kernels/cpu_attention.py.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "kernel_math.h"
#include "paged_blocks.h"
#include "paged_avx2.h"
#include "pool_chunks.h"

namespace ffi = xla::ffi;

namespace {

using namespace xds_kernels;

using Args = PagedArgs;

// One sequence b, all its heads: each visible key's row (every kv head's D values, contiguous
// in the page) is read once for the scores and once for the values, so a page streams. The
// scratch holds H x L scores (H = K G query heads), the visible keys' rows, the queries and a
// key or value row in float32. Inlined into one wrapper per instruction set.
template <typename T, typename Dot>
[[gnu::always_inline]] inline void attend_body(const Args& a, int64_t b, float* s,
                                               int64_t* keys, float* qf, float* kf, float* mx) {
  const int64_t K = a.K, G = a.G, D = a.D, H = K * G, L = a.N * a.Pg, E = K * D;
  const T* q = static_cast<const T*>(a.q) + b * H * D;
  const T* kp = static_cast<const T*>(a.kp);
  const T* vp = static_cast<const T*>(a.vp);
  float* out = a.out + b * H * D;
  for (int64_t i = 0; i < H * D; ++i) qf[i] = value(q[i]);
  std::fill(mx, mx + H, -std::numeric_limits<float>::infinity());
  int64_t seen = 0;  // visible keys: their scores s[h * L + i] and rows keys[i]
  if (!Dot::template scores<T>(a, b, qf, s, keys, mx, seen)) {  // the plain loops
    for (int64_t n = 0; n < a.N; ++n) {
      const int64_t page = std::clamp<int64_t>(a.tables[b * a.N + n], 0, a.P - 1);
      // as page_scores: the next page's keys and this page's values on their way meanwhile
      if (page_visible(a.mask + b * L, n + 1, a.N, a.Pg)) {
        const int64_t next = std::clamp<int64_t>(a.tables[b * a.N + n + 1], 0, a.P - 1);
        prefetch_row(kp + next * a.Pg * E, a.Pg * E);
      }
      if (page_visible(a.mask + b * L, n, a.N, a.Pg)) {
        prefetch_row<T, _MM_HINT_T1>(vp + page * a.Pg * E, a.Pg * E);
      }
      for (int64_t t = 0; t < a.Pg; ++t) {
        if (!a.mask[b * L + n * a.Pg + t]) continue;
        const int64_t row = page * a.Pg + t;
        const T* kr = kp + row * E;
#pragma omp simd
        for (int64_t e = 0; e < E; ++e) kf[e] = value(kr[e]);
        for (int64_t h = 0; h < H; ++h) {  // query head h = k G + g reads kv head k
          const float* qh = qf + h * D;
          const float* kk = kf + (h / G) * D;
          const float sc = scaled_score(Dot::dot(qh, kk, D), a);
          s[h * L + seen] = sc;
          mx[h] = std::max(mx[h], sc);
        }
        keys[seen++] = row;
      }
    }
  }
  std::fill(out, out + H * D, 0.0f);
  if (seen == 0) return;
  for (int64_t h = 0; h < H; ++h) {  // softmax, then the probabilities in the values' dtype
    float* sh = s + h * L;
    const float top = mx[h];
    if (Dot::softmax(sh, seen, top, a.bf16)) continue;
#pragma omp simd
    for (int64_t i = 0; i < seen; ++i) sh[i] = exp_nonpositive(sh[i] - top);
    float sum = 0.0f;
    for (int64_t i = 0; i < seen; ++i) sum += sh[i];
    if (a.bf16) {
#pragma omp simd
      for (int64_t i = 0; i < seen; ++i) sh[i] = round_bf16(sh[i] / sum);
    } else {
#pragma omp simd
      for (int64_t i = 0; i < seen; ++i) sh[i] /= sum;
    }
  }
  if (Dot::template values<T>(s, L, keys, seen, vp, a.K, G, D, out)) return;
  for (int64_t i = 0; i < seen; ++i) {
    const T* vr = vp + keys[i] * E;
#pragma omp simd
    for (int64_t e = 0; e < E; ++e) kf[e] = value(vr[e]);
    for (int64_t h = 0; h < H; ++h) {
      const float p = s[h * L + i];
      const float* vk = kf + (h / G) * D;
      float* oh = out + h * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) oh[d] += p * vk[d];
    }
  }
}

// Per instruction set: the scores, softmax and value product (AVX-512: paged_blocks.h's
// register tiles; AVX2: paged_avx2.h's, the softmax in the plain loop), or q . k over D
// float32s in vectors of 8 (AVX2, D not a multiple of 8) with one horizontal sum, or a plain
// loop (the compiler had left the loop's reduction scalar, 3/4 of the kernel's time).
#define XDS_AVX512 XDS_PAGED512
#define XDS_AVX2 __attribute__((target("avx2,fma")))

struct Dot512 {
  // Phase one in registers where the heads per kv head (G <= 8) and D (a multiple of 16)
  // allow: true if done.
  template <typename T>
  XDS_AVX512 static bool scores(const Args& a, int64_t b, const float* qf, float* s,
                                int64_t* keys, float* mx, int64_t& seen) {
    return a.D % 16 == 0 && with_heads(a.G, [&](auto g) {
      page_scores<T, g()>(a, b, qf, s, keys, mx, seen);
    });
  }

  // A row's probabilities from its n scores and their maximum, in place (bf16: rounded to
  // nearest even, as XLA's convert), 16 lanes at a time; times the sum's reciprocal (within an
  // ulp of dividing, and a vector division's throughput is ~16x a multiply's).
  XDS_AVX512 static bool softmax(float* x, int64_t n, float top, bool bf16) {
    const __m512 inv = _mm512_set1_ps(1.0f / exp_sum(x, n, top));
    const __m512i half = _mm512_set1_epi32(0x7fff), one = _mm512_set1_epi32(1);
    const __m512i top16 = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
    for (int64_t i = 0; i < n; i += 16) {
      __m512 p = _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes16(n, i), x + i), inv);
      if (bf16) {
        __m512i u = _mm512_castps_si512(p);
        const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), one);
        u = _mm512_add_epi32(u, _mm512_add_epi32(half, odd));
        p = _mm512_castsi512_ps(_mm512_and_si512(u, top16));
      }
      _mm512_mask_storeu_ps(x + i, lanes16(n, i), p);
    }
    return true;
  }

  // The value product in registers where the heads per kv head (G <= 8) and D (a multiple of
  // 16) allow: true if done.
  template <typename T>
  XDS_AVX512 static bool values(const float* s, int64_t L, const int64_t* keys, int64_t seen,
                                const T* vp, int64_t K, int64_t G, int64_t D, float* out) {
    return D % 16 == 0 && with_heads(G, [&](auto g) {
      value_heads<T, g()>(s, L, keys, seen, vp, K, D, out);
    });
  }

  XDS_AVX512 static inline float dot(const float* a, const float* b, int64_t D) {
    __m512 acc = _mm512_setzero_ps();
    int64_t d = 0;
    for (; d + 16 <= D; d += 16) {
      acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + d), _mm512_loadu_ps(b + d), acc);
    }
    if (d < D) {
      const __mmask16 m = lanes16(D, d);
      acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + d), _mm512_maskz_loadu_ps(m, b + d), acc);
    }
    return _mm512_reduce_add_ps(acc);
  }
};

struct NoValues {  // the scores, the softmax and the value product in plain loops
  template <typename T>
  static bool scores(const Args&, int64_t, const float*, float*, int64_t*, float*, int64_t&) {
    return false;
  }
  static bool softmax(float*, int64_t, float, bool) { return false; }
  template <typename T>
  static bool values(const float*, int64_t, const int64_t*, int64_t, const T*, int64_t, int64_t,
                     int64_t, float*) {
    return false;
  }
};

struct Dot256 : NoValues {  // the scores and values in registers (paged_avx2.h), D % 8 == 0
  template <typename T>
  XDS_AVX2 static bool scores(const Args& a, int64_t b, const float* qf, float* s,
                              int64_t* keys, float* mx, int64_t& seen) {
    return a.D % 8 == 0 && with_heads(a.G, [&](auto g) {
      page_scores8<T, g()>(a, b, qf, s, keys, mx, seen);
    });
  }

  template <typename T>
  XDS_AVX2 static bool values(const float* s, int64_t L, const int64_t* keys, int64_t seen,
                              const T* vp, int64_t K, int64_t G, int64_t D, float* out) {
    return D % 8 == 0 && with_heads(G, [&](auto g) {
      value_heads8<T, g()>(s, L, keys, seen, vp, K, D, out);
    });
  }

  XDS_AVX2 static inline float dot(const float* a, const float* b, int64_t D) {
    __m256 acc = _mm256_setzero_ps();
    int64_t d = 0;
    for (; d + 8 <= D; d += 8) {
      acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), acc);
    }
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    float sum = _mm_cvtss_f32(h);
    for (; d < D; ++d) sum += a[d] * b[d];
    return sum;
  }
};

struct DotPlain : NoValues {
  static inline float dot(const float* a, const float* b, int64_t D) {
    float sum = 0.0f;
    for (int64_t d = 0; d < D; ++d) sum += a[d] * b[d];
    return sum;
  }
};

template <typename T>
__attribute__((target("avx512f,avx512bw,avx512vl,fma"), flatten)) void attend512(
    const Args& a, int64_t b, float* s, int64_t* keys, float* qf, float* kf, float* mx) {
  attend_body<T, Dot512>(a, b, s, keys, qf, kf, mx);
}

template <typename T>
__attribute__((target("avx2,fma"), flatten)) void attend256(const Args& a, int64_t b, float* s,
                                                    int64_t* keys, float* qf, float* kf,
                                                    float* mx) {
  attend_body<T, Dot256>(a, b, s, keys, qf, kf, mx);
}

template <typename T>
void attend_default(const Args& a, int64_t b, float* s, int64_t* keys, float* qf, float* kf,
                    float* mx) {
  attend_body<T, DotPlain>(a, b, s, keys, qf, kf, mx);
}

int detect_isa() {
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl")) {
    return 2;
  }
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 1 : 0;
}
const int g_detected_isa = detect_isa();
int g_isa = g_detected_isa;  // lowered by xds_paged_attention_use_isa (tests, benchmarks)

template <typename T>
void attend_items(const Args& a, int64_t b0, int64_t b1) {
  const int64_t H = a.K * a.G, L = std::max<int64_t>(a.N * a.Pg, 1);
  std::vector<float> s(H * L), qf(H * a.D), kf(a.K * a.D), mx(H);
  std::vector<int64_t> keys(L);
  for (int64_t b = b0; b < b1; ++b) {
    if (b + 1 < a.B) {  // the next sequence's first keys to L2 while this one runs
      const int64_t L1 = a.N * a.Pg;
      for (int64_t n = 0; n < std::min<int64_t>(2, a.N); ++n) {
        if (page_visible(a.mask + (b + 1) * L1, n, a.N, a.Pg)) {
          const int64_t page = std::clamp<int64_t>(a.tables[(b + 1) * a.N + n], 0, a.P - 1);
          prefetch_row<T, _MM_HINT_T1>(static_cast<const T*>(a.kp) + page * a.Pg * a.K * a.D,
                                       a.Pg * a.K * a.D);
        }
      }
    }
    if (g_isa == 2) {
      attend512<T>(a, b, s.data(), keys.data(), qf.data(), kf.data(), mx.data());
    } else if (g_isa == 1) {
      attend256<T>(a, b, s.data(), keys.data(), qf.data(), kf.data(), mx.data());
    } else {
      attend_default<T>(a, b, s.data(), keys.data(), qf.data(), kf.data(), mx.data());
    }
  }
}

// Sequences in chunks over XLA's intra-op pool (pool_chunks.h).
struct Work : xds_kernels::Chunks {
  Args a;
  int64_t chunk = 1;

  void run(int64_t c) override {
    const int64_t b0 = c * chunk, b1 = std::min(a.B, b0 + chunk);
    if (a.bf16) {
      attend_items<uint16_t>(a, b0, b1);
    } else {
      attend_items<float>(a, b0, b1);
    }
  }
};

ffi::Error Attend(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer kp, ffi::AnyBuffer vp,
                  ffi::Buffer<ffi::S32> tables, ffi::Buffer<ffi::PRED> mask, float scale,
                  float cap, ffi::Result<ffi::Buffer<ffi::F32>> out) {
  const auto qd = q.dimensions(), kd = kp.dimensions(), td = tables.dimensions();
  const bool bf16 = q.element_type() == ffi::DataType::BF16;
  const bool dtypes_ok = bf16 ? kp.element_type() == ffi::DataType::U16
                              : q.element_type() == ffi::DataType::F32 &&
                                    kp.element_type() == ffi::DataType::F32;
  if (qd.size() != 4 || kd.size() != 4 || td.size() != 2 || !dtypes_ok ||
      vp.element_type() != kp.element_type() || vp.element_count() != kp.element_count() ||
      kd[2] != qd[1] || kd[3] != qd[3] || td[0] != qd[0] ||
      mask.element_count() != static_cast<size_t>(td[0] * td[1] * kd[1]) ||
      out->element_count() != q.element_count()) {
    return ffi::Error::InvalidArgument(
        "xds_paged_attention: q [B, K, G, D] (bfloat16 or float32), pages [P, Pg, K, D] "
        "(uint16 bits or float32), int32 tables [B, N], bool mask [B, N * Pg] expected");
  }
  auto work = std::make_shared<Work>();
  Args& a = work->a;
  a.q = q.untyped_data();
  a.kp = kp.untyped_data();
  a.vp = vp.untyped_data();
  a.tables = tables.typed_data();
  a.mask = mask.typed_data();
  a.out = out->typed_data();
  a.B = qd[0], a.K = qd[1], a.G = qd[2], a.D = qd[3];
  a.P = kd[0], a.Pg = kd[1], a.N = td[1];
  a.scale = scale, a.cap = cap, a.bf16 = bf16;
  if (a.B == 0) return ffi::Error::Success();
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  work->chunk = std::max<int64_t>(1, a.B / (threads * 2));
  work->chunks = (a.B + work->chunk - 1) / work->chunk;
  xds_kernels::run_chunks(pool, work);
  return ffi::Error::Success();
}

}  // namespace

// Run at most instruction set ``isa`` (2: AVX-512, 1: AVX2, 0: plain loops; never above the
// CPU's): the paths this CPU would not take can be checked on it. Returns the one now used.
extern "C" int xds_paged_attention_use_isa(int isa) {
  g_isa = std::clamp(isa, 0, g_detected_isa);
  return g_isa;
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(XdsPagedAttention, Attend,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Attr<float>("scale")
                                  .Attr<float>("cap")
                                  .Ret<ffi::Buffer<ffi::F32>>());
