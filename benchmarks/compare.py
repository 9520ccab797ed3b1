"""xds-jax against Hugging Face transformers: one process, the same weights, the same prompts.

For each dtype (float32, bfloat16) it prints one JSON line per engine and configuration:
decode at batch 1 / 8 / 32 (64-token prompts, ``--tokens`` new tokens) and prefill of one
512-token prompt, tokens/s as median/min/max over ``--repeats`` runs, then a final ratios line.
The memory-bandwidth roofline is measured in the same run (numpy copy of a 1 GiB buffer:
bytes read + bytes written per second), and batch-1 decode is reported against
``bandwidth / weight bytes``.

How decode is timed, honestly: inside one ``generate`` call. xds-jax: the runner's ``launch``
and ``finish`` are timestamped, so the decode rate is decoded tokens over the time from the
first decode step's launch to the last one's end; the time ``finish`` spends waiting for the
device is subtracted from each step's period to give the Python host time per step.
transformers: a logits processor timestamps each generation step of one ``generate`` call.
Prompts are fresh random ids each run (no prefix-cache hits). Prefill: one ``generate`` call
with ``max_tokens=1`` on a fresh 512-token prompt, whole-call wall time.

transformers comes from the ``golden`` extra; without it a line says so and only xds-jax rows
are printed. Usage: ``python -m benchmarks.compare [--quick] [--dtypes ...] [--batches ...]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time

import jax
import numpy as np

from xds_jax import LLM, SamplingParams
from xds_jax.loader import registered_models
from xds_jax.params import param_bytes

PROMPT_LEN = 64
PREFILL_LEN = 512


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(100, vocab, length).tolist() for _ in range(batch)]


def memory_bandwidth(gib: float = 1.0, repeats: int = 3) -> float:
    """Bytes moved per second (read + write) by a numpy copy of a ``gib`` GiB buffer."""
    src = np.ones(int(gib * (1 << 30)), np.uint8)
    dst = np.empty_like(src)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - start)
    del src, dst
    return 2 * gib * (1 << 30) / min(times[1:])


class StepClock:
    """Timestamps a ``ModelRunner``'s steps: launch start, time waiting for the device, end."""

    def __init__(self, runner):
        self.steps: list[dict] = []
        launch, finish = runner.launch, runner.finish

        def timed_launch(scheduled):
            self.steps.append({"start": time.perf_counter(),
                               "decode": all(s.num_tokens == 1 and s.start > 0 for s in scheduled),
                               "tokens": sum(s.num_tokens for s in scheduled)})
            return launch(scheduled)

        def timed_finish(pending):
            start = time.perf_counter()
            jax.block_until_ready([logits for logits, _ in pending])
            self.steps[-1]["wait"] = time.perf_counter() - start
            finish(pending)
            self.steps[-1]["end"] = time.perf_counter()

        runner.launch, runner.finish = timed_launch, timed_finish

    def decode_stats(self) -> tuple[float, float]:
        """Decode tok/s and host fraction (1 - device wait / step period) over decode steps."""
        dec = [i for i, s in enumerate(self.steps) if s["decode"]]
        tokens = sum(self.steps[i]["tokens"] for i in dec)
        span = self.steps[dec[-1]]["end"] - self.steps[dec[0]]["start"]
        periods = [self.steps[i + 1]["start"] - self.steps[i]["start"] for i in dec[:-1]]
        waits = [self.steps[i]["wait"] for i in dec[:-1]]
        return tokens / span, 1 - sum(waits) / sum(periods)


def group_runners(llm: LLM) -> list:
    return [d.runner for d in llm.engine.drivers]


def bench_xds_decode(llm: LLM, batch: int, tokens: int, repeats: int) -> dict:
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    vocab = llm.cfg.vocab_size
    llm.generate([{"prompt_token_ids": p} for p in prompts(batch, PROMPT_LEN, vocab, 0)],
                 params)  # compiles this batch's buckets
    runner = group_runners(llm)[0]
    compiled = runner.compile_count
    rates, host = [], []
    for r in range(repeats):
        clock = StepClock(runner)
        llm.generate([{"prompt_token_ids": p}
                      for p in prompts(batch, PROMPT_LEN, vocab, 100 * batch + r + 1)], params)
        del runner.launch, runner.finish  # back to the class methods
        rate, fraction = clock.decode_stats()
        rates.append(rate)
        host.append(fraction)
    return {"decode_tok_s": summary(rates), "host_fraction": summary(host),
            "recompiles": runner.compile_count - compiled}


def bench_xds_prefill(llm: LLM, repeats: int) -> dict:
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    rates = []
    for r in range(repeats + 1):
        ids = prompts(1, PREFILL_LEN, llm.cfg.vocab_size, 7000 + r)[0]
        start = time.perf_counter()
        llm.generate({"prompt_token_ids": ids}, one)
        if r:  # the first compiles
            rates.append(PREFILL_LEN / (time.perf_counter() - start))
    return {"prefill_tok_s": summary(rates)}


