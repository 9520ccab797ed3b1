// xds-jax CPU kernels: y[M, N] (float32) = x[M, K] . w[N, K]^T for decode's rows (batch x tokens).
//
// At a few rows a matmul's time is the weight stream; at tens (batched decode, short prefills)
// it is the multiply-adds. XLA:CPU runs a one-row bfloat16 dot as a matrix-vector product that
// converts the weight to float32 on every call, 2-8-row dots at 10-15 GB/s and 16-256-row dots
// 15-25% under these kernels (docs/performance.md). These kernels read each output's weight row
// once from memory (output-major, the layout xds_jax.model.out_major stores on CPU), multiply it
// into every row of x in register tiles (few_row_blocks.h, shaped per path in
// few_row_paths.h; rows in groups, the block's weights from L1 after the first group, the
// rows in panels that stay in L2) and split the outputs over
// XLA's intra-op thread pool (the caller takes chunks too, so it never waits on a task that has
// not started).
//
// - XdsBf16Matmul: bfloat16 x and w, float32 accumulation: AVX-512 BF16's pair dot product,
//   or AVX-512 (without BF16) or AVX2 FMAs on the widened values; from kAmxMinRows rows, Intel
//   AMX tiles where the CPU and the OS allow them (amx_tiles.h).
// - XdsF32Matmul: float32 x and w, AVX-512 FMAs (XLA's float32 dots stream 2-8 rows at ~10
//   GB/s), or AVX2 FMAs on CPUs without AVX-512 (up to cpu_matmul.MAX_ROWS_F32_AVX2 rows; from
//   kGemmMinRows the packed GEMM, f32_gemm.h).
// - XdsInt8Matmul: weight-only int8 (xds_jax.model.quant): w int8 with float32 scales [N]; the
//   float32 or bfloat16 rows are split as cpu_matmul.split_rows splits them (int8_rows.h):
//   16-bit fixed point in int8 halves hi and lo with a float32 scale per row, x ~= (256 hi +
//   lo) * x_scale (attribute act_limit: the fixed point's largest value). Integer products
//   accumulate exactly: in int32 per half (AVX-512 VNNI's byte dot product), then
//   y = ((256 acc_hi + acc_lo) * x_scale) * w_scale, the same numbers as XLA's int32 dot; or
//   AVX2's 16-bit multiply-add of 256 hi + lo, summed in int64 (the same numbers for K <= 1024,
//   at most one rounding apart beyond: int8_block256).
//
// Built and registered by xds_jax/kernels/build.py; used through xds_jax/kernels/cpu_matmul.py.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "amx_tiles.h"
#include "f32_gemm.h"
#include "few_row_blocks.h"
#include "few_row_paths.h"
#include "int8_rows.h"
#include "pool_chunks.h"

namespace ffi = xla::ffi;

namespace {

using namespace xds_kernels;

constexpr int64_t kBlocks = 24;  // a multiple of every block width: chunks are multiples of it
constexpr int64_t kChunksPerThread = 16;  // few enough grabs that the counters stay cold
constexpr int64_t kPanel = 96;  // rows whose values stay in L2 (a multiple of every group)

// Output blocks of NB columns; the tail of a chunk runs with NB = 1.
template <int NB, typename Block>
inline void blocks(int64_t n0, int64_t n1, Block&& block) {
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) block(n, std::integral_constant<int, NB>{});
  for (; n < n1; ++n) block(n, std::integral_constant<int, 1>{});
}

// ---- dispatch -----------------------------------------------------------------------------------
// 3: AVX-512 with BF16 and VNNI, 2: AVX-512 F/BW/VL without BF16 (Skylake to Ice Lake
// servers), 1: AVX2 + FMA, 0: neither.
int detect_isa() {
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl")) {
    return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vnni") ? 3 : 2;
  }
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 1 : 0;
}

