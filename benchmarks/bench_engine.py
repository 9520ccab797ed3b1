"""Engine throughput against Hugging Face ``transformers`` on the same SmolLM2 weights.

Prints one JSON line per configuration (engine, dtype, weight bytes, batch, decode and prefill
tokens/s as median/min/max over repeats), then ratios measured in this same run:
  - decode tok/s at batch 1 and 32, xds-jax / transformers;
  - prefill speed-up with 50% and 90% of the prompt served from the prefix cache.

transformers comes from the ``golden`` extra (``pip install -e '.[golden]'``); without it only the
xds-jax rows are printed. Usage: ``python -m benchmarks.bench_engine [--repeats 3] [--dtype ...]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from xds_jax import LLM, SamplingParams
from xds_jax.loading.loader import registered_models
from xds_jax.model.params import param_bytes

PROMPT_LEN = 64
DECODE_TOKENS = 32
PREFILL_LEN = 512


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(100, vocab, length).tolist() for _ in range(batch)]


def bench_xds(llm: LLM, batch: int, repeats: int) -> dict:
    params = SamplingParams(temperature=0, max_tokens=DECODE_TOKENS, ignore_eos=True)
    warm = prompts(batch, PROMPT_LEN, llm.cfg.vocab_size, 0)
    llm.generate([{"prompt_token_ids": p} for p in warm], params)  # compile
    rates = []
    for r in range(repeats):
        # Fresh prompts for each call: a repeated prompt would come from the prefix cache.
        one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
        start = time.perf_counter()
        llm.generate([{"prompt_token_ids": p}
                      for p in prompts(batch, PROMPT_LEN, llm.cfg.vocab_size, 2 * r + 1)], one)
        prefill_s = time.perf_counter() - start
        start = time.perf_counter()
        llm.generate([{"prompt_token_ids": p}
                      for p in prompts(batch, PROMPT_LEN, llm.cfg.vocab_size, 2 * r + 2)], params)
        total_s = time.perf_counter() - start
        rates.append(batch * (DECODE_TOKENS - 1) / max(total_s - prefill_s, 1e-9))
    return summary(rates)


def bench_prefix_reuse(llm: LLM, reuse: float, repeats: int) -> float:
    """Prefill time of a fresh prompt over one sharing ``reuse`` of its tokens with a cached one."""
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    shared = int(PREFILL_LEN * reuse)
    times_cold, times_warm = [], []
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
            times_cold.append(cold)
            times_warm.append(warm)
    return statistics.median(times_cold) / statistics.median(times_warm)


def bench_hf(batch: int, repeats: int, dtype: str) -> dict | None:
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError:
        return None
    gguf = registered_models()["smollm2"]
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=getattr(torch, dtype))
    model.eval()
    rates = []
    for r in range(repeats + 1):
        ids = torch.tensor(prompts(batch, PROMPT_LEN, model.config.vocab_size, r))
        with torch.no_grad():
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
            prefill_s = time.perf_counter() - start
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=DECODE_TOKENS, min_new_tokens=DECODE_TOKENS,
                           do_sample=False)
            total_s = time.perf_counter() - start
        if r:
            rates.append(batch * (DECODE_TOKENS - 1) / max(total_s - prefill_s, 1e-9))
    return summary(rates)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    args = ap.parse_args(argv)

    llm = LLM("smollm2", dtype=args.dtype, max_num_seqs=max(args.batches),
              max_num_batched_tokens=max(512, max(args.batches)))
    weight_bytes = param_bytes(llm.params)
    ratios = {}
    for batch in args.batches:
        ours = bench_xds(llm, batch, args.repeats)
        print(json.dumps({"engine": "xds-jax", "dtype": args.dtype, "weight_bytes": weight_bytes,
                          "batch": batch, "decode_tok_s": ours}))
        hf = bench_hf(batch, args.repeats, args.dtype)
        if hf is not None:
            print(json.dumps({"engine": "transformers", "dtype": args.dtype,
                              "weight_bytes": weight_bytes, "batch": batch, "decode_tok_s": hf}))
            ratios[f"decode_b{batch}_vs_hf"] = ours["median"] / hf["median"]
    for reuse in (0.5, 0.9):
        ratios[f"prefill_speedup_{int(reuse * 100)}pct_reuse"] = bench_prefix_reuse(
            llm, reuse, args.repeats)
    print(json.dumps({"ratios": ratios}))


if __name__ == "__main__":
    main()
