"""Host time per decode step: synchronous, asynchronous and chained scheduling, in one process.

One ``LLM`` (SmolLM2, ``--dtype``) decodes ``--tokens`` tokens for batches of 1 / 8 / 32 fresh
random 64-token prompts (greedy, ``ignore_eos``); each repeat runs the synchronous engine, the
asynchronous one and the chained one (``--chain`` decode steps a launch,
``num_scheduler_steps``), the same group and compiled programs switched between modes, so a
burst of load from elsewhere hits all three. Per run, timed on the runner's ``launch`` and
``finish`` over the decode launches:

- ``tok_s``: decoded tokens over the time from the first decode launch to the last finish;
- ``period_ms``: time per decode step (a chained launch counts its steps);
- ``host_ms``: Python time per step outside waits for the device (schedule, build rows,
  launch, append, stop checks, detokenize, emit);
- ``host_fraction``: the host time on the critical path, as a share of the step. Synchronous:
  all of it (``host_ms / period_ms``, as ``benchmarks.compare`` reports). Asynchronous: the
  device has the next step queued while the host works, so only the steps whose previous
  step was already done when the next was launched (``starved``) leave it idle; their share
  of ``host_ms`` counts. Chained: all of it, per step of the chain (an upper bound: a chain's
  later launches are made while its first steps run).

One JSON line per run, then per batch the medians, ``async_vs_sync`` and ``chained_vs_sync``
(medians of per-repeat tok/s ratios). Usage: ``python -m benchmarks.bench_host [--dtype
bfloat16] [--tokens 48] [--repeats 3] [--batches 1 8 32] [--chain 4]``. On a CPU the
"device" is the same cores as the host, so overlap gains only what idle cores allow, and a
chain saves only the host's per-step Python (its launches still cost the cores their
dispatch); on an accelerator both hide the host.
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
            self.steps.append({"start": start, "decode": decode, "seqs": scheduled,
                               "programs": len(handle),
                               "starved": starved, "handle": handle})
            return handle

        def timed_finish(handle):
            step = next(s for s in reversed(self.steps) if s["handle"] is handle)
            start = time.perf_counter()
            jax.block_until_ready([sampled.tokens_B for _, sampled in handle if sampled])
            step["wait"] = time.perf_counter() - start
            before = _outputs(step["seqs"])  # a step launched meanwhile appends nothing yet
            finish(handle)
            step["end"] = time.perf_counter()
            step["tokens"] = _outputs(step["seqs"]) - before

        runner.launch, runner.finish = timed_launch, timed_finish

    def close(self) -> None:
        del self.runner.launch, self.runner.finish

    def stats(self) -> dict:
        """Rates over the decode steps, from the first one's start: its launch, or the end of
        the prefill step it was launched beside (asynchronous scheduling launches the first
        decode step while the prefill runs, and counting from the launch would count the
        prefill as decode time)."""
        dec = [s for s in self.steps if s["decode"] and "end" in s]
        before = self.steps[:self.steps.index(dec[0])]
        start = max([dec[0]["start"]] + [s["end"] for s in before if "end" in s])
        span = max(s["end"] for s in dec) - start
        steps = sum(s["programs"] for s in dec)  # decode launches hold only decode programs
        period = span / steps
        host = (span - sum(s["wait"] for s in dec)) / steps
        starved = sum(s["starved"] for s in dec) / len(dec)
        return {"tok_s": sum(s["tokens"] for s in dec) / span, "period_ms": 1e3 * period,
                "host_ms": 1e3 * host, "starved": starved}


def _outputs(scheduled) -> int:
    """Tokens the scheduled sequences hold so far."""
    return sum(len(s.seq.output_ids) for s in scheduled)


def _ready(pair) -> bool:
    """Whether a launched program's sampled tokens are computed already."""
    _, sampled = pair
    return sampled is None or sampled.tokens_B.is_ready()


def set_mode(llm: LLM, mode: str, chain: int) -> None:
    """Switch the group between modes; its compiled programs serve all three."""
    group = llm.engine.groups[0]
    group.overlap = mode == "async"
    steps = chain if mode == "chained" else 1
    group.runner.num_scheduler_steps = steps
    group.scheduler.num_lookahead_tokens = steps - 1


def run_once(llm: LLM, mode: str, chain: int, batch: int, tokens: int, seed: int) -> dict:
    group = llm.engine.groups[0]
    set_mode(llm, mode, chain)
    rng = np.random.default_rng(seed)
    prompts = [{"prompt_token_ids": rng.integers(100, llm.cfg.vocab_size, PROMPT_LEN).tolist()}
               for _ in range(batch)]
    clock = Clock(group.runner)
    try:
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True))
    finally:
        clock.close()
    stats = clock.stats()
    exposed = stats["host_ms"] * (stats["starved"] if mode == "async" else 1.0)
    stats["host_fraction"] = exposed / stats["period_ms"]
    return stats


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chain", type=int, default=4, help="decode steps a chained launch")
    args = ap.parse_args(argv)
    llm = LLM("smollm2", dtype=args.dtype, max_num_seqs=max(max(args.batches), 4),
              async_scheduling=True)
    if not llm.engine.groups[0].overlap:
        raise SystemExit("the engine's group cannot overlap steps (speculative or MA layout)")
    modes = ("sync", "async", "chained")
    for batch in args.batches:
        for mode in modes:  # warm-up: compile every shape of every mode
            run_once(llm, mode, args.chain, batch, 4, seed=0)
        runs = {mode: [] for mode in modes}
        for repeat in range(args.repeats):
            for mode in modes:
                stats = run_once(llm, mode, args.chain, batch, args.tokens,
                                 seed=1000 * batch + repeat)
                runs[mode].append(stats)
                print(json.dumps({"dtype": args.dtype, "batch": batch, "mode": mode,
                                  **{k: round(v, 4) for k, v in stats.items()}}), flush=True)
        line = {"dtype": args.dtype, "batch": batch, "chain": args.chain}
        for mode in modes:
            for key in ("tok_s", "host_ms", "host_fraction"):
                line[f"{mode}_{key}"] = round(statistics.median(r[key] for r in runs[mode]), 4)
        for mode in ("async", "chained"):
            line[f"{mode}_vs_sync"] = round(statistics.median(
                m["tok_s"] / s["tok_s"] for s, m in zip(runs["sync"], runs[mode], strict=True)),
                3)
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