// The instruction set the kernels run (detect_isa's levels); lowered by xds_few_row_use_isa
// (tests).
std::atomic<int> g_isa{detect_isa()};
// AVX-512 VNNI's byte dot product (the int8 blocks' at level 2 and up; AVX2's otherwise), where
// the CPU has it; turned off by xds_few_row_use_vnni (tests: a Skylake-SP's int8 path).
const bool kVnni = __builtin_cpu_supports("avx512vnni");
std::atomic<bool> g_vnni{kVnni};
// bfloat16 and int8 matmuls of at least this many rows run AMX tiles (0: never;
// xds_few_row_use_amx), where the CPU has them (kAmx: 1 BF16, 2 INT8).
constexpr int64_t kAmxMinRows = 2;
constexpr int64_t kAmxMaxRows = 512;  // bounds the packed rows each calling thread keeps
const int kAmx = detect_isa() == 3 ? amx_usable() : 0;
std::atomic<int64_t> g_amx_rows{kAmx ? kAmxMinRows : 0};
// float32 matmuls of at least this many rows run the packed GEMM on AVX2 (f32_gemm.h; 0: never;
// xds_few_row_use_gemm).
constexpr int64_t kGemmMinRows = 48;
std::atomic<int64_t> g_gemm_rows{kGemmMinRows};
std::atomic<int64_t> g_gemm_calls{0};  // calls that took it (tests check the path ran)

// Outputs n0 .. n1 for every row: panels of kPanel rows, so that a panel's rows stay in L2 while
// the chunk's weights pass; in a panel, groups of G rows and the rest (fewer) with the same NB.
// Each block fetches the next one's weights; the last panel's last block those of output
// ``following`` (the first of this thread's next chunk; -1: none).
template <typename Path, int G>
void tiles(const Operands& o, int64_t n0, int64_t n1, int64_t following) {
  static_assert(G <= 6 && kPanel % G == 0 && kBlocks % Path::nb(G) == 0);
  constexpr int NB = Path::nb(G);
  // the k steps that call next.step(): the AVX-512 blocks' masked tail is one, AVX2's is not
  const int64_t steps = Path::kTailStep ? (o.K + Path::kStepK - 1) / Path::kStepK
                                        : o.K / Path::kStepK;
  const auto* weights = static_cast<const char*>(o.w);
  for (int64_t p0 = 0; p0 < o.M; p0 += kPanel) {
    const int64_t p1 = std::min(o.M, p0 + kPanel), full = p0 + (p1 - p0) / G * G;
    const int64_t groups = (p1 - p0 + G - 1) / G;
    blocks<NB>(n0, n1, [&](int64_t n, auto nb) {
      const bool next_here = n + 2 * nb() <= n1;  // the next block is this chunk's
      const int64_t ahead = next_here ? n + nb() : p1 == o.M ? following : -1;
      const int64_t row_bytes = o.K * Path::kWeightBytes;
      const int64_t rows = ahead < 0 ? 0 : std::min<int64_t>(nb(), o.N - ahead);  // in w
      NextBlock next(weights + std::max<int64_t>(ahead, 0) * row_bytes, rows * row_bytes, steps,
                     groups, rows > 0);
      for (int64_t r = p0; r < full; r += G) Path::template run<G, nb()>(o, n, r, next);
      if (full < p1) {
        with_rows<6>(p1 - full, [&](auto rest) {
          if constexpr (rest() < G) Path::template run<rest(), nb()>(o, n, full, next);
        });
      }
    });
  }
}

template <typename Path>
void columns(const Operands& o, int64_t n0, int64_t n1, int64_t following) {
  if constexpr (Path::kWide != Path::kGroup) {
    if (o.M >= Path::kWideFrom) return tiles<Path, Path::kWide>(o, n0, n1, following);
  }
  if (o.M > Path::kGroup) return tiles<Path, Path::kGroup>(o, n0, n1, following);
  with_rows<6>(o.M, [&](auto m) {
    if constexpr (m() <= Path::kGroup) tiles<Path, m()>(o, n0, n1, following);
  });
}

// ``f``: the first output of the thread's next chunk, as tiles() takes it (-1: none).
void columns(const Operands& o, int64_t n0, int64_t n1, int64_t f = -1) {
  if (o.xf != nullptr) {
    if (g_isa.load(std::memory_order_relaxed) >= 2) return columns<F32Avx512>(o, n0, n1, f);
    return columns<F32Avx2>(o, n0, n1, f);
  }
  // the int8 and bfloat16 paths were chosen once, for the call, as its rows were prepared
  if (o.xh8 != nullptr) return columns<Int8Avx512>(o, n0, n1, f);
  if (o.xq != nullptr) return columns<Int8Avx2>(o, n0, n1, f);
  if (o.xe_step == 32) return columns<Bf16Avx512Widen>(o, n0, n1, f);
  if (o.xe_step == 16) return columns<Bf16Avx2>(o, n0, n1, f);
  columns<Bf16Avx512>(o, n0, n1, f);
}

