"""Host time per decode step, synchronous against asynchronous scheduling, in one process.

One ``LLM`` (SmolLM2, ``--dtype``) decodes ``--tokens`` tokens for batches of 1 / 8 / 32 fresh
random 64-token prompts (greedy, ``ignore_eos``); each repeat runs the synchronous engine and
then the asynchronous one (the same group and compiled programs, ``DPGroup.overlap`` switched),
so a burst of load from elsewhere hits both. Per run, timed on the runner's ``launch`` and
``finish`` over the decode steps:

- ``tok_s``: decoded tokens over the time from the first decode launch to the last finish;
- ``period_ms``: time per decode step;
- ``host_ms``: Python time per step outside waits for the device (schedule, build rows,
  launch, append, stop checks, detokenize, emit);
- ``host_fraction``: the host time on the critical path, as a share of the step. Synchronous:
  all of it (``host_ms / period_ms``, as ``benchmarks.compare`` reports). Asynchronous: the
  device has the next step queued while the host works, so only the steps whose previous
  step was already done when the next was launched (``starved``) leave it idle; their share
  of ``host_ms`` counts.

One JSON line per run, then per batch the medians and ``async_vs_sync`` (median of per-pair
tok/s ratios). Usage: ``python -m benchmarks.bench_host [--dtype bfloat16] [--tokens 48]
[--repeats 3] [--batches 1 8 32]``. On a CPU the "device" is the same cores as the host, so
overlap gains only what idle cores allow.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import numpy as np

from xds_jax import LLM, SamplingParams

PROMPT_LEN = 64


class Clock:
    """Timestamps the decode steps of one group's runner (instance attributes, undone by
    ``close``)."""

    def __init__(self, runner):
        self.runner, self.steps = runner, []
        launch, finish = runner.launch, runner.finish

        def timed_launch(scheduled, after=None):
            decode = all(s.num_tokens == 1 and s.start > 0 for s in scheduled)
            starved = bool(after) and all(_ready(a) for a in after)
            start = time.perf_counter()
            handle = launch(scheduled, after=after)
            self.steps.append({"start": start, "decode": decode, "rows": len(scheduled),
                               "starved": starved, "handle": handle})
            return handle

        def timed_finish(handle):
            step = next(s for s in reversed(self.steps) if s["handle"] is handle)
            start = time.perf_counter()
            jax.block_until_ready([sampled.tokens_B for _, sampled in handle if sampled])
            step["wait"] = time.perf_counter() - start
            finish(handle)
            step["end"] = time.perf_counter()

        runner.launch, runner.finish = timed_launch, timed_finish

    def close(self) -> None:
        del self.runner.launch, self.runner.finish

    def stats(self) -> dict:
        dec = [s for s in self.steps if s["decode"] and "end" in s]
        span = max(s["end"] for s in dec) - dec[0]["start"]
        period = span / len(dec)
        host = (span - sum(s["wait"] for s in dec)) / len(dec)
        starved = sum(s["starved"] for s in dec) / len(dec)
        return {"tok_s": sum(s["rows"] for s in dec) / span, "period_ms": 1e3 * period,
                "host_ms": 1e3 * host, "starved": starved}


def _ready(pair) -> bool:
    """Whether a launched program's sampled tokens are computed already."""
    _, sampled = pair
    return sampled is None or sampled.tokens_B.is_ready()


def run_once(llm: LLM, overlap: bool, batch: int, tokens: int, seed: int) -> dict:
    group = llm.engine.groups[0]
    group.overlap = overlap
    rng = np.random.default_rng(seed)
    prompts = [{"prompt_token_ids": rng.integers(100, llm.cfg.vocab_size, PROMPT_LEN).tolist()}
               for _ in range(batch)]
    clock = Clock(group.runner)
    try:
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True))
    finally:
        clock.close()
    stats = clock.stats()
    exposed = stats["host_ms"] * (stats["starved"] if overlap else 1.0)
    stats["host_fraction"] = exposed / stats["period_ms"]
    return stats


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    llm = LLM("smollm2", dtype=args.dtype, max_num_seqs=max(max(args.batches), 4),
              async_scheduling=True)
    if not llm.engine.groups[0].overlap:
        raise SystemExit("the engine's group cannot overlap steps (speculative or MA layout)")
    for batch in args.batches:
        for overlap in (False, True):  # warm-up: compile every shape of both modes
            run_once(llm, overlap, batch, 4, seed=0)
        runs = {False: [], True: []}
        for repeat in range(args.repeats):
            for overlap in (False, True):
                stats = run_once(llm, overlap, batch, args.tokens, seed=1000 * batch + repeat)
                runs[overlap].append(stats)
                print(json.dumps({"dtype": args.dtype, "batch": batch, "async": overlap,
                                  **{k: round(v, 4) for k, v in stats.items()}}), flush=True)
        line = {"dtype": args.dtype, "batch": batch}
        for overlap, name in ((False, "sync"), (True, "async")):
            for key in ("tok_s", "host_ms", "host_fraction"):
                line[f"{name}_{key}"] = round(statistics.median(r[key] for r in runs[overlap]), 4)
        line["async_vs_sync"] = round(statistics.median(
            a["tok_s"] / s["tok_s"] for s, a in zip(runs[False], runs[True], strict=True)), 3)
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
