"""A bounded soak of a local ``xds serve``: random aborts, disconnects, stop strings, bad
requests (and injected faults where the build has ``--fault``), with nothing lost or leaked.

    python -m benchmarks.chaos --quick                 # 1,000 requests, at most a minute
    python -m benchmarks.chaos                         # 5,000 requests over a few minutes
    python -m benchmarks.chaos --fault group_crash:group=0:after_steps=50

It starts the server itself (the tiny config-only Llama by default: random weights and a byte
tokenizer, so text goes in and out), timing the start as the cost of a full restart, then sends a
mix of requests at bounded concurrency and sorts every one into: completed; cancelled by the
client on purpose (aborts, disconnects); failed with an error (an HTTP status and an OpenAI error
body, or an SSE error event: bad requests are meant to end here); lost (no answer, a malformed
one, a stream without ``[DONE]``, or a deadline passed). Lost must be 0. At the start and the end
it reads the server's RSS and its free KV blocks (``/metrics``); after the soak the engine must be
idle with every block free again. Recovery time, with faults: from the first failed good request
to the next completed one. Finally SIGTERM must drain and exit 0. Not run by ``make test``; the
exit status is 1 when anything was lost, leaked or the shutdown failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.chaos_requests import KINDS, Outcome, send

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = ROOT / "tests" / "golden" / "llama" / "config.json"


class ChaosError(RuntimeError):
    """The soak cannot run: a bad option, or a server that does not start."""


def fault_supported() -> bool:
    """Whether this build's ``xds serve`` takes ``--fault`` (fault injection, issue 14)."""
    from serving.entrypoints.cli_args import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return "--fault" in commands.choices["serve"]._option_string_actions


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args: argparse.Namespace, port: int) -> tuple[subprocess.Popen, float]:
    """Start ``xds serve``; return it and the seconds until ``/health`` answered 200."""
    command = [sys.executable, "-m", "serving.entrypoints.cli", "serve", "--model", args.model,
               "--port", str(port), "--request-timeout", "30", "--log-level", "warning",
               "--max-num-seqs", "16", "--kv-cache-gib", "0.02", "--shutdown-timeout", "30"]
    command += ["--dtype", args.dtype] if args.dtype else []
    for spec in args.fault or []:
        command += ["--fault", spec]
    command += args.serve_arg or []
    began = time.monotonic()
    server = subprocess.Popen(command, cwd=ROOT)
    url = f"http://127.0.0.1:{port}/health"
    while time.monotonic() - began < args.start_timeout:
        if server.poll() is not None:
            raise ChaosError(f"xds serve exited with status {server.returncode} while starting")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return server, time.monotonic() - began
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.kill()
    raise ChaosError(f"xds serve did not answer /health within {args.start_timeout} s")


def snapshot(url: str, pid: int) -> dict:
    """The server's RSS (MiB) and engine gauges from ``/metrics``."""
    text = httpx.get(url + "/metrics", timeout=10).text
    values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
              if not s.labels.keys() - {"model_name"}}
    keys = {"free_blocks": "xds:kv_cache_free_blocks", "total_blocks": "xds:kv_cache_total_blocks",
            "running": "xds:num_requests_running", "waiting": "xds:num_requests_waiting",
            "admitted": "xds:num_admitted_seqs"}
    stats = {name: int(values.get(metric, -1)) for name, metric in keys.items()}
    stats["faults"] = {k: v for k, v in values.items() if "fault" in k or "recover" in k}
    return stats | {"rss_mib": psutil.Process(pid).memory_info().rss / (1 << 20)}


async def soak(url: str, args: argparse.Namespace) -> list[Outcome]:
    """Send ``args.requests`` requests of random kinds, ``args.concurrency`` at a time, stopping
    early when ``args.duration`` seconds have passed."""
    rng = random.Random(args.seed)
    kinds, weights = zip(*KINDS.items(), strict=True)
    plan = [(rng.choice(range(1 << 30)), rng.choices(kinds, weights)[0])
            for _ in range(args.requests)]
    gate, outcomes = asyncio.Semaphore(args.concurrency), []
    deadline = time.monotonic() + args.duration
    limits = httpx.Limits(max_connections=args.concurrency * 2)
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=limits) as client:
        async def one(seed: int, kind: str) -> None:
            async with gate:
                if time.monotonic() < deadline:
                    outcomes.append(await send(client, kind, random.Random(seed)))

        await asyncio.gather(*(one(seed, kind) for seed, kind in plan))
    return outcomes


def recovery_windows(outcomes: list[Outcome]) -> list[float]:
    """Seconds from each first failed good request to the next completed good request."""
    good = sorted((o for o in outcomes if o.kind != "bad" and o.result != "cancelled"),
                  key=lambda o: o.ended)
    windows, failed_at = [], None
    for o in good:
        if o.result in ("failed", "lost") and failed_at is None:
            failed_at = o.ended
        elif o.result == "completed" and failed_at is not None:
            windows.append(o.ended - failed_at)
            failed_at = None
    return windows