// One call's outputs, handed out in chunks to the caller and the pool's tasks. Shared so that
// a task the pool starts after the call returned finds nothing left and exits.
struct Work : Chunks {
  Operands o;
  std::vector<int16_t> xq;
  std::vector<float> xe;  // bfloat16 rows widened for the AVX2 or AVX-512 F blocks
  std::vector<int32_t> xsum;
  std::unique_ptr<int8_t[]> halves;  // int8: the rows' hi [M, K] then lo [M, K] (not zeroed)
  std::vector<float> x_scale;  // int8: the rows' scales [M]
  const uint32_t* xp = nullptr;  // x packed for AMX tiles (amx_pack); null: no AMX
  int64_t lo_at = 0;  // int8: where the lo half's tiles start in xp
  bool gemm = false;  // float32 on AVX2's packed GEMM (f32_gemm.h)
  int64_t chunk = 0;

  // Weight rows per AMX block (chunks are multiples of it).
  int64_t amx_unit() const { return o.xh8 != nullptr ? 32 : amx_width(o.M); }

  void run(int64_t c) override { run_before(c, chunks); }
  void run_before(int64_t c, int64_t following) override {
    const int64_t n0 = c * chunk, n1 = std::min(o.N, n0 + chunk);
    if (gemm) {  // whole panels of 16 outputs; a last N % 16 on the blocks
      thread_local std::vector<float> packed;
      const int64_t whole = std::min(n1, o.N / kGemmCols * kGemmCols);
      if (whole > n0) gemm_columns(o, n0, whole, packed);
      if (whole < n1) columns(o, std::max(n0, whole), n1);
      return;
    }
    if (xp == nullptr) return columns(o, n0, n1, following < chunks ? following * chunk : -1);
    const int64_t width = amx_unit(), mid = n0 + (n1 - n0) / width * width;
    if (mid > n0 && o.xh8 != nullptr) {
      amx_int8_columns(static_cast<const int8_t*>(o.w), xp, lo_at, o.x_scale,
                       o.w_scale, o.y, o.M, o.N, o.K, n0, mid);
    } else if (mid > n0) {
      amx_columns(static_cast<const uint16_t*>(o.w), xp, o.y, o.M, o.N, o.K, n0, mid);
    }
    if (mid < n1) columns(o, mid, n1);  // the outputs past the last whole AMX block
  }
};

// Whether a matmul of M rows by K runs AMX tiles of ``kind`` (1 BF16, 2 INT8), K a multiple
// of ``k_step``.
bool takes_amx(int kind, int64_t M, int64_t K, int64_t k_step) {
  const int64_t rows = g_amx_rows.load(std::memory_order_relaxed);
  return (kAmx & kind) && rows > 0 && M >= rows && M <= kAmxMaxRows && K % k_step == 0 &&
         g_isa.load(std::memory_order_relaxed) == 3;
}

ffi::Error Run(ffi::ThreadPool& pool, std::shared_ptr<Work> work) {
  if (g_isa.load(std::memory_order_relaxed) <= 0) {
    return ffi::Error::Internal("xds few-row matmul: this CPU has neither AVX-512 nor AVX2");
  }
  if (work->o.N == 0) return ffi::Error::Success();  // no outputs (and no chunk to size)
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  if (work->gemm) {  // 64 outputs a chunk, fewer where that leaves under 8 a thread
    work->chunk = 64;
    while (work->chunk > kGemmCols && work->o.N < work->chunk * 8 * threads) work->chunk /= 2;
  } else {
    const int64_t pieces = threads * kChunksPerThread;
    const int64_t per_chunk = (work->o.N + pieces - 1) / pieces;
    const int64_t unit = work->xp == nullptr ? kBlocks : work->amx_unit();
    work->chunk = (per_chunk + unit - 1) / unit * unit;
  }
  work->chunks = (work->o.N + work->chunk - 1) / work->chunk;
  work->grab_ahead = work->xp == nullptr && !work->gemm;  // AMX, GEMM: no weights fetched ahead
  run_chunks(pool, work);
  return ffi::Error::Success();
}

bool rows_ok(ffi::AnyBuffer& x, ffi::AnyBuffer& w, ffi::AnyBuffer& y) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y.dimensions();
  return xd.size() == 2 && wd.size() == 2 && yd.size() == 2 && xd[1] == wd[1] && xd[0] >= 1 &&
         yd[0] == xd[0] && yd[1] == wd[0] &&
         y.element_type() == ffi::DataType::F32;
}

