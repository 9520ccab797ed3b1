"""EPLB on a skewed expert trace: device load, MoE stage time and swap time, without and with
rebalancing, through the serving code (one MA domain's ``A2E`` and ``ExpertRebalancer``).

The trace (``skewed_trace``) follows xDeepServe's Fig. 11a: ``--hot-fraction`` of the experts
(20%) get more than the mean load, the hottest ``--hot-ratio`` (30x) the mean, the rest share
what is left evenly; every token picks K distinct experts with exactly those inclusion
probabilities (systematic sampling over a shuffled expert order), so per-expert counts follow
the profile. The model is configs/models/deepseek-v3-tiny.json (256 routed experts, K = 8,
random weights); the deployment gives the domain, the expert devices and the slots.

Per deployment (``--quick``: cpu16-ma only; otherwise cpu16-ma and cm384 on 384 devices):

1. **before**: the deployment's map (expert e on slot e, spare slots round-robin). Tokens of
   one domain (``--tokens`` per rank) go through A2E to the experts; the smallest capacity
   bucket that does not overflow is found (what serving's ``CapacityPolicy`` settles on), then
   the MoE stage (dispatch, experts, combine inside the expert mesh) is timed at it
   (``moe_ms``) and at the exact capacity the fullest (source, destination) pair needs
   (``moe_ms_tight``: the fixed-capacity buffers are what balance shrinks). Times are medians
   (and ``moe_min_ms``) of ``--iters`` rounds that alternate before and after. Device
   load = rows each expert device received (``LocalStats.slot_tokens_S``); imbalance = max /
   mean.
2. **EPLB**: counts per logical expert over ``--slices`` time slices of the trace give a map
   (``collectives.eplb.rebalance``, every spare slot as a redundant replica); the
   ``ExpertRebalancer`` swaps it in (map off, shards of changed devices rebuilt from host
   weights with ``device_put``, map on): ``swap_ms`` is start to ready (on the swap's
   thread), ``stall_ms`` what the stepping thread spends (switching prepared arrays in).
3. **after**: the same tokens, capacity search and timing with the new map and weights;
   ``outputs_identical``: the E2A'd outputs of 1 and 3 are bitwise equal.

The last line is one JSON object (the last deployment run, and ``by_deployment``). Times on
virtual CPU devices measure XLA:CPU on a shared host: read the ratios.

    python -m benchmarks.bench_eplb [--quick] [--hot-ratio 30] [--hot-fraction 0.2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np

MODEL = "configs/models/deepseek-v3-tiny.json"
DEPLOYMENTS = {"cpu16-ma": ("configs/deployments/cpu16-ma.yaml", 64),
               "cm384": ("configs/deployments/cm384.yaml", 8)}  # default tokens per rank


def skewed_profile(num_experts: int, hot_fraction: float, hot_ratio: float) -> np.ndarray:
    """``[E]`` expected load per expert, mean 1: a power law over the hot experts from
    ``hot_ratio`` down to just above 1, the cold ones level below 1."""
    hot = max(1, round(hot_fraction * num_experts))
    a = np.log(hot_ratio / 1.05) / np.log(hot) if hot > 1 else 0.0
    w_hot = hot_ratio * np.arange(1, hot + 1, dtype=np.float64) ** -a
    cold = (num_experts - w_hot.sum()) / max(1, num_experts - hot)
    if not 0 < cold < 1:
        raise ValueError(f"hot_fraction {hot_fraction} with hot_ratio {hot_ratio} leaves the "
                         f"cold experts a load of {cold:.2f} x the mean; lower one of them")
    return np.concatenate([w_hot, np.full(num_experts - hot, cold)])


def skewed_trace(tokens: int, num_experts: int, top_k: int, hot_fraction: float,
                 hot_ratio: float, seed: int) -> np.ndarray:
    """``[tokens, K]`` distinct expert ids per token following ``skewed_profile`` (hot experts
    at random ids)."""
    rng = np.random.default_rng(seed)
    incl = top_k * skewed_profile(num_experts, hot_fraction, hot_ratio) / num_experts
    if incl.max() > 1:
        raise ValueError(f"hot_ratio {hot_ratio} x top_k {top_k} exceeds {num_experts} "
                         "experts: a token can pick an expert only once")
    incl = incl[np.argsort(rng.permutation(num_experts))]  # hot experts at random ids
    out = np.empty((tokens, top_k), np.int32)
    for t in range(tokens):
        order = rng.permutation(num_experts)
        cum = np.cumsum(incl[order])
        out[t] = order[np.searchsorted(cum, rng.random() + np.arange(top_k), side="right")]
    return out


def run_deployment(name: str, path: str, tokens: int, args) -> dict:
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from collectives.a2e import A2E
    from collectives.ep_moe import capacity_buckets
    from collectives.eplb import max_over_mean
    from serving.disagg.ma_eplb import ExpertRebalancer
    from serving.disagg.ma_layout import MALayout
    from xds_jax.loading.loader import load_model

    loaded = load_model(MODEL, dtype="float32", seed=0, use_cache=False)
    cfg, layer = loaded.cfg, 1
    layout = MALayout.load(path, cfg)
    emap, mesh = layout.expert_map, layout.domain_meshes[0]
    a = mesh.devices.size
    k, e, d = cfg.moe.num_experts_per_tok, cfg.moe.num_experts, cfg.hidden_size
    a2e = A2E(mesh, layout.expert_mesh(), emap, mode="trampoline")
    experts = loaded.params["layers"][layer]["moe"]["experts"]
    weights = {layer: a2e.place_experts(experts)}
    a2e.use_weights(weights)

    ids = skewed_trace(a * tokens, e, k, args.hot_fraction, args.hot_ratio, args.seed)
    rng = np.random.default_rng(args.seed + 1)
    gates = rng.random(ids.shape).astype(np.float32)
    gates /= gates.sum(1, keepdims=True)
    x = rng.normal(size=(a * tokens, d)).astype(np.float32)
    on_ranks = NamedSharding(mesh, P("dp"))
    sent = a2e.send(*(jax.device_put(v, on_ranks) for v in (x, ids, gates)))
    rows = a2e.tokens_per_rank(tokens)

    def measure(label: str) -> dict:
        """Capacity search, device loads and outputs under the current map and weights."""
        state = (weights[layer], a2e.maps.get(layer))
        for cap in capacity_buckets(rows, k, a2e.ranks):
            out, st = a2e.moe.launch(cap, state[0], *sent, replicas=state[1])
            if int(np.asarray(st.overflow).sum()) == 0:
                break
        loads = np.asarray(st.slot_tokens_S).reshape(a2e.ranks, -1).sum(axis=1)
        result = {"max_mean": max_over_mean(loads), "capacity": cap,
                  "capacity_tight": int(np.max(np.asarray(st.max_rows))),  # fullest pair
                  "max_device_rows": int(loads.max())}
        print(json.dumps({"deployment": name, "phase": label} | result), flush=True)
        return result | {"state": state, "out": np.asarray(a2e.receive(out))}

    def clock(runs: dict) -> dict:
        """Median and min ms of each ``(weights, replicas, capacity)``, interleaved over
        ``--iters`` rounds so the shared host's drift hits every configuration alike."""
        for w, r, c in runs.values():
            jax.block_until_ready(a2e.moe.launch(c, w, *sent, replicas=r))  # compile
        times: dict = {key: [] for key in runs}
        for _ in range(args.iters):
            for key, (w, r, c) in runs.items():
                start = time.perf_counter()
                jax.block_until_ready(a2e.moe.launch(c, w, *sent, replicas=r))
                times[key].append((time.perf_counter() - start) * 1e3)
        return {key: (statistics.median(t), min(t)) for key, t in times.items()}

    before = measure("before")
    slices = np.stack([np.bincount(part.reshape(-1), minlength=e)
                       for part in np.array_split(ids, args.slices)])
    host = {layer: {n: np.asarray(v) for n, v in experts.items()}}
    reb = ExpertRebalancer([a2e], [(a2e, weights)], host, emap, emap.num_redundant)
    reb.start({layer: slices})
    reb.wait()
    after = measure("after")
    ms = clock({(phase, kind): (*res["state"], res[cap])
                for phase, res in (("before", before), ("after", after))
                for kind, cap in (("bucket", "capacity"), ("tight", "capacity_tight"))})
    return {
        "deployment": name, "experts": e, "expert_devices": emap.num_devices,
        "slots": emap.num_slots, "redundant": emap.num_redundant,
        "tokens": int(ids.shape[0]), "expert_max_mean": max_over_mean(slices.sum(0)),
        "max_mean_before": before["max_mean"], "max_mean_after": after["max_mean"],
        "moe_ms_before": ms["before", "bucket"][0], "moe_ms_after": ms["after", "bucket"][0],
        "moe_speedup": ms["before", "bucket"][0] / ms["after", "bucket"][0],
        "moe_min_ms_before": ms["before", "bucket"][1],
        "moe_min_ms_after": ms["after", "bucket"][1],
        "capacity_before": before["capacity"], "capacity_after": after["capacity"],
        "moe_ms_tight_before": ms["before", "tight"][0],
        "moe_ms_tight_after": ms["after", "tight"][0],
        "capacity_tight_before": before["capacity_tight"],
        "capacity_tight_after": after["capacity_tight"],
        "swap_ms": reb.last_swap_ms, "stall_ms": reb.last_stall_ms,
        "moved_slots": reb.moved_slots, "moved_mib": reb.moved_bytes / 2**20,
        "outputs_identical": bool(np.array_equal(before["out"], after["out"])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="cpu16-ma only (16 devices)")
    parser.add_argument("--hot-fraction", type=float, default=0.2)
    parser.add_argument("--hot-ratio", type=float, default=30.0)
    parser.add_argument("--tokens", type=int, help="tokens per attention rank")
    parser.add_argument("--slices", type=int, default=4, help="time slices of the trace")
    parser.add_argument("--iters", type=int, default=9, help="timed rounds")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    names = ["cpu16-ma"] if args.quick else ["cpu16-ma", "cm384"]
    os.environ.setdefault("XDS_CPU_DEVICES", "16" if args.quick else "384")
    from sharding.devices import configure_cpu_devices

    configure_cpu_devices(collectives=True)
    results = {}
    for name in names:
        path, tokens = DEPLOYMENTS[name]
        results[name] = run_deployment(name, path, args.tokens or tokens, args)
        print(json.dumps(results[name]), flush=True)
    print(json.dumps(results[names[-1]] | {"by_deployment": results}))


if __name__ == "__main__":
    main()