def wait_idle(url: str, pid: int, seconds: float = 60) -> dict:
    """The snapshot once nothing runs or waits (or after ``seconds``)."""
    end = time.monotonic() + seconds
    while True:
        stats = snapshot(url, pid)
        if (stats["running"], stats["waiting"], stats["admitted"]) == (0, 0, 0) or \
                time.monotonic() > end:
            return stats
        time.sleep(0.5)


def report(outcomes: list[Outcome], start: dict, end: dict, restart_s: float,
           windows: list[float], wall_s: float, exit_code: int | None) -> list[str]:
    """The printed summary; returns the problems found (empty when the soak passed)."""
    results = Counter(o.result for o in outcomes)
    errors = Counter(o.detail for o in outcomes if o.result == "failed")
    unexpected = [o for o in outcomes if o.unexpected]
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(Counter(o.kind for o in outcomes).items()))
    print(f"requests sent           {len(outcomes)} in {wall_s:.1f} s ({kinds})")
    print(f"completed               {results['completed']}")
    print(f"cancelled by the client {results['cancelled']} (aborts and disconnects on purpose)")
    print(f"failed with an error    {results['failed']}")
    for detail, count in errors.most_common(8):
        print(f"    {count:6d}  {detail}")
    print(f"lost                    {results['lost']}")
    for o in [o for o in outcomes if o.result == "lost"][:5]:
        print(f"    {o.kind}: {o.detail}")
    print(f"unexpected answers      {len(unexpected)} (bad requests served, good ones refused)")
    for o in unexpected[:5]:
        print(f"    {o.kind}: {o.detail}")
    print(f"server RSS (MiB)        start {start['rss_mib']:.0f}, end {end['rss_mib']:.0f} "
          f"({end['rss_mib'] - start['rss_mib']:+.0f})")
    print(f"free KV blocks          start {start['free_blocks']}/{start['total_blocks']}, "
          f"end {end['free_blocks']}/{end['total_blocks']}")
    print(f"full restart            {restart_s:.1f} s (process start to /health 200)")
    if end["faults"]:
        print(f"fault counters          {end['faults']}")
        print("recovery (s)            " + (", ".join(f"{w:.2f}" for w in windows) or "none"))
    print(f"SIGTERM drain exit      {exit_code}")
    problems = []
    if results["lost"]:
        problems.append(f"{results['lost']} requests lost")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected answers")
    if (end["running"], end["waiting"], end["admitted"]) != (0, 0, 0):
        problems.append(f"work left after the soak: {end}")
    if end["free_blocks"] != end["total_blocks"] or end["free_blocks"] != start["free_blocks"]:
        problems.append("KV blocks leaked")
    if exit_code != 0:
        problems.append(f"xds serve exited with {exit_code} after SIGTERM")
    return problems


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.chaos",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="1000 requests, 16 at a time, at most 60 s")
    parser.add_argument("--requests", type=int, default=5000, help="requests to send (5000)")
    parser.add_argument("--concurrency", type=int, default=32, help="in flight at once (32)")
    parser.add_argument("--duration", type=float, default=600,
                        help="stop sending after this many seconds (600)")
    parser.add_argument("--model", default=str(TINY_MODEL),
                        help="model to serve (default: the tiny config-only Llama)")
    parser.add_argument("--dtype", default="float32", help="(default: float32)")
    parser.add_argument("--fault", action="append", metavar="SPEC",
                        help="passed to `xds serve --fault` (repeatable), e.g. "
                        "group_crash:group=0:after_steps=50; needs a build with fault injection")
    parser.add_argument("--serve-arg", action="append", metavar="ARG",
                        help="one more argument for xds serve (repeatable)")
    parser.add_argument("--start-timeout", type=float, default=300)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.requests, args.concurrency, args.duration = 1000, 16, 60
    if args.fault and not fault_supported():
        print("chaos: error: this build's `xds serve` has no --fault option (fault injection, "
              "issue 14 item 2, is not merged here); run without --fault", file=sys.stderr)
        return 2
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    try:
        server, restart_s = start_server(args, port)
    except ChaosError as error:
        print(f"chaos: error: {error}", file=sys.stderr)
        return 1
    try:
        start = wait_idle(url, server.pid)
        began = time.monotonic()
        outcomes = asyncio.run(soak(url, args))
        wall_s = time.monotonic() - began
        end = wait_idle(url, server.pid)
        server.send_signal(signal.SIGTERM)
        try:
            exit_code = server.wait(60)
        except subprocess.TimeoutExpired:
            exit_code = None
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    problems = report(outcomes, start, end, restart_s, recovery_windows(outcomes), wall_s,
                      exit_code)
    print(json.dumps({"passed": not problems, "problems": problems}))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
