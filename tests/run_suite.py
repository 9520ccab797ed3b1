"""`make test`: the suite's pytest processes, a few at a time, each printed whole when it ends.

JAX fixes the number of virtual CPU devices when it starts, so tests needing 16, 64 or 384
devices run in processes of their own; the 8-device tests run in seven processes (so that the
lanes end together; a process compiling thousands of programs also neared Linux's limit on
memory mappings, where XLA:CPU segfaults: `tests/conftest.py` now frees them). Most of a test's
time is single-threaded compiling, and a process waits at times (on a server or child process
it started, a fault's timeout), so one process more than the cores runs at once (three on a
2-core machine: 813 s against 1007 s two at a time), no more than one per 6 GiB of memory,
and a process starts only while the measured peaks of those running and its own fit in 85% of
the memory (``PEAK_GIB``): the 384-device process (13-14.5 GB at its peak), last in the order,
runs beside small ones only. The order is the one that ends the lanes soonest with measured
times. Each process runs under ``tests/run_pytest.sh`` (a native crash is summarised and the
process run once more), and its time, CPU time and peak memory are printed.

    python tests/run_suite.py [--jobs N] [NAME ...]    # names: see PROCESSES

Exits non-zero if any process failed; its last line sums the processes' closing lines.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOT_MESH = "not mesh16 and not mesh64 and not mesh384"
# Each process's peak memory in GiB (measured, rounded up): a process starts only while the
# peaks of those running and its own fit in MEMORY_SHARE of the machine's memory (or when it
# would run alone), so the 384-device one runs beside small processes only.
PEAK_GIB = {"serving-a-l": 4, "serving-s": 7.5, "xds_jax-m-z": 5, "mesh16": 3, "xds_jax-a-l": 5,
            "serving-m-r": 2.5, "rest": 10.5, "serving-t-z": 3, "mesh64": 0.5, "mesh384": 14.5}
MEMORY_SHARE = 0.85
NEW_PEAK_GIB = 5  # a process not measured yet


def peak_gib(name: str) -> float:
    return PEAK_GIB.get(name, NEW_PEAK_GIB)



def serving(pattern: str) -> list[str]:
    """The serving test files whose names match ``pattern``, as pytest arguments."""
    return files("tests/serving", pattern)


def files(folder: str, pattern: str) -> list[str]:
    """The test files under ``folder`` whose names match ``pattern``, as pytest arguments."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / folder).glob(pattern))


def marked(marker: str) -> list[str]:
    """The test files that name ``marker`` (the rest would only be imported to be deselected:
    ~5 s of a process's start)."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
                  if marker in p.read_text())


# name -> (virtual CPU devices, pytest arguments), in the order they start: the order that
# ends three lanes soonest with these times (seconds in a run on 2026-12-06's 2-core Intel
# machine, three at a time, the compilation cache on and cold: a-l 444, s 434, xds_jax m-z
# 400 and a-l 290 (699 as one process), m-r 220, mesh16 202, rest 113, mesh384 64, t-z 25,
# mesh64 4: 813 s in all, the rest started last; 1007 s two at a time). The serving tests
# run in four processes (XLA:CPU segfaulted late in a process that ran the m-z files: the
# process had reached vm.max_map_count, see tests/conftest.py), the model and loader tests in
# two (one was the suite's longest process), the other tests in one.
PROCESSES = {
    "serving-a-l": (8, ["-m", NOT_MESH, *serving("test_[a-l]*.py")]),
    "serving-s": (8, ["-m", NOT_MESH, *serving("test_s*.py")]),
    "xds_jax-m-z": (8, ["-m", NOT_MESH, *files("tests/xds_jax", "test_[m-z]*.py")]),
    "mesh16": (16, ["-m", "mesh16", *marked("mesh16")]),
    "xds_jax-a-l": (8, ["-m", NOT_MESH, *files("tests/xds_jax", "test_[a-l]*.py")]),
    "serving-m-r": (8, ["-m", NOT_MESH, *serving("test_[m-r]*.py")]),
    "rest": (8, ["-m", NOT_MESH, "--ignore=tests/serving", "--ignore=tests/xds_jax"]),
    "serving-t-z": (8, ["-m", NOT_MESH, *serving("test_[t-z]*.py")]),
    "mesh64": (64, ["-m", "mesh64", *marked("mesh64")]),
    "mesh384": (384, ["-m", "mesh384", *marked("mesh384")]),
}
NO_TESTS = 5  # pytest's exit code when a marker selects nothing: not a failure
CLOSING = re.compile(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)")


def run(name: str, out: dict, lock: threading.Lock) -> None:
    devices, args = PROCESSES[name]
    env = {**os.environ, "XDS_CPU_DEVICES": str(devices)}
    # --capture=sys: Python's output is captured per test as usual, native writes to fd 2 are
    # not, so XLA's fatal message (F... rendezvous.cc: Termination timeout ...) reaches the log
    # when a process aborts (fd capture kept it in a buffer the abort discarded).
    cmd = [str(ROOT / "tests/run_pytest.sh"), sys.executable, "-m", "pytest", "--durations=10",
           "--capture=sys", *args]
    start = time.monotonic()
    with lock:
        print(f"===== {name}: started", flush=True)
    with tempfile.TemporaryFile("w+") as log:
        child = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = rc = os.waitstatus_to_exitcode(status)
        log.seek(0)
        text = log.read()
    seconds = time.monotonic() - start
    if rc == NO_TESTS:
        rc = 0
    with lock:
        print(f"\n===== {name}: {' '.join(cmd[1:])} (XDS_CPU_DEVICES={devices})", flush=True)
        print(text, end="", flush=True)
        print(f"===== {name}: exit {rc} after {seconds:.0f} s, {usage.ru_utime:.0f} s CPU, "
              f"peak memory {usage.ru_maxrss / 2**20:.1f} GiB", flush=True)
        out[name] = (rc, seconds, text)


def memory_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def default_jobs() -> int:
    """One process more than the cores (a process waits at times: on a server it started, a
    fault's timeout, a child process; two at a time left a 2-core machine's cores idle for
    about a quarter of the suite), no more than one per 6 GiB of memory (an 8-device process
    peaks at 2-4 GiB) and at least two."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(2, min((cores or 1) + 1, int(memory_gib() // 6)))


