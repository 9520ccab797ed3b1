"""Plots of ``xds bench`` results (matplotlib, Agg): latency CDFs per request rate, with the
p50/p90/p99 of each marked, and, when several rates ran, throughput, achieved request rate and
latency against the offered rate. The title says how many requests were sent and how many
failed, since the curves are drawn from the successful ones only."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

CDF_PANELS = (("ttfts", "Time to first token"), ("tpots", "Time per output token"),
              ("itls", "Inter-token latency"), ("e2els", "End-to-end latency"))
MARKS = ((50, "o"), (90, "s"), (99, "^"))  # percentiles marked on each CDF


def _samples_ms(run: dict, key: str) -> np.ndarray:
    """Successful requests' samples of ``key`` in milliseconds (TPOT derived per request)."""
    ok = [i for i, error in enumerate(run["errors"]) if not error]
    if key == "itls":
        values = [gap for i in ok for gap in run["itls"][i]]
    elif key == "tpots":
        values = [(run["e2els"][i] - run["ttfts"][i]) / (run["output_lens"][i] - 1)
                  for i in ok if run["output_lens"][i] > 1]
    else:
        values = [run[key][i] for i in ok]
    return np.sort(np.asarray(values, dtype=float)) * 1000


def _rate(run: dict) -> float:
    rate = run["request_rate"]
    return math.inf if rate == "inf" else float(rate)


def _label(run: dict) -> str:
    label = f"{run['request_rate']} req/s"
    label += f", ≤{run['max_concurrency']} in flight" if run["max_concurrency"] else ""
    return label + f" ({run['completed']}/{run['num_requests']} ok)"


def plot_title(runs: list[dict]) -> str:
    sent = sum(r["num_requests"] for r in runs)
    failed = sum(r["failed"] for r in runs)
    per_rate = f" over {len(runs)} rates" if len(runs) > 1 else ""
    return (f"xds bench: {runs[0]['model_id']} {runs[0]['endpoint']}, {sent} requests{per_rate}"
            f", {sent - failed} completed, {failed} failed")


def _mark_percentiles(ax, values: np.ndarray, color: str) -> None:
    """Dots at the p50/p90/p99 of a sorted sample on its CDF, each labelled with its value."""
    for p, marker in MARKS:
        x = float(np.percentile(values, p))
        ax.plot([x], [p / 100], marker=marker, color=color, markersize=6, linestyle="none")
        ax.annotate(f"p{p} {x:.3g}", (x, p / 100), textcoords="offset points", xytext=(5, -10),
                    fontsize="x-small", color=color)


def plot_results(runs: list[dict], path: str | Path) -> Path:
    """Write one PNG: a CDF panel per latency metric (one line per run) and, for several runs,
    throughput and median/p99 latency against the request rate (``inf`` drawn rightmost)."""
    sweep = len(runs) > 1
    fig, axes = plt.subplots(2, 3 if sweep else 2, figsize=(15 if sweep else 10, 8))
    grid = axes.reshape(-1)
    cdf_axes = [grid[0], grid[1], grid[3 if sweep else 2], grid[4 if sweep else 3]]
    for ax, (key, title) in zip(cdf_axes, CDF_PANELS, strict=True):
        for run in runs:
            values = _samples_ms(run, key)
            if values.size:
                line, = ax.step(values, np.arange(1, values.size + 1) / values.size,
                                where="post", label=_label(run))
                _mark_percentiles(ax, values, line.get_color())
            elif not run["completed"]:
                ax.plot([], [], label=_label(run) + ": no samples")
        ax.set(title=f"{title} (CDF)", xlabel="ms", ylabel="fraction of samples", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    if sweep:
        _plot_sweep(grid[2], grid[5], runs)
    fig.suptitle(plot_title(runs))
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plot_sweep(throughput_ax, latency_ax, runs: list[dict]) -> None:
    runs = sorted(runs, key=_rate)
    finite = [_rate(r) for r in runs if not math.isinf(_rate(r))]
    inf_x = (max(finite) * 2 if finite else 1.0)
    xs = [inf_x if math.isinf(_rate(r)) else _rate(r) for r in runs]
    ticks = [str(r["request_rate"]) for r in runs]
    throughput_ax.plot(xs, [r["output_throughput"] for r in runs], "o-", label="output tok/s")
    throughput_ax.plot(xs, [r["total_token_throughput"] for r in runs], "s--",
                       label="total tok/s")
    requests_ax = throughput_ax.twinx()
    requests_ax.plot(xs, [r["request_throughput"] for r in runs], "^:", color="tab:red",
                     label="completed req/s")
    achieved = [inf_x if r["achieved_request_rate"] == "inf" else r["achieved_request_rate"]
                for r in runs]
    requests_ax.plot(xs, achieved, "v-.", color="tab:purple", label="achieved (sent) req/s")
    requests_ax.set_ylabel("requests/s")
    throughput_ax.set(title="Throughput vs offered request rate",
                      xlabel="offered request rate (req/s)", ylabel="tokens/s")
    for name, style in (("ttft", "o-"), ("tpot", "s-"), ("itl", "^-")):
        latency_ax.plot(xs, [r[f"median_{name}_ms"] for r in runs], style,
                        label=f"median {name.upper()}")
        latency_ax.plot(xs, [r[f"p99_{name}_ms"] for r in runs], style.replace("-", "--"),
                        label=f"p99 {name.upper()}")
    latency_ax.set(title="Latency vs offered request rate", xlabel="offered request rate (req/s)",
                   ylabel="ms", yscale="log")
    for ax in (throughput_ax, latency_ax):
        ax.set_xticks(xs, ticks)
        ax.grid(alpha=0.3)
    lines = throughput_ax.get_legend_handles_labels()
    more = requests_ax.get_legend_handles_labels()
    throughput_ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize="small")
    latency_ax.legend(fontsize="small")
