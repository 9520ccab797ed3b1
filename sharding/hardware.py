"""Per-die hardware figures for the performance model (``sharding.perf_model``).

Every number is an input. Datasheet figures name their source; ``calibrated`` marks the few
constants fitted to one published measurement (the fit is stated next to the field), and
``assumed`` marks guesses no source pins down. Tags: [X] xDeepServe (arXiv 2508.02520),
[C] CloudMatrix-Infer (arXiv 2506.12708), [FlashMLA] and [DeepEP] the READMEs of DeepSeek's
open kernels (H800 measurements).
"""

from __future__ import annotations

import dataclasses

TERA = 1e12
GIGA = 1e9
MICRO = 1e-6


@dataclasses.dataclass(frozen=True)
class Hardware:
    """One die (one GPU) and the fabrics around it. Units: FLOP/s, B/s, bytes, seconds.

    Attributes:
      matmul_flops: dense peak at the weights' precision (INT8 on 910C, FP8 on Hopper); the
        GEMMs (projections, experts, LM head) run at this peak.
      attention_flops: dense BF16 peak; the context-dependent attention core runs at it.
      link_bandwidth: scale-up bandwidth per die, one direction.
      scale_up_dies: dies one scale-up domain joins; a collective spanning more dies runs at
        ``scale_out_bandwidth``.
      weight_itemsize, kv_itemsize: bytes per weight and per cached latent (or K/V) element;
        MLA's rotary key part is always cached in 2 bytes.
      dispatch_itemsize, combine_itemsize: bytes per hidden element sent to experts and back
        (plus one 4-byte scale per token when 1).
      attention_compute_eff, attention_memory_eff: fraction of peak the attention kernel
        reaches when compute- and memory-bound.
      gemm_eff: fraction of ``matmul_flops`` the decode-sized GEMMs reach.
      attention_overhead_s: fixed time per attention micro-batch-layer beyond the roofline
        (norms, RoPE, KV writes, gating and A2E set-up, kernel boundaries).
      hop_overhead_s: fixed time per all-to-all hop (count exchange, polling, launch).
    """

    name: str
    dies_per_chip: int
    matmul_flops: float
    attention_flops: float
    hbm_bandwidth: float
    hbm_bytes: float
    link_bandwidth: float
    link_latency_s: float
    scale_up_dies: int
    scale_out_bandwidth: float
    weight_itemsize: float
    kv_itemsize: float
    dispatch_itemsize: float
    combine_itemsize: float
    attention_compute_eff: float
    attention_memory_eff: float
    gemm_eff: float
    attention_overhead_s: float
    hop_overhead_s: float

    def bandwidth(self, span_dies: int) -> float:
        """Per-die all-to-all bandwidth for a collective over ``span_dies`` dies."""
        return self.link_bandwidth if span_dies <= self.scale_up_dies else self.scale_out_bandwidth