def closing_counts(text: str) -> dict[str, int]:
    """The counts of pytest's closing line (the last line naming any)."""
    for line in reversed(text.splitlines()):
        found = CLOSING.findall(line)
        if found and (" in " in line or line.startswith("=")):
            return {word.rstrip("s") if word.startswith("error") else word: int(n)
                    for n, word in found}
    return {}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=int(os.environ.get("XDS_TEST_JOBS", 0)),
                    help="pytest processes at once (default $XDS_TEST_JOBS, else one more "
                         "than the CPU cores, at most one per 6 GiB of memory)")
    ap.add_argument("names", nargs="*",
                    help=f"processes to run (default all: {', '.join(PROCESSES)})")
    args = ap.parse_args(argv)
    unknown = [n for n in args.names if n not in PROCESSES]
    if unknown:
        ap.error(f"unknown process {', '.join(unknown)}; choose from {', '.join(PROCESSES)}")
    if args.jobs < 0:
        ap.error(f"--jobs must be >= 1 (0: the default), got {args.jobs}")
    args.jobs = args.jobs or default_jobs()
    names = args.names or list(PROCESSES)
    out: dict = {}
    lock = threading.Lock()
    start = time.monotonic()
    pending = list(names)
    running: dict[str, threading.Thread] = {}
    budget = MEMORY_SHARE * memory_gib()
    while pending or running:
        running = {n: t for n, t in running.items() if t.is_alive()}
        used = sum(peak_gib(n) for n in running)
        fits = [n for n in pending if not running or used + peak_gib(n) <= budget]
        if fits and len(running) < args.jobs:
            pending.remove(fits[0])
            running[fits[0]] = threading.Thread(target=run, args=(fits[0], out, lock))
            running[fits[0]].start()
        else:
            time.sleep(0.2)
    totals: dict[str, int] = {}
    print("\n===== test processes")
    for name in names:
        rc, seconds, text = out[name]
        counts = closing_counts(text)
        if rc and not counts.get("failed") and not counts.get("error"):
            counts["error"] = 1  # crashed, or stopped before its closing line
        for word, n in counts.items():
            totals[word] = totals.get(word, 0) + n
        print(f"  {name:12s} exit {rc:3d}  {seconds:5.0f} s  "
              + ", ".join(f"{n} {w}" for w, n in counts.items()))
    failed = [n for n in names if out[n][0] != 0]
    print(f"  wall time {time.monotonic() - start:.0f} s"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    print(f"{totals.get('passed', 0)} passed, {totals.get('failed', 0) + totals.get('error', 0)} "
          f"failed, {totals.get('skipped', 0)} skipped", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