// x [M, K] @ w [N, K]^T with x and w both bfloat16 (``x``) or both float32 (``xf``).
ffi::Error FloatMatmul(ffi::ThreadPool& pool, ffi::AnyBuffer& x, ffi::AnyBuffer& w,
                       ffi::AnyBuffer& y, ffi::DataType dtype, const char* expected) {
  if (!rows_ok(x, w, y) || x.element_type() != dtype || w.element_type() != dtype) {
    return ffi::Error::InvalidArgument(expected);
  }
  auto work = std::make_shared<Work>();
  if (dtype == ffi::DataType::F32) {
    work->o.xf = reinterpret_cast<const float*>(x.untyped_data());
  } else {
    work->o.x = reinterpret_cast<const uint16_t*>(x.untyped_data());
  }
  work->o.w = w.untyped_data();
  work->o.y = reinterpret_cast<float*>(y.untyped_data());
  const int64_t M = work->o.M = x.dimensions()[0];
  work->o.N = w.dimensions()[0];
  const int64_t K = work->o.K = w.dimensions()[1];
  const int isa = g_isa.load(std::memory_order_relaxed);
  if (dtype == ffi::DataType::BF16 && isa < 3) {  // no BF16 pair dot product
    const int step = isa == 2 ? 32 : 16;
    work->xe.resize(std::max<int64_t>(1, M * (K / step * step)));
    if (isa == 2) {
      widen_rows512(work->o.x, M, K, work->xe.data());
    } else {
      widen_rows(work->o.x, M, K, work->xe.data());
    }
    work->o.xe = work->xe.data();
    work->o.xe_step = step;
  }
  const int64_t gemm_rows = g_gemm_rows.load(std::memory_order_relaxed);
  work->gemm = dtype == ffi::DataType::F32 && isa == 1 && gemm_rows > 0 && M >= gemm_rows &&
               work->o.N >= kGemmCols;
  if (work->gemm) g_gemm_calls.fetch_add(1, std::memory_order_relaxed);
  if (dtype == ffi::DataType::BF16 && takes_amx(1, M, K, 32)) {
    uint32_t* xp = amx_buffer(amx_rows(M) * K / 2);
    amx_pack(work->o.x, M, K / 2, amx_rows(M), xp);
    work->xp = xp;
  }
  return Run(pool, std::move(work));
}

ffi::Error Bf16Matmul(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w,
                      ffi::Result<ffi::AnyBuffer> y) {
  return FloatMatmul(pool, x, w, *y, ffi::DataType::BF16,
                     "xds_bf16_matmul: bfloat16 x [M, K] and w [N, K] to a float32 [M, N] "
                     "expected");
}

ffi::Error F32Matmul(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w,
                     ffi::Result<ffi::AnyBuffer> y) {
  return FloatMatmul(pool, x, w, *y, ffi::DataType::F32,
                     "xds_f32_matmul: float32 x [M, K] and w [N, K] to a float32 [M, N] "
                     "expected");
}

// The rows of x [M, K] split (int8_rows.h): hi [M, K], then lo [M, K] at hi + M K, scales [M].
void split_rows(const void* x, bool bf16, int64_t M, int64_t K, float limit, int8_t* hi,
                float* scale) {
  const bool avx512 = g_isa.load(std::memory_order_relaxed) >= 2;
  std::vector<float> row(avx512 ? 0 : K);
  const char* bytes = static_cast<const char*>(x);
  const int64_t stride = K * (bf16 ? 2 : 4);
  for (int64_t m = 0; m < M; ++m) {
    int8_t* h = hi + m * K;
    int8_t* l = hi + (M + m) * K;
    scale[m] = avx512 ? split_row_avx512(bytes + m * stride, bf16, K, limit, h, l)
                      : split_row(bytes + m * stride, bf16, K, limit, row.data(), h, l);
  }
}

