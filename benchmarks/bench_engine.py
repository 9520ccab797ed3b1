"""Prefill speed-up from the prefix cache: a fresh 512-token prompt sharing 50% or 90% of its
tokens with a cached one, against the same prompt with nothing cached.

Decode and prefill throughput against transformers moved to ``benchmarks/compare.py``, which
times decode inside one ``generate`` call (this file used to subtract two separately timed
calls, which gave nonsense maxima). Prints one JSON line per reuse fraction (cold and warm
prefill seconds as median/min/max, each pair measured back to back) and a final ratios line.
Usage: ``python -m benchmarks.bench_engine [--repeats 3] [--dtype ...]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from benchmarks.compare import PREFILL_LEN, summary
from xds_jax import LLM, SamplingParams


def bench_prefix_reuse(llm: LLM, reuse: float, repeats: int) -> dict:
    """Cold and warm prefill seconds of prompt pairs sharing ``reuse`` of their tokens."""
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    shared = int(PREFILL_LEN * reuse)
    cold_s, warm_s = [], []
    for r in range(repeats + 2):
        # Prompts never seen before in this process, so "cold" really misses the cache.
        rng = np.random.default_rng(1000 * int(reuse * 100) + r)
        base = rng.integers(100, llm.cfg.vocab_size, PREFILL_LEN).tolist()
        other = base[:shared] + rng.integers(100, llm.cfg.vocab_size,
                                             PREFILL_LEN - shared).tolist()
        start = time.perf_counter()
        llm.generate({"prompt_token_ids": base}, one)
        cold = time.perf_counter() - start
        start = time.perf_counter()
        llm.generate({"prompt_token_ids": other}, one)
        warm = time.perf_counter() - start
        if r >= 2:  # the first rounds compile
            cold_s.append(cold)
            warm_s.append(warm)
    return {"cold_s": summary(cold_s), "warm_s": summary(warm_s),
            "speedup": statistics.median(c / w for c, w in zip(cold_s, warm_s, strict=True))}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    args = ap.parse_args(argv)
    llm = LLM("smollm2", dtype=args.dtype, max_num_batched_tokens=PREFILL_LEN)
    ratios = {}
    for reuse in (0.5, 0.9):
        result = bench_prefix_reuse(llm, reuse, args.repeats)
        print(json.dumps({"engine": "xds-jax", "dtype": args.dtype, "prompt_tokens": PREFILL_LEN,
                          "reuse": reuse, **result}), flush=True)
        ratios[f"prefill_speedup_{int(reuse * 100)}pct_reuse"] = result["speedup"]
    print(json.dumps({"ratios": ratios}))


if __name__ == "__main__":
    main()
