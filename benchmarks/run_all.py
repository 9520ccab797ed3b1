"""``make bench``: every benchmark, each in its own process (they fix different virtual device
counts before JAX starts). Each prints its JSON lines and ratios; for a benchmark's own
options run its module directly.

    python -m benchmarks.run_all [--only compare,prefix,collectives,ma,spec]
"""

from __future__ import annotations

import argparse
import subprocess
import sys

BENCHMARKS = {
    # xds-jax vs transformers (the `golden` extra; without it, xds-jax rows only)
    "compare": ["benchmarks.compare"],
    "prefix": ["benchmarks.bench_engine"],
    "collectives": ["benchmarks.bench_collectives", "--devices", "64"],
    "ma": ["benchmarks.bench_ma"],
    # SmolLM2 with and without MTP speculation (the shipped draft head), batch 1, 8, 32
    "spec": ["benchmarks.bench_spec"],
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(BENCHMARKS),
                    help="comma-separated subset of: " + ", ".join(BENCHMARKS))
    args = ap.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        ap.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    failed = []
    for name in names:
        print(f"# {name}", flush=True)
        code = subprocess.call([sys.executable, "-m", *BENCHMARKS[name]])
        if code:
            failed.append(name)
    if failed:
        print(f"# failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