CLOUDMATRIX384 = Hardware(
    # One Ascend 910C die of a CloudMatrix384 (384 chips = 768 dies).
    name="cloudmatrix384",
    dies_per_chip=2,
    matmul_flops=752 * TERA,  # INT8 dense per die (1,504 TOPS per chip) [C §3]
    attention_flops=376 * TERA,  # BF16 dense per die (752 TFLOPS per chip) [C §3]
    hbm_bandwidth=1.6 * TERA,  # 3.2 TB/s per chip [C §3]
    hbm_bytes=64 * 2**30,  # 128 GB per chip [C §3]
    link_bandwidth=196 * GIGA,  # UB NPU-NPU, one direction [C]
    link_latency_s=1.2 * MICRO,  # UB 512 B [C]
    scale_up_dies=768,  # the whole SuperPod is one UB domain [X §2.2]
    scale_out_bandwidth=25 * GIGA,  # RoCE 200 Gb/s per die [C]
    weight_itemsize=1,  # W8A8 INT8 [X §4.7]
    kv_itemsize=1,  # INT8 latent, BF16 rotary key [X §4.7]
    dispatch_itemsize=1,  # INT8 dispatch [X §3.2]
    combine_itemsize=2,  # combine quantisation is not stated [X §2.4]: assumed BF16
    attention_compute_eff=0.654,  # MLA utilisation, compute-bound [C]
    attention_memory_eff=0.841,  # MLA utilisation, memory-bound [C]
    # calibrated: MoE = 0.12 ms for 480 tokens on one expert die [X §7.1]; [C] measures
    # 77-83 % for INT8 GEMMs at large shapes, decode-sized grouped matmuls reach less.
    gemm_eff=0.47,
    # calibrated: the attention micro-batch-layer of cm768-ma (48 sequences x 2 tokens, 3K
    # context, with gating) = 0.7 ms [X §7.1] minus its roofline (0.48 ms: 36 GFLOP of
    # GEMMs, 82 GFLOP over the cache, 187 M weights, from the cost analysis).
    attention_overhead_s=220 * MICRO,
    # calibrated: A2E = 172 us at per-die batch 96 over 2 trampoline hops [X §3.3] minus its
    # bytes (35 us) and link latency terms. Predicts E2A 207 us (paper 193) and EP128
    # dispatch at batch 128 106 us (paper about 100) [X §3.2].
    hop_overhead_s=67.2 * MICRO,
)

H100 = Hardware(
    # One H100 SXM5 GPU of an 8-GPU HGX node, 400 Gb/s InfiniBand per GPU.
    name="h100",
    dies_per_chip=1,
    matmul_flops=1979 * TERA,  # FP8 dense (NVIDIA H100 datasheet)
    attention_flops=989 * TERA,  # BF16 dense (datasheet)
    hbm_bandwidth=3.35 * TERA,  # HBM3 (datasheet)
    hbm_bytes=80 * 10**9,
    link_bandwidth=450 * GIGA,  # NVLink 4: 900 GB/s both directions (datasheet)
    link_latency_s=2 * MICRO,  # assumed
    scale_up_dies=8,
    scale_out_bandwidth=50 * GIGA,  # ConnectX-7 400 Gb/s per GPU
    weight_itemsize=1,  # FP8 weights as DeepSeek serves V3
    kv_itemsize=2,  # BF16 latent (FlashMLA)
    dispatch_itemsize=1,  # FP8 dispatch [DeepEP]
    combine_itemsize=2,  # BF16 combine [DeepEP]
    attention_compute_eff=0.667,  # FlashMLA 660 TFLOPS on H800 [FlashMLA]
    attention_memory_eff=0.896,  # FlashMLA 3,000 GB/s on H800 [FlashMLA]
    gemm_eff=0.47,  # assumed: the 910C's calibrated fraction
    # assumed: the 910C residual, taken as small memory-bound kernels, scaled by HBM bandwidth
    attention_overhead_s=220 * MICRO * 1.6 / 3.35,
    # calibrated: DeepEP low-latency dispatch at 128 tokens/rank, EP8 over RDMA = 163 us
    # [DeepEP] minus its bytes term at 50 GB/s (147 us); predicts combine 310 us (318).
    hop_overhead_s=16 * MICRO,
)

H200 = dataclasses.replace(
    H100,
    name="h200",
    hbm_bandwidth=4.8 * TERA,  # HBM3e (NVIDIA H200 datasheet); compute as H100
    hbm_bytes=141 * 10**9,
    attention_overhead_s=220 * MICRO * 1.6 / 4.8,  # assumed, as H100
)

PRESETS = {hw.name: hw for hw in (CLOUDMATRIX384, H100, H200)}


def hardware_preset(name: str) -> Hardware:
    """The preset called ``name`` (``cloudmatrix384``, ``h100`` or ``h200``)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown hardware {name!r}; presets: {', '.join(PRESETS)}") from None
