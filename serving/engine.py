"""FlowServe engine: DP groups on their own devices behind a thin control plane.

``Engine`` builds one ``DPGroup`` per device slice, places each request with the ``Balancer``
and either runs the groups inline until given requests finish (the ``LLM`` path) or gives
each group its own thread (the server path). Python's garbage collector is kept out of steps:
automatic collection is off while the engine runs, and it collects between steps instead.
"""

from __future__ import annotations

import gc
import logging
import threading
import time

import jax

from serving.balancer import Balancer
from serving.dp_group import DPGroup, GroupConfig
from serving.request import Request
from xds_jax.config import ModelConfig

log = logging.getLogger(__name__)

GC_YOUNG_EVERY = 64  # steps between generation-0 collections
GC_FULL_EVERY = 2048  # steps between full collections


class StepGC:
    """Collect garbage only at step boundaries."""

    def __init__(self) -> None:
        self._steps = 0
        self._was_enabled = gc.isenabled()

    def __enter__(self) -> StepGC:
        gc.disable()
        return self

    def __exit__(self, *exc) -> None:
        if self._was_enabled:
            gc.enable()

    def after_step(self) -> None:
        self._steps += 1
        if self._steps % GC_FULL_EVERY == 0:
            gc.collect()
        elif self._steps % GC_YOUNG_EVERY == 0:
            gc.collect(0)


class Engine:
    """Several self-contained DP groups and the control plane that feeds them."""

    def __init__(self, params: dict, cfg: ModelConfig, devices: list | None = None,
                 group_config: GroupConfig | None = None):
        devices = devices or [jax.devices()[0]]
        self.cfg = cfg
        self.group_config = group_config = group_config or GroupConfig()
        self.groups = [DPGroup(i, params, cfg, d, group_config) for i, d in enumerate(devices)]
        self.balancer = Balancer()
        self._placement: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- control plane ------------------------------------------------------------------------
    def submit(self, request: Request) -> int:
        """Place a request on a DP group; returns the group index."""
        with self._lock:
            index = self.balancer.choose([g.load() for g in self.groups], request.prompt_ids)
            self._placement[request.request_id] = index
        self.groups[index].submit(request)
        return index

    def abort(self, request_id: str) -> None:
        with self._lock:
            index = self._placement.pop(request_id, None)
        if index is not None:
            self.groups[index].abort(request_id)

    def release(self, request_id: str) -> None:
        """Forget a finished request's placement."""
        with self._lock:
            self._placement.pop(request_id, None)

    # -- running ------------------------------------------------------------------------------
    def run(self, seqs: list) -> None:
        """Run sequences to completion inline (the ``LLM.generate`` contract)."""
        self.run_until_done([
            Request(f"seq-{s.seq_id}", None, s.prompt_ids, s.params, [s]) for s in seqs
        ])

    def run_until_done(self, requests: list[Request]) -> None:
        """Submit ``requests`` and step all groups inline until they have finished."""
        for r in requests:
            self.submit(r)
        with StepGC() as collector:
            while not all(r.finished for r in requests):
                busy = False
                for g in self.groups:
                    busy |= g.step()
                if not busy and not any(g.has_work() for g in self.groups):
                    raise RuntimeError("engine idle with unfinished requests")
                collector.after_step()
        for r in requests:
            self.release(r.request_id)

    def start(self) -> None:
        """Give every DP group its own loop thread."""
        if self._threads:
            return
        self._stop.clear()
        self._gc = StepGC().__enter__()  # collection only between steps while threads run
        for g in self.groups:
            t = threading.Thread(target=self._group_loop, args=(g,), name=f"dp-group-{g.index}",
                                 daemon=True)
            t.start()
            self._threads.append(t)

    def _group_loop(self, group: DPGroup) -> None:
        group.run(self._stop, self._gc.after_step)

    def shutdown(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=10)
        if self._threads:
            self._gc.__exit__(None, None, None)
        self._threads = []

    # -- observability ------------------------------------------------------------------------
    def stats(self) -> dict:
        loads = [g.load() for g in self.groups]
        schedulers = [g.scheduler for g in self.groups]
        return {
            "num_groups": len(self.groups),
            "num_running": sum(x.num_running for x in loads),
            "num_waiting": sum(x.num_waiting for x in loads),
            "kv_usage": sum(x.kv_usage for x in loads) / len(loads),
            "prefix_hit_rate": _mean([s.prefix_hit_rate for s in schedulers]),
            "num_preemptions": sum(s.num_preemptions for s in schedulers),
            "healthy_groups": sum(x.healthy for x in loads),
            "compiles": sum(g.runner.compile_count for g in self.groups),
            "prompt_tokens_total": sum(g.prompt_tokens for g in self.groups),
            "prefill_tokens_total": sum(g.prefill_tokens for g in self.groups),
            "generation_tokens_total": sum(g.generated_tokens for g in self.groups),
            "batch_size": sum(g.last_batch[0] for g in self.groups),
            "batched_tokens": sum(g.last_batch[1] for g in self.groups),
            "heartbeat_age_s": max(time.monotonic() - g.last_heartbeat for g in self.groups),
        }


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def build_engine(params: dict, cfg: ModelConfig, max_model_len: int, *, num_dp_groups: int = 1,
                 max_num_seqs: int = 64, max_num_batched_tokens: int = 512, block_size: int = 16,
                 kv_cache_bytes: int = 1 << 30, enable_prefix_caching: bool = True,
                 staged: bool = False, devices: list | None = None) -> Engine:
    """An engine with ``num_dp_groups`` groups on the first devices, KV pools sized to fit
    ``kv_cache_bytes`` per group (but no more than ``max_num_seqs`` full contexts)."""
    devices = devices or jax.devices()
    if not 1 <= num_dp_groups <= len(devices):
        raise ValueError(
            f"num_dp_groups must be in 1..{len(devices)} (devices available), got {num_dp_groups}"
        )
    itemsize = jax.tree_util.tree_leaves(params)[0].dtype.itemsize
    per_block = max(cfg.kv_bytes_per_token(itemsize) * block_size, 1)
    per_seq = -(-max_model_len // block_size)
    num_blocks = max(per_seq, min(kv_cache_bytes // per_block, per_seq * max_num_seqs))
    group = GroupConfig(num_blocks=int(num_blocks), block_size=block_size,
                        max_num_seqs=max_num_seqs,
                        max_num_batched_tokens=max_num_batched_tokens,
                        enable_prefix_caching=enable_prefix_caching, staged=staged)
    return Engine(params, cfg, list(devices[:num_dp_groups]), group)
