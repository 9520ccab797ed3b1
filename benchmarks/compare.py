"""xds-jax against Hugging Face transformers: one process, the same weights, the same prompts.

For each dtype (float32, bfloat16, and int8: weight-only INT8 over bfloat16, ``LLM(...,
quantization="int8")``) it prints one JSON line per engine and configuration:
decode at batch 1 / 8 / 32 (64-token prompts, ``--tokens`` new tokens) and prefill of one
512-token prompt, tokens/s as median/min/max over ``--repeats`` runs, then a final ratios line.
The memory-bandwidth roofline is measured in the same run (numpy copy of a 1 GiB buffer:
bytes read + bytes written per second), and batch-1 decode is reported against
``bandwidth / weight bytes``.

xds-jax and transformers runs alternate (one each per repeat) and each ratio is the median of
the per-pair ratios: these machines are shared and noisy. Decode is timed inside one
``generate`` call. xds-jax: the runner's ``launch`` and ``finish`` are timestamped, so the
decode rate is decoded tokens over the time from the end of the first step that decodes every
row to the end of the last (transformers decodes every row every step: under chunked prefill
the first prompts' rows start decoding, and so finish, a few steps before the last prompts',
and those steps of fewer rows are not batch-``B`` decode); the time ``finish`` spends waiting
for the device (the step program and its sampler), subtracted from each step's period, gives
the Python host time per step (``host_fraction``, wall time). On a CPU that wall time
includes the launch call waiting for a core while the step it enqueued runs on the others
(XLA's threads fill both cores of a 2-core machine; docs/performance.md), so the CPU time the
host thread itself spends over the decode span is reported too (``host_cpu_fraction``,
``time.thread_time``: schedule, build, dispatch, append, stop checks, whatever the thread
computes).
transformers: a logits processor timestamps each generation step of one ``generate`` call.
Prompts are fresh random ids each run (no prefix-cache hits). Prefill: one ``generate`` call
with ``max_tokens=1`` on a fresh 512-token prompt, whole-call wall time.

transformers has no weight-only INT8 CPU path of its own (bitsandbytes and torchao kernels
need an accelerator or extra packages), so int8 rows have no transformers row; the ratios
line gives ``int8_decode_b1_vs_bfloat16`` (our int8 batch 1 over our bfloat16 batch 1) and
likewise for the other batches and prefill.

transformers comes from the ``golden`` extra; without it a line says so and only xds-jax rows
are printed. Usage: ``python -m benchmarks.compare [--quick] [--dtypes ...] [--batches ...]``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time

# torch's OpenMP threads spin at barriers by default; on a shared machine (another process on
# a core) that made transformers 10-20x slower and erratic here (bf16 decode 0.6 vs 11 tok/s).
# Passive waiting must be set before torch loads; OMP_WAIT_POLICY=ACTIVE in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax
import numpy as np

from xds_jax import LLM, SamplingParams
from xds_jax.kernels import cpu_matmul
from xds_jax.loading.loader import registered_models
from xds_jax.model.params import param_bytes

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
    """Timestamps a ``ModelRunner``'s steps: launch start, time waiting for the device, end.
    With asynchronous scheduling step n + 1 is launched before step n is finished, so each
    ``finish`` finds its step by the handle ``launch`` returned."""

    def __init__(self, runner):
        self.steps: list[dict] = []
        launch, finish = runner.launch, runner.finish
        by_handle: dict[int, dict] = {}

        def timed_launch(scheduled, *args, **kwargs):
            step = {"start": time.perf_counter(), "cpu_start": time.thread_time(),
                    "decode": all(s.num_tokens == 1 and s.start > 0 for s in scheduled),
                    "tokens": sum(s.num_tokens for s in scheduled)}
            self.steps.append(step)
            handle = launch(scheduled, *args, **kwargs)
            by_handle[id(handle)] = step
            return handle

        def timed_finish(pending):
            step = by_handle.pop(id(pending))
            start = time.perf_counter()
            jax.block_until_ready([(logits, sampled.tokens_B if sampled else None)
                                   for logits, sampled in pending])  # the sampler is device work
            step["wait"] = time.perf_counter() - start
            finish(pending)
            step["end"] = time.perf_counter()
            step["cpu_end"] = time.thread_time()

        runner.launch, runner.finish = timed_launch, timed_finish

    def decode_stats(self, batch: int) -> tuple[float, float, float]:
        """Decode tok/s, host fraction (1 - device wait / step period) and host CPU fraction
        (the thread's CPU time over the wall time) over the steps that decode all ``batch``
        rows, from the first one's end to the last one's: under asynchronous scheduling the
        first decode step is launched while the prefill still runs, so launch times would
        count the prefill. There the host's share of a period overlaps the device's next step
        (the device waits only where a launch comes late)."""
        dec = [s for s in self.steps if s["decode"] and s["tokens"] == batch]
        if len(dec) < 2:  # too few tokens for two full steps: every decode step
            dec = [s for s in self.steps if s["decode"]]
        tokens = sum(s["tokens"] for s in dec[1:])
        span = dec[-1]["end"] - dec[0]["end"]
        waits = sum(s["wait"] for s in dec[1:])
        cpu = dec[-1]["cpu_end"] - dec[0]["cpu_end"]
        return tokens / span, 1 - waits / span, cpu / span


def xds_decode_once(llm: LLM, batch: int, tokens: int, seed: int) -> tuple[float, float, float]:
    """Decode tok/s, host fraction and host CPU fraction of one ``generate`` call of ``batch``
    fresh prompts."""
    runner = llm.engine.drivers[0].runner
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    clock = StepClock(runner)
    try:
        llm.generate([{"prompt_token_ids": p}
                      for p in prompts(batch, PROMPT_LEN, llm.cfg.vocab_size, seed)], params)
    finally:
        del runner.launch, runner.finish  # back to the class's methods
    return clock.decode_stats(batch)


def xds_prefill_once(llm: LLM, seed: int) -> float:
    ids = prompts(1, PREFILL_LEN, llm.cfg.vocab_size, seed)[0]
    start = time.perf_counter()
    llm.generate({"prompt_token_ids": ids},
                 SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    return PREFILL_LEN / (time.perf_counter() - start)


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


def hf_decode_once(model, batch: int, tokens: int, seed: int) -> float:
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class Stamp(LogitsProcessor):
        def __init__(self):
            self.times: list[float] = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    ids = torch.tensor(prompts(batch, PROMPT_LEN, model.config.vocab_size, seed))
    stamp = Stamp()
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                       min_new_tokens=tokens, do_sample=False,
                       logits_processor=LogitsProcessorList([stamp]))
    return batch * (len(stamp.times) - 1) / (stamp.times[-1] - stamp.times[0])


def hf_prefill_once(model, seed: int) -> float:
    import torch

    ids = torch.tensor(prompts(1, PREFILL_LEN, model.config.vocab_size, seed))
    with torch.no_grad():
        start = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1,
                       do_sample=False)
        return PREFILL_LEN / (time.perf_counter() - start)


def emit(line: dict) -> None:
    print(json.dumps(line), flush=True)


def run_dtype(dtype: str, batches: list[int], tokens: int, repeats: int, bandwidth: float,
              ratios: dict, medians: dict) -> None:
    """Every configuration of one dtype. xds-jax and transformers runs alternate, so a burst
    of load from elsewhere hits both; ratios are medians of the per-pair ratios. ``medians``
    gets our median rate per configuration name."""
    quantization = "int8" if dtype == "int8" else None
    llm = LLM("smollm2", dtype="bfloat16" if quantization else dtype, quantization=quantization,
              max_num_seqs=max(max(batches), 4),
              max_num_batched_tokens=max(PREFILL_LEN, max(batches)))
    hf = None if quantization else load_hf(dtype)
    if hf is None:
        emit({"engine": "transformers", "dtype": dtype, "skipped": (
            "no weight-only INT8 CPU path in transformers" if quantization else
            "torch/transformers not installed (pip install -e '.[golden]' for the baseline)")})
    weight_bytes = param_bytes(llm.params)
    base = {"dtype": dtype, "weight_bytes": weight_bytes}
    roofline = bandwidth / weight_bytes
    emit({"engine": "roofline", **base, "bandwidth_GBps": bandwidth / 1e9,
          "batch1_decode_tok_s": roofline,
          # xds-jax's CPU matmul kernel (cpu_matmul.max_rows): its instruction set, or off
          "cpu_kernel": {3: "avx512-bf16", 2: "avx512", 1: "avx2"}.get(cpu_matmul.kernel_isa(),
                                                                          "off")})
    runner = llm.engine.drivers[0].runner
    configs = [("decode", b) for b in batches] + [("prefill", 1)]
    for kind, batch in configs:
        seed = 1000 * batch + (kind == "prefill")
        if kind == "decode":
            ours_once = functools.partial(xds_decode_once, llm, batch, tokens)
            hf_once = functools.partial(hf_decode_once, hf, batch, tokens)
        else:
            ours_once = functools.partial(xds_prefill_once, llm)
            hf_once = functools.partial(hf_prefill_once, hf)
        ours_once(seed)  # compiles this configuration's buckets
        if hf is not None:
            hf_once(seed)
        compiled = runner.compile_count
        ours, host, host_cpu, theirs = [], [], [], []
        for r in range(1, repeats + 1):
            got = ours_once(seed + r)
            ours.append(got[0] if kind == "decode" else got)
            if kind == "decode":
                host.append(got[1])
                host_cpu.append(got[2])
            if hf is not None:
                theirs.append(hf_once(seed + r))
        key = "decode_tok_s" if kind == "decode" else "prefill_tok_s"
        shape = {"batch": batch} if kind == "decode" else {"prompt_tokens": PREFILL_LEN}
        line = {"engine": "xds-jax", **base, **shape, key: summary(ours),
                "recompiles": runner.compile_count - compiled}
        if host:
            line["host_fraction"] = summary(host)
            line["host_cpu_fraction"] = summary(host_cpu)
        emit(line)
        name = f"{dtype}_{kind}_b{batch}" if kind == "decode" else f"{dtype}_prefill"
        medians[name] = statistics.median(ours)
        if kind == "decode" and batch == 1:
            ratios[f"{dtype}_decode_b1_of_roofline"] = statistics.median(ours) / roofline
        if host and batch == max(batches):
            ratios[f"{dtype}_host_fraction_b{batch}"] = statistics.median(host)
            ratios[f"{dtype}_host_cpu_fraction_b{batch}"] = statistics.median(host_cpu)
        if theirs:
            emit({"engine": "transformers", **base, **shape, key: summary(theirs)})
            ratios[f"{name}_vs_hf"] = statistics.median(
                o / t for o, t in zip(ours, theirs, strict=True))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "int8"],
                    choices=["float32", "bfloat16", "int8"])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per decode run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="2 repeats of 16 tokens")
    args = ap.parse_args(argv)
    if args.quick:
        args.tokens, args.repeats = 16, 2
    bandwidth = memory_bandwidth()
    ratios: dict = {}
    medians: dict = {}
    for dtype in args.dtypes:
        run_dtype(dtype, args.batches, args.tokens, args.repeats, bandwidth, ratios, medians)
    for name, rate in medians.items():  # int8 against bfloat16, configuration by configuration
        base = name.replace("int8_", "bfloat16_", 1)
        if name.startswith("int8_") and base in medians:
            ratios[name + "_vs_bfloat16"] = rate / medians[base]
    emit({"ratios": ratios})


if __name__ == "__main__":
    main()