ffi::Error Int8Matmul(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w,
                      ffi::AnyBuffer w_scale, ffi::Result<ffi::AnyBuffer> y, float act_limit) {
  const bool bf16 = x.element_type() == ffi::DataType::BF16;
  if (!rows_ok(x, w, *y) || !(bf16 || x.element_type() == ffi::DataType::F32) ||
      w.element_type() != ffi::DataType::S8 || w_scale.element_type() != ffi::DataType::F32 ||
      w_scale.element_count() != static_cast<size_t>(w.dimensions()[0]) ||
      !(act_limit > 0.0f && act_limit <= 127 * 256 + 127)) {
    return ffi::Error::InvalidArgument(
        "xds_int8_matmul: float32 or bfloat16 x [M, K], int8 w [N, K] and float32 w_scale [N] "
        "to a float32 [M, N], act_limit in (0, 32639] expected");
  }
  auto work = std::make_shared<Work>();
  const int64_t M = x.dimensions()[0], K = w.dimensions()[1];
  work->halves.reset(new int8_t[2 * M * K]);  // every byte written by split_rows
  work->x_scale.resize(M);
  int8_t* h = work->halves.get();
  int8_t* l = h + M * K;
  split_rows(x.untyped_data(), bf16, M, K, act_limit, h, work->x_scale.data());
  if (g_isa.load(std::memory_order_relaxed) >= 2 && g_vnni.load(std::memory_order_relaxed)) {
    work->xsum.resize(2 * M);
    for (int64_t m = 0; m < 2 * M; ++m) {
      const int8_t* row = h + m * K;  // lo's rows follow hi's
      int32_t sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t k = 0; k < K; ++k) sum += row[k];
      work->xsum[m] = sum;
    }
    work->o.xh8 = h, work->o.xl8 = l, work->o.xsum = work->xsum.data();
    if (takes_amx(2, M, K, 64)) {
      const int64_t mp = (M + 15) / 16 * 16;
      work->lo_at = mp * K / 4;
      uint32_t* xp = amx_buffer(2 * work->lo_at);
      amx_pack(h, M, K / 4, mp, xp);
      amx_pack(l, M, K / 4, mp, xp + work->lo_at);
      work->xp = xp;
    }
  } else {
    work->xq.resize(std::max<int64_t>(1, M * K));  // never null: it picks the path
    for (int64_t i = 0; i < M * K; ++i) {  // q = 256 hi + lo, as int8_block256 takes it
      work->xq[i] = static_cast<int16_t>(h[i] * 256 + l[i]);
    }
    work->o.xq = work->xq.data();
  }
  work->o.x_scale = work->x_scale.data();
  work->o.w = w.untyped_data();
  work->o.w_scale = reinterpret_cast<const float*>(w_scale.untyped_data());
  work->o.y = reinterpret_cast<float*>(y->untyped_data());
  work->o.M = M;
  work->o.N = w.dimensions()[0];
  work->o.K = K;
  return Run(pool, std::move(work));
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(XdsBf16Matmul, Bf16Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(XdsF32Matmul, F32Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(XdsInt8Matmul, Int8Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<float>("act_limit"));

// The instruction set the kernels run: 3 AVX-512 with BF16 and VNNI, 2 AVX-512 F/BW/VL, 1 AVX2
// + FMA, 0 none (not used).
extern "C" int xds_few_row_isa() { return g_isa.load(); }

// The fewest rows a bfloat16 or int8 matmul runs AMX tiles at (0: AMX unavailable or off).
extern "C" int64_t xds_few_row_amx() { return g_amx_rows.load(); }

// Run AMX from ``rows`` rows (0: never; ignored where AMX is unavailable); returns the rows now.
extern "C" int64_t xds_few_row_use_amx(int64_t rows) {
  g_amx_rows.store(kAmx ? std::max<int64_t>(0, rows) : 0);
  return g_amx_rows.load();
}

// int8 on VNNI's blocks at level 2 and up (``on``, where the CPU has VNNI) or AVX2's; returns
// whether it now is.
extern "C" int xds_few_row_use_vnni(int on) {
  g_vnni.store(on != 0 && kVnni);
  return g_vnni.load() ? 1 : 0;
}

// float32 matmuls of ``rows`` rows or more on AVX2's packed GEMM (0: never; negative: unchanged);
// returns the rows now.
extern "C" int64_t xds_few_row_use_gemm(int64_t rows) {
  if (rows >= 0) g_gemm_rows.store(rows);
  return g_gemm_rows.load();
}

// The float32 calls that took the packed GEMM so far.
extern "C" int64_t xds_few_row_gemm_calls() { return g_gemm_calls.load(); }

// Run at most ``isa`` (never above what the CPU has); returns the one now in use.
extern "C" int xds_few_row_use_isa(int isa) {
  g_isa.store(std::clamp(isa, 0, detect_isa()));
  return g_isa.load();
}
