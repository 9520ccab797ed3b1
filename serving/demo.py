"""``make demo``: the embedded SmolLM2 served by FlowServe on a simulated multi-device CPU mesh.

Runs a batch of prompts through two data-parallel groups (each on its own virtual device),
with chunked prefill, a shared system prompt served from the prefix cache, and a chat turn;
then prints the outputs and what the engine did.
"""

from __future__ import annotations

import logging
import os
import time

from sharding.devices import configure_cpu_devices

PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea:",
    "List three prime numbers:",
    "The theory of relativity says that",
]


def main() -> None:
    os.environ.setdefault("XDS_CPU_DEVICES", "8")
    configure_cpu_devices()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import jax

    from xds_jax import LLM, SamplingParams

    print(f"devices: {len(jax.devices())} x {jax.devices()[0].platform}")
    start = time.monotonic()
    # Separately jitted stages: each compiles once for all 30 layers, so the demo starts fast.
    llm = LLM("smollm2", dtype="float32", num_dp_groups=2, max_num_seqs=16, staged=True)
    print(f"loaded SmolLM2-135M-Instruct in {time.monotonic() - start:.1f}s "
          f"({llm.cfg.num_layers} layers, vocab {llm.cfg.vocab_size}), 2 DP groups")

    start = time.monotonic()
    greedy = SamplingParams(temperature=0, max_tokens=24)
    outs = llm.generate(PROMPTS, greedy)
    for out in outs:
        print(f"\n> {out.prompt}\n{out.outputs[0].text.strip()}")

    # Chats share the template's system prompt: after the first, it comes from the prefix cache.
    questions = ["What is the capital of France?", "What is the capital of Italy?",
                 "Name a large river in Europe."]
    for question in questions:
        reply = llm.chat([{"role": "user", "content": question}],
                         SamplingParams(temperature=0, max_tokens=32))[0]
        print(f"\n[chat] user: {question}\n[chat] assistant: {reply.outputs[0].text}")
    elapsed = time.monotonic() - start

    stats = llm.engine.stats()
    print(f"\nFlowServe: {stats['num_groups']} DP groups, "
          f"{stats['generation_tokens_total']} tokens generated, "
          f"{stats['prefill_tokens_total']} prompt tokens computed, "
          f"prefix-cache hit rate {stats['prefix_hit_rate']:.0%}, "
          f"{stats['compiles']} compiled step shapes, {elapsed:.1f}s incl. compilation")
    for g in llm.engine.groups:
        print(f"  group {g.index} on {g.runner.device}: {g.steps} steps, "
              f"{g.generated_tokens} tokens")


if __name__ == "__main__":
    main()
