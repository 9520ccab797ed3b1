"""Bytes and latency of MoE dispatch/combine and A2E/E2A on 8..384 virtual devices.

Prints one JSON line per configuration:
``{"collective", "devices", "tokens_per_rank", "top_k", "hidden", "dtype", "bytes",
"min_payload_bytes", "bytes_over_min", "step_ms", "comm_ms", ...}``.
``bytes`` is what the fixed-capacity buffers move (all ranks, padding included);
``min_payload_bytes`` is top-k x tokens x hidden x dtype bytes. ``step_ms`` is a whole
dispatch + experts + combine step, ``comm_ms`` the same step with identity experts.
Latencies on virtual CPU devices measure XLA:CPU, not an interconnect: compare ratios.
Beyond 256 CPU devices the dispatch runs staged (see ``collectives.exchange``) and the
hidden size is capped at 16 to keep its all-gather simulation in memory.

    python -m benchmarks.bench_collectives --devices 64
"""

from __future__ import annotations

import argparse
import json
import os
import time


def _identity_experts(experts, x_SXD):
    return x_SXD


def _time(fn, repeats: int) -> float:
    import jax

    jax.block_until_ready(fn())  # compile and warm up
    start = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(fn())
    return 1e3 * (time.perf_counter() - start) / repeats


def bench_dispatch(n, tokens, top_k, hidden, dtype, int8, repeats):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh

    from collectives.ep_moe import EpMoe
    from collectives.expert_map import build_expert_map

    rng = np.random.default_rng(0)
    mesh = Mesh(np.array(jax.devices()[:n]), ("ep",))
    emap = build_expert_map(n, n, 1)
    w = {k: rng.normal(size=s).astype(np.float32) * 0.1 for k, s in
         {"gate": (n, hidden, 16), "up": (n, hidden, 16), "down": (n, 16, hidden)}.items()}
    ids = np.stack([rng.choice(n, top_k, replace=False) for _ in range(n * tokens)])
    x = rng.normal(size=(n * tokens, hidden)).astype(np.float32)
    gates = np.full((n * tokens, top_k), 1.0 / top_k, np.float32)
    out = {}
    for name, fn in (("step_ms", None), ("comm_ms", _identity_experts)):
        kw = {"expert_fn": fn} if fn else {}
        moe = EpMoe(mesh, emap, int8_dispatch=int8, **kw)
        weights = {k: moe.shard(v.astype(dtype)) for k, v in emap.physical_weights(w).items()}
        args = (weights, moe.shard(x.astype(dtype)), moe.shard(ids.astype(np.int32)),
                moe.shard(gates))
        out[name] = _time(lambda m=moe, a=args: m(*a), repeats)
    disp, comb = moe.stats.by_name("dispatch")[-1], moe.stats.by_name("combine")[-1]
    base = {"devices": n, "tokens_per_rank": tokens, "top_k": top_k, "hidden": hidden,
            "dtype": "int8" if int8 else str(jnp.dtype(dtype)), "staged": moe.staged,
            "capacity": disp.extra["capacity"], **out}
    return [dict(base, collective="dispatch", bytes=disp.bytes_moved,
                 min_payload_bytes=disp.payload_bytes,
                 bytes_over_min=round(disp.bytes_over_payload, 2)),
            dict(base, collective="combine", bytes=comb.bytes_moved,
                 min_payload_bytes=comb.payload_bytes,
                 bytes_over_min=round(comb.bytes_over_payload, 2))]


def bench_a2e(num_attn, num_expert, tokens, top_k, hidden, dtype, mode, repeats):
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from collectives.a2e import A2E
    from collectives.ep_moe import shard_from_host
    from collectives.expert_map import build_expert_map
    from collectives.stats import min_payload_bytes

    rng = np.random.default_rng(0)
    devs = jax.devices()
    attn = Mesh(np.array(devs[:num_attn]), ("dp",))
    exp = Mesh(np.array(devs[num_attn:num_attn + num_expert]), ("ep",))
    a2e = A2E(attn, exp, build_expert_map(num_expert, num_expert, 1), mode=mode)
    w = {k: (rng.normal(size=s) * 0.1).astype(dtype) for k, s in
         {"gate": (num_expert, hidden, 16), "up": (num_expert, hidden, 16),
          "down": (num_expert, 16, hidden)}.items()}
    t = num_attn * tokens
    on = NamedSharding(attn, P("dp"))
    args = (shard_from_host(rng.normal(size=(t, hidden)).astype(dtype), on),
            shard_from_host(np.stack([rng.choice(num_expert, top_k, replace=False)
                                      for _ in range(t)]).astype(np.int32), on),
            shard_from_host(np.full((t, top_k), 1.0 / top_k, np.float32), on))
    phys = a2e.place_experts(w)
    ms = _time(lambda: a2e(phys, *args), repeats)
    s = a2e.stats
    hop, back = s.by_name("a2e_hop")[-1], s.by_name("e2a_hop")[-1]
    disp, comb = s.by_name("dispatch")[-1], s.by_name("combine")[-1]
    payload = min_payload_bytes(t, top_k, hidden, np.dtype(dtype).itemsize)
    base = {"attention": num_attn, "experts": num_expert, "devices": num_attn + num_expert,
            "mode": mode, "tokens_per_rank": tokens, "top_k": top_k, "hidden": hidden,
            "dtype": str(np.dtype(dtype)), "step_ms": ms, "min_payload_bytes": payload}
    a2e_bytes, e2a_bytes = hop.bytes_moved + disp.bytes_moved, back.bytes_moved + comb.bytes_moved
    return [dict(base, collective="a2e", bytes=a2e_bytes, bytes_over_min=round(
                 a2e_bytes / payload, 2), hop_ms=1e3 * hop.seconds),
            dict(base, collective="e2a", bytes=e2a_bytes, bytes_over_min=round(
                 e2a_bytes / payload, 2), hop_ms=1e3 * back.seconds)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=8, help="virtual CPU devices (8..384)")
    parser.add_argument("--tokens", type=int, default=4, help="tokens per rank")
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    os.environ.setdefault("XDS_CPU_DEVICES", str(args.devices))
    from sharding.devices import configure_cpu_devices

    configure_cpu_devices(args.devices, collectives=True)
    import jax.numpy as jnp
    import numpy as np

    from collectives.exchange import XLA_CPU_MAX_COLLECTIVE_DEVICES

    n = args.devices
    hidden = args.hidden
    if n > XLA_CPU_MAX_COLLECTIVE_DEVICES:
        # The staged simulation all-gathers N x [N, C, D] per device: keep it in memory.
        hidden = min(hidden, 16)
    for dtype, int8 in ((jnp.bfloat16, False), (jnp.bfloat16, True)):
        for row in bench_dispatch(n, args.tokens, args.top_k, hidden, dtype, int8,
                                  args.repeats):
            print(json.dumps(row), flush=True)
    a = max(1, (3 * n) // 8)  # attention:expert ~ 3:5 (6 -> 10 on 16, 144 -> 240 on 384)
    e = min(n - a, 256)
    modes = ["trampoline"] + (["direct"] if a + e <= 256 else [])
    for mode in modes:
        for row in bench_a2e(a, e, args.tokens, args.top_k, hidden, np.float32, mode,
                             args.repeats):
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
