"""Matmul ceilings at SmolLM2-135M's shapes: XLA with weights ``[K, N]`` and ``[N, K]``, torch.

For each matmul shape of the model (``K x N``: 576x576 q and o, 576x384 kv, 576x3072 gate/up,
1536x576 down, 576x49152 the tied head), dtype (float32, bfloat16 and int8, accumulating in
float32 / int32) and row count ``M``, one call contracts ``x [M, K]`` with ``--mb`` MB of
distinct weights of that shape (no cache reuse). The variants (XLA ``dot_general`` on a
``[K, N]`` weight, on a ``[N, K]`` weight, xds-jax's CPU kernel on the ``[N, K]`` weight
for bfloat16, float32 (AVX-512) and int8 at the rows it takes (``cpu_matmul.max_rows``), and
torch ``F.linear``
with 2 threads) are timed alternately in one process, best of ``--rounds``: the machine is
shared. One JSON line per shape, dtype and rows (GB/s of weight bytes, GFLOP/s), then one
per dtype and rows with the shapes weighed by their bytes in the model (the rate a whole
step's matmuls would run at), then a 2048-cube matmul (XLA, torch, numpy).
``docs/performance.md`` holds a run and what it says about issue #11's targets. Usage:
``python -m benchmarks.bench_matmul [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as benchmarks.compare: torch shares cores

import jax
import jax.numpy as jnp
import numpy as np

from xds_jax.kernels import cpu_matmul

LAYERS = 30
SHAPES = {(576, 576): 2 * LAYERS, (576, 384): LAYERS, (576, 3072): LAYERS,
          (1536, 576): LAYERS, (576, 49152): 1}  # (K, N): matrices of that shape in the model
ITEMSIZE = {"float32": 4, "bfloat16": 2, "int8": 1}


def best_times(variants: dict, rounds: int) -> dict:
    """Best seconds per variant, the variants called alternately (order reversed every round)."""
    for fn in variants.values():
        fn()  # compile / warm up
    best = {}
    items = list(variants.items())
    for r in range(rounds):
        for name, fn in items if r % 2 == 0 else items[::-1]:
            start = time.perf_counter()
            fn()
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
    return best


def xla_call(x, ws: list, transposed: bool):
    acc = jnp.int32 if x.dtype == jnp.int8 else jnp.float32
    dims = (((1,), (1 if transposed else 0,)), ((), ()))
    f = jax.jit(lambda x, ws: [jax.lax.dot_general(x, w, dims, preferred_element_type=acc)
                               for w in ws])
    return lambda: jax.block_until_ready(f(x, ws))


def kernel_call(x, ws_NK: list):
    """xds-jax's few-row kernel (``xds_jax.kernels``) on ``[N, K]`` weights. int8 rows go in as
    the float32 rows the model splits in 16-bit halves there (``quant.int8_matmul``), the work
    it does: the split and twice ``xla_NK``'s multiply-adds at the same rows (XLA runs the
    halves as 2M rows)."""
    if x.dtype == jnp.int8:
        from xds_jax.model.quant import _ACT_LIMIT

        x32 = x.astype(jnp.float32)
        f = jax.jit(lambda x, ws: [cpu_matmul.few_row_int8_matmul(
            x, w, jnp.ones((w.shape[0],), jnp.float32), _ACT_LIMIT) for w in ws])
        return lambda: jax.block_until_ready(f(x32, ws_NK))
    f = jax.jit(lambda x, ws: [cpu_matmul.few_row_matmul(x, w) for w in ws])
    return lambda: jax.block_until_ready(f(x, ws_NK))


def torch_call(x, ws_NK: list):
    import torch

    def run():
        with torch.inference_mode():
            return [torch.nn.functional.linear(x, w) for w in ws_NK]

    return run


def shape_rates(k: int, n: int, dtype: str, rows: list[int], mb: float, rounds: int,
                torch) -> list[dict]:
    count = max(1, int(mb * 2**20 / (k * n * ITEMSIZE[dtype])))
    rng = np.random.default_rng(0)
    if dtype == "int8":
        host = [rng.integers(-127, 127, (k, n), dtype=np.int8) for _ in range(count)]
    else:
        host = [rng.standard_normal((k, n), dtype=np.float32) for _ in range(count)]
    ws_KN = [jnp.asarray(w).astype(dtype) for w in host]
    ws_NK = [jnp.asarray(np.ascontiguousarray(w.T)).astype(dtype) for w in host]
    torch_ws = None
    if torch is not None and dtype != "int8":
        tdt = torch.float32 if dtype == "float32" else torch.bfloat16
        torch_ws = [torch.from_numpy(np.ascontiguousarray(w.T)).to(tdt) for w in host]
    nbytes = count * k * n * ITEMSIZE[dtype]
    lines = []
    for m in rows:
        if dtype == "int8":
            x = jnp.asarray(rng.integers(-127, 127, (m, k)), jnp.int8)
        else:
            x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32).astype(dtype)
        variants = {"xla_KN": xla_call(x, ws_KN, False), "xla_NK": xla_call(x, ws_NK, True)}
        # int8 rows go in as float32 (kernel_call), which is what applies_int8 takes
        if cpu_matmul.applies(x, ws_NK[0], True) or cpu_matmul.applies_int8(
                x.astype(jnp.float32), ws_NK[0], True):
            variants["xds_kernel"] = kernel_call(x, ws_NK)
        if torch_ws is not None:
            tx = torch.tensor(np.asarray(x.astype(jnp.float32))).to(torch_ws[0].dtype)
            variants["torch"] = torch_call(tx, torch_ws)
        best = best_times(variants, rounds)
        line = {"shape": f"{k}x{n}", "dtype": dtype, "rows": m}
        for name, t in best.items():
            line[name] = {"GBps": round(nbytes / t / 1e9, 2),
                          "GFLOPs": round(2 * m * k * n * count / t / 1e9, 1)}
        lines.append(line)
    return lines


def model_mix(lines: list[dict]) -> list[dict]:
    """Per dtype and rows: each variant's rate over the model's matmuls (shapes by bytes)."""
    params = sum(k * n * c for (k, n), c in SHAPES.items())
    out = []
    for dtype, m in dict.fromkeys((ln["dtype"], ln["rows"]) for ln in lines):
        group = {ln["shape"]: ln for ln in lines if ln["dtype"] == dtype and ln["rows"] == m}
        line = {"model_mix": dtype, "rows": m}
        for name in ("xla_KN", "xla_NK", "xds_kernel", "torch"):
            if not all(name in group[f"{k}x{n}"] for k, n in SHAPES):
                continue
            seconds = sum(k * n * c * ITEMSIZE[dtype] / (group[f"{k}x{n}"][name]["GBps"] * 1e9)
                          for (k, n), c in SHAPES.items())
            line[name] = {"GBps": round(params * ITEMSIZE[dtype] / seconds / 1e9, 2),
                          "GFLOPs": round(2 * m * params / seconds / 1e9, 1)}
        out.append(line)
    return out


def cube_call(a):
    acc = jnp.int32 if a.dtype == jnp.int8 else jnp.float32
    f = jax.jit(lambda a, b: jax.lax.dot(a, b, preferred_element_type=acc))
    return lambda: jax.block_until_ready(f(a, a))


def cube_rates(size: int, rounds: int, torch) -> list[dict]:
    lines = []
    rng = np.random.default_rng(0)
    for dtype in ITEMSIZE:
        if dtype == "int8":
            a = jnp.asarray(rng.integers(-127, 127, (size, size)), jnp.int8)
        else:
            a = jnp.asarray(rng.standard_normal((size, size)), jnp.float32).astype(dtype)
        variants = {"xla": cube_call(a)}
        if torch is not None and dtype != "int8":
            t = torch.tensor(np.asarray(a.astype(jnp.float32)))
            t = t.to(torch.float32 if dtype == "float32" else torch.bfloat16)
            variants["torch"] = lambda t=t: t @ t
        if dtype == "float32":
            na = np.asarray(a)
            variants["numpy"] = lambda na=na: na @ na
        best = best_times(variants, rounds)
        lines.append({"cube": size, "dtype": dtype,
                      **{name: {"GFLOPs": round(2 * size**3 / t / 1e9, 1)}
                         for name, t in best.items()}})
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", nargs="+", default=list(ITEMSIZE), choices=list(ITEMSIZE))
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 32, 512])
    ap.add_argument("--mb", type=float, default=64, help="MB of distinct weights per call")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="3 rounds of 16 MB per shape")
    args = ap.parse_args(argv)
    if args.quick:
        args.mb, args.rounds = 16, 3
    try:
        import torch

        torch.set_num_threads(2)
    except ImportError:
        torch = None
        print(json.dumps({"torch": "not installed: XLA variants only"}), flush=True)
    lines = []
    for dtype in args.dtypes:
        for k, n in SHAPES:
            for line in shape_rates(k, n, dtype, args.rows, args.mb, args.rounds, torch):
                print(json.dumps(line), flush=True)
                lines.append(line)
    for line in model_mix(lines) + cube_rates(2048, args.rounds, torch):
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