def load_hf(dtype: str):
    """The transformers model of the registered SmolLM2 GGUF, or None without transformers."""
    try:
        import torch
        from transformers import AutoModelForCausalLM, GgufConfig
    except ImportError:
        return None
    torch.set_num_threads(os.cpu_count() or 1)
    gguf = registered_models()["smollm2"]
    # Dequantised at load, as xds-jax does: a dense model of the same values in ``dtype``.
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=getattr(torch, dtype),
        quantization_config=GgufConfig(dequantize=True))
    assert next(model.parameters()).dtype == getattr(torch, dtype)
    return model.eval()


def bench_hf_decode(model, batch: int, tokens: int, repeats: int) -> dict:
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class Stamp(LogitsProcessor):
        def __init__(self):
            self.times: list[float] = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    rates = []
    for r in range(repeats + 1):
        ids = torch.tensor(prompts(batch, PROMPT_LEN, model.config.vocab_size,
                                   100 * batch + r))
        stamp = Stamp()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                           min_new_tokens=tokens, do_sample=False,
                           logits_processor=LogitsProcessorList([stamp]))
        if r:  # the first warms up
            rates.append(batch * (len(stamp.times) - 1) / (stamp.times[-1] - stamp.times[0]))
    return {"decode_tok_s": summary(rates)}


def bench_hf_prefill(model, repeats: int) -> dict:
    import torch

    rates = []
    for r in range(repeats + 1):
        ids = torch.tensor(prompts(1, PREFILL_LEN, model.config.vocab_size, 7000 + r))
        with torch.no_grad():
            start = time.perf_counter()
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1,
                           do_sample=False)
            if r:
                rates.append(PREFILL_LEN / (time.perf_counter() - start))
    return {"prefill_tok_s": summary(rates)}


def emit(line: dict) -> None:
    print(json.dumps(line), flush=True)


def run_dtype(dtype: str, batches: list[int], tokens: int, repeats: int, bandwidth: float,
              ratios: dict) -> None:
    llm = LLM("smollm2", dtype=dtype, max_num_seqs=max(max(batches), 4),
              max_num_batched_tokens=max(PREFILL_LEN, max(batches)))
    weight_bytes = param_bytes(llm.params)
    base = {"dtype": dtype, "weight_bytes": weight_bytes}
    roofline = bandwidth / weight_bytes
    emit({"engine": "roofline", **base, "bandwidth_GBps": bandwidth / 1e9,
          "batch1_decode_tok_s": roofline})
    ours = {}
    for batch in batches:
        ours[batch] = bench_xds_decode(llm, batch, tokens, repeats)
        emit({"engine": "xds-jax", **base, "batch": batch, **ours[batch]})
    ours["prefill"] = bench_xds_prefill(llm, repeats)
    emit({"engine": "xds-jax", **base, "prompt_tokens": PREFILL_LEN, **ours["prefill"]})
    if 1 in batches:
        ratios[f"{dtype}_b1_of_roofline"] = ours[1]["decode_tok_s"]["median"] / roofline
    if max(batches) >= 8:
        ratios[f"{dtype}_host_fraction_b{max(batches)}"] = (
            ours[max(batches)]["host_fraction"]["median"])
    del llm
    gc.collect()
    model = load_hf(dtype)
    if model is None:
        emit({"engine": "transformers", "skipped": "torch/transformers not installed "
              "(pip install -e '.[golden]' for the baseline)"})
        return
    for batch in batches:
        hf = bench_hf_decode(model, batch, tokens, repeats)
        emit({"engine": "transformers", **base, "batch": batch, **hf})
        ratios[f"{dtype}_decode_b{batch}_vs_hf"] = (
            ours[batch]["decode_tok_s"]["median"] / hf["decode_tok_s"]["median"])
    hf = bench_hf_prefill(model, repeats)
    emit({"engine": "transformers", **base, "prompt_tokens": PREFILL_LEN, **hf})
    ratios[f"{dtype}_prefill_vs_hf"] = (
        ours["prefill"]["prefill_tok_s"]["median"] / hf["prefill_tok_s"]["median"])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                    choices=["float32", "bfloat16"])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per decode run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="1 repeat of 16 tokens")
    args = ap.parse_args(argv)
    if args.quick:
        args.tokens, args.repeats = 16, 1
    bandwidth = memory_bandwidth()
    ratios: dict = {}
    for dtype in args.dtypes:
        run_dtype(dtype, args.batches, args.tokens, args.repeats, bandwidth, ratios)
    emit({"ratios": ratios})


if __name__ == "__main__":
    main()
