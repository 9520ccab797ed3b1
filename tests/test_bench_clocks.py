"""The decode clocks of ``benchmarks.compare`` and ``benchmarks.bench_host`` on hand-worked
timelines: with asynchronous scheduling the first decode step is launched while the prefill
still runs, and its launch must not start the decode span (it had counted the prefill as
decode time, reporting a sixth of the rate below); and the batch's rate is its steps that
decode every row (under chunked prefill the first prompts' rows finish a few steps early)."""

from __future__ import annotations

import types

import pytest

from benchmarks import bench_host, compare


def _runner():
    return types.SimpleNamespace(launch=lambda *a, **k: [], finish=lambda handle: None)


# (decode?, launch, wait, end, tokens): a 0.3 s prefill, then three decode steps of 8 rows
# 20 ms apart; the first decode step launched 1 ms in, beside the prefill (asynchronous).
ASYNC = [(False, 0.000, 0.290, 0.300, 512), (True, 0.001, 0.015, 0.320, 8),
         (True, 0.301, 0.016, 0.340, 8), (True, 0.321, 0.017, 0.360, 8)]
# The same steps scheduled synchronously: each decode launched after the step before ends.
SYNC = [(False, 0.000, 0.290, 0.300, 512), (True, 0.300, 0.017, 0.320, 8),
        (True, 0.320, 0.017, 0.340, 8), (True, 0.340, 0.017, 0.360, 8)]


@pytest.mark.parametrize("timeline", [ASYNC, SYNC])
def test_compare_clock_counts_decode_from_the_first_decode_steps_end(timeline):
    clock = compare.StepClock(_runner())
    clock.steps = [{"decode": d, "start": s, "wait": w, "end": e, "tokens": n,
                    "cpu_start": s, "cpu_end": e / 10} for d, s, w, e, n in timeline]
    rate, host, cpu = clock.decode_stats(8)
    assert rate == pytest.approx(16 / 0.040)  # steps 2 and 3 over their 40 ms
    assert host == pytest.approx(1 - (timeline[2][2] + timeline[3][2]) / 0.040)
    assert cpu == pytest.approx(0.1)


def test_compare_clock_rates_the_batch_on_the_steps_that_decode_every_row():
    # then the rows that started first finish: steps of 5 and 2 rows, slower per token
    tail = SYNC + [(True, 0.360, 0.016, 0.380, 5), (True, 0.380, 0.005, 0.400, 2)]
    clock = compare.StepClock(_runner())
    clock.steps = [{"decode": d, "start": s, "wait": w, "end": e, "tokens": n,
                    "cpu_start": s, "cpu_end": e} for d, s, w, e, n in tail]
    rate, host, _ = clock.decode_stats(8)
    assert rate == pytest.approx(16 / 0.040)
    assert host == pytest.approx(1 - 0.034 / 0.040)


@pytest.mark.parametrize("timeline", [ASYNC, SYNC])
def test_bench_host_clock_starts_decode_at_the_prefills_end(timeline):
    clock = bench_host.Clock(_runner())
    clock.steps = [{"decode": d, "start": s, "wait": w, "end": e, "tokens": n, "programs": 1,
                    "starved": False} for d, s, w, e, n in timeline]
    stats = clock.stats()
    assert stats["tok_s"] == pytest.approx(24 / 0.060)  # three steps from 0.300 to 0.360
    assert stats["period_ms"] == pytest.approx(20.0)
    waits = sum(step[2] for step in timeline[1:])
    assert stats["host_ms"] == pytest.approx(1e3 * (0.060 - waits) / 3)
