// The register-tile shapes of xds-jax's CPU matmul kernel, one "path" per instruction set and
// dtype (few_row_matmul.cc's tiles() and columns() run them): how many rows a block takes
// (kGroup, kWide), how many outputs (nb), a k step and a weight's bytes (for the prefetch),
// and the block (few_row_blocks.h) that runs them.
#pragma once

#include <cstdint>

#include "few_row_blocks.h"

namespace xds_kernels {

// Block widths keep the accumulators, the rows' values and a weight in registers: 32 zmm
// (AVX-512) or 16 ymm (AVX2); each divides few_row_matmul.cc's kBlocks (24). Up to kGroup
// rows run as one block; more rows run in groups of kGroup (kWide from kWideFrom rows; and
// one of the rest) per block of outputs, the block's weights read from memory once and from
// L1 for the other groups. The shapes are measured (docs/performance.md): on an AMD EPYC
// (Zen 4) float32 32-row matmuls run 1.3x faster in 4 x 6 tiles than in 3 x 8, bfloat16 ones
// from 10 rows 1.1-1.3x in 6 x 4, int8 batch-32 decode 1.1-1.2x with 6 outputs a block
// instead of 4.
// The int8 and bfloat16 paths were chosen when the call's rows were prepared (xh8 or xq; xe and
// its step).
struct Bf16Avx512 {  // M x NB accumulators, M rows held
  static constexpr int kGroup = 3, kWide = 6, kWideFrom = 10;
  static constexpr int kStepK = 32, kWeightBytes = 2;  // k per step, bytes a weight
  static constexpr bool kTailStep = true;  // whether the k % kStepK tail calls next.step()
  static constexpr int nb(int M) { return M <= 1 ? 12 : M <= 3 ? 8 : 4; }
  template <int M, int NB>
  static void run(const Operands& o, int64_t n, int64_t r0, NextBlock& pf) {
    bf16_block512<M, NB>(o, n, r0, pf);
  }
};
struct Bf16Avx512Widen {  // M x NB accumulators, the rows read from L1 (AVX-512 without BF16)
  static constexpr int kGroup = 4, kWide = 4, kWideFrom = 0;
  static constexpr int kStepK = 32, kWeightBytes = 2;  // k per step, bytes a weight
  static constexpr bool kTailStep = false;  // whether the k % kStepK tail calls next.step()
  static constexpr int nb(int M) { return M <= 1 ? 12 : M <= 3 ? 8 : 6; }
  template <int M, int NB>
  static void run(const Operands& o, int64_t n, int64_t r0, NextBlock& pf) {
    bf16_widen_block512<M, NB>(o, n, r0, pf);
  }
};
struct F32Avx512 {  // M x NB accumulators, M rows held
  static constexpr int kGroup = 4, kWide = 4, kWideFrom = 0;
  static constexpr int kStepK = 16, kWeightBytes = 4;  // k per step, bytes a weight
  static constexpr bool kTailStep = true;  // whether the k % kStepK tail calls next.step()
  static constexpr int nb(int M) { return M <= 1 ? 12 : M <= 3 ? 8 : 6; }
  template <int M, int NB>
  static void run(const Operands& o, int64_t n, int64_t r0, NextBlock& pf) {
    f32_block512<M, NB>(o, n, r0, pf);
  }
};
struct Int8Avx512 {  // 2M x NB accumulators, 2M rows
  static constexpr int kGroup = 2, kWide = 2, kWideFrom = 0;
  static constexpr int kStepK = 64, kWeightBytes = 1;  // k per step, bytes a weight
  static constexpr bool kTailStep = true;  // whether the k % kStepK tail calls next.step()
  static constexpr int nb(int M) { return M <= 1 ? 12 : 6; }
  template <int M, int NB>
  static void run(const Operands& o, int64_t n, int64_t r0, NextBlock& pf) {
    int8_block512<M, NB>(o, n, r0, pf);
  }
};
struct Bf16Avx2 {  // M x NB accumulators, the rows read from L1
  static constexpr int kGroup = 4, kWide = 4, kWideFrom = 0;
  static constexpr int kStepK = 16, kWeightBytes = 2;  // k per step, bytes a weight
  static constexpr bool kTailStep = false;  // whether the k % kStepK tail calls next.step()
  static constexpr int nb(int M) { return M <= 1 ? 8 : M <= 3 ? 4 : 3; }  // no spills
  template <int M, int NB>
  static void run(const Operands& o, int64_t n, int64_t r0, NextBlock& pf) {
    bf16_block256<M, NB>(o, n, r0, pf);
  }
};
struct F32Avx2 {  // M x NB accumulators, M rows held
  static constexpr int kGroup = 3, kWide = 3, kWideFrom = 0;
  static constexpr int kStepK = 8, kWeightBytes = 4;  // k per step, bytes a weight
  static constexpr bool kTailStep = false;  // whether the k % kStepK tail calls next.step()
  static constexpr int nb(int M) { return M <= 1 ? 8 : M <= 2 ? 6 : 4; }
  template <int M, int NB>
  static void run(const Operands& o, int64_t n, int64_t r0, NextBlock& pf) {
    f32_block256<M, NB>(o, n, r0, pf);
  }
};
struct Int8Avx2 {  // M x NB accumulators, M rows held
  static constexpr int kGroup = 2, kWide = 2, kWideFrom = 0;
  static constexpr int kStepK = 16, kWeightBytes = 1;  // k per step, bytes a weight
  static constexpr bool kTailStep = false;  // whether the k % kStepK tail calls next.step()
  static constexpr int nb(int M) { return M <= 1 ? 8 : 4; }
  template <int M, int NB>
  static void run(const Operands& o, int64_t n, int64_t r0, NextBlock& pf) {
    int8_block256<M, NB>(o, n, r0, pf);
  }
};

}  // namespace xds_kernels
