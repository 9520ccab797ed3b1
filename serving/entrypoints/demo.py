"""``make demo``: xDeepServe's disaggregation at work on a simulated 16-device CPU mesh.

1. **PD** with the embedded SmolLM2 (``configs/deployments/cpu10-pd-tp3.yaml``; its 9 heads
   divide by 3): two prefill groups of TP=3 sample each first token and hand the KV to four
   decode groups, which pull it when they have room. Prompts, chat turns sharing a cached
   system prompt, and what moved.
2. **PD + MA** with a tiny DeepSeek-V3-style MoE (MLA, 256 routed experts + a shared one, random
   weights; ``configs/deployments/cpu16-ma.yaml``): prefill on 2 TP=2 groups, decode attention
   in 2 DP domains of 3 ranks taking turns at a 6-device expert slice, 2 micro-batches each.

Each part prints the per-role summary of its timeline; the MA one is saved as a Chrome trace.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

from sharding.devices import configure_cpu_devices

PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea:",
    "List three prime numbers:",
    "The theory of relativity says that",
]
MOE_PROMPTS = [f"Request {i}: tell me about expert {7 * i} of 256." for i in range(12)]


def pd_demo() -> None:
    from serving.core.timeline import format_summary
    from xds_jax import LLM, SamplingParams

    start = time.monotonic()
    # Separately jitted stages: each compiles once for all 30 layers, so the demo starts fast.
    llm = LLM("smollm2", dtype="float32", deployment="configs/deployments/cpu10-pd-tp3.yaml",
              max_num_seqs=16, staged=True, trace=True)
    engine = llm.engine
    print(f"[PD] SmolLM2-135M-Instruct on cpu10-pd-tp3: {len(engine.entry)} prefill groups "
          f"(TP={len(engine.entry[0].runner.devices)}) -> "
          f"{len(engine.groups) - len(engine.entry)} decode groups; loaded in "
          f"{time.monotonic() - start:.1f}s")
    start = time.monotonic()
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24))
    for out in outs:
        print(f"\n> {out.prompt}\n{out.outputs[0].text.strip()}")
    for question in ["What is the capital of France?", "What is the capital of Italy?"]:
        reply = llm.chat([{"role": "user", "content": question}],
                         SamplingParams(temperature=0, max_tokens=32))[0]
        print(f"\n[chat] user: {question}\n[chat] assistant: {reply.outputs[0].text}")
    stats = engine.stats()
    print(f"\n[PD] {stats['kv_transfers']} KV transfers pulled by decode: "
          f"{stats['kv_blocks_sent']} blocks ({stats['kv_bytes_sent'] / 2**20:.1f} MiB) sent, "
          f"{stats['kv_blocks_reused']} found in the decode prefix cache; "
          f"{stats['generation_tokens_total']} tokens, {time.monotonic() - start:.1f}s "
          "incl. compilation")
    print(format_summary(engine.timeline.summary()))


def ma_demo(trace_path: Path) -> None:
    from serving.core.timeline import format_summary
    from xds_jax import LLM, SamplingParams

    start = time.monotonic()
    llm = LLM("configs/models/deepseek-v3-tiny.json", dtype="float32",
              deployment="configs/deployments/cpu16-ma.yaml", max_num_seqs=8, trace=True)
    engine = llm.engine
    print(f"\n[PD+MA] tiny DeepSeek-V3 ({llm.cfg.moe.num_experts} routed experts, random "
          f"weights) on cpu16-ma, loaded in {time.monotonic() - start:.1f}s")
    start = time.monotonic()
    outs = llm.generate(MOE_PROMPTS, SamplingParams(temperature=0, max_tokens=8,
                                                    ignore_eos=True))
    stats = engine.stats()
    print(f"[PD+MA] {len(outs)} requests, {stats['generation_tokens_total']} tokens in "
          f"{time.monotonic() - start:.1f}s incl. compilation; "
          f"{stats['kv_transfers']} KV transfers; expert re-runs: {stats.get('ma_reruns', 0)}")
    summary = engine.timeline.summary()
    print(format_summary(summary))
    engine.timeline.save(trace_path)
    print(f"Chrome trace of the MA pipeline: {trace_path} (chrome://tracing or ui.perfetto.dev)")


def main() -> None:
    os.environ.setdefault("XDS_CPU_DEVICES", "16")
    configure_cpu_devices(collectives=True)  # the MA demo's expert slice
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import jax

    print(f"devices: {len(jax.devices())} x {jax.devices()[0].platform}")
    pd_demo()
    ma_demo(Path(tempfile.gettempdir()) / "xds-demo-ma-trace.json")


if __name__ == "__main__":
    main()
