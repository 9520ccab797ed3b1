"""Prometheus metrics of the server: latency histograms per request, engine gauges per scrape.

Names follow vLLM's (``xds:`` instead of ``vllm:``): TTFT, TPOT, ITL and end-to-end histograms,
running/waiting requests, KV use and free blocks, prefix-cache hit rate, token counters,
admission (what is admitted, rejections by reason), per-collective latency and per-expert load.
Those vLLM has too are also exported under vLLM's own names (``VLLM_NAMES``), so dashboards
and autoscalers written for ``vllm serve`` (``vllm:num_requests_waiting``,
``vllm:kv_cache_usage_perc``, ``vllm:time_to_first_token_seconds``) read this server as is.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from serving.core.admission import REJECT_REASONS
from xds_jax.outputs import RequestOutput

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                 1.0, 2.5, 5.0, 10.0, 20.0, 80.0)
E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0,
               240.0, 480.0, 960.0, 1920.0)


# xds-jax's metric -> vLLM's name for the same quantity (exported under both)
VLLM_NAMES = {name: "vllm:" + name[4:] for name in (
    "xds:time_to_first_token_seconds", "xds:time_per_output_token_seconds",
    "xds:inter_token_latency_seconds", "xds:e2e_request_latency_seconds",
    "xds:request_success", "xds:num_requests_running", "xds:num_requests_waiting",
    "xds:kv_cache_usage_perc", "xds:num_preemptions", "xds:prompt_tokens",
    "xds:generation_tokens")}


def exported_names(name: str) -> tuple[str, ...]:
    """The names a metric is exported under: its own, and vLLM's where vLLM has it."""
    return (name, VLLM_NAMES[name]) if name in VLLM_NAMES else (name,)


class Both:
    """A metric exported under two names: each call goes to both."""

    def __init__(self, *metrics: Any):
        self.metrics = metrics

    def labels(self, *values: str) -> Both:
        return Both(*(m.labels(*values) for m in self.metrics))

    def observe(self, value: float) -> None:
        for m in self.metrics:
            m.observe(value)

    def inc(self, amount: float = 1.0) -> None:
        for m in self.metrics:
            m.inc(amount)


class ServerMetrics:
    """Prometheus metrics of one app (own registry): latency histograms observed here from
    each request's output stream, engine gauges read from ``engine.stats()`` at each scrape."""

    def __init__(self, registry: CollectorRegistry, engine: Any, model: str):
        def histogram(name: str, doc: str, buckets: tuple) -> Both:
            return Both(*(Histogram(n, doc, ["model_name"], buckets=buckets,
                                    registry=registry).labels(model)
                          for n in exported_names(name)))

        self.ttft = histogram("xds:time_to_first_token_seconds", "Time to first token.",
                              TTFT_BUCKETS)
        self.tpot = histogram("xds:time_per_output_token_seconds",
                              "Mean time per output token after the first, per request.",
                              TOKEN_BUCKETS)
        self.itl = histogram("xds:inter_token_latency_seconds",
                             "Time between consecutive output tokens.", TOKEN_BUCKETS)
        self.e2e = histogram("xds:e2e_request_latency_seconds", "Request latency, end to end.",
                             E2E_BUCKETS)
        self.finished = Both(*(Counter(name, "Finished requests by finish reason.",
                                       ["model_name", "finished_reason"], registry=registry)
                               for name in exported_names("xds:request_success")))
        self.rejections = Counter(
            "xds:admission_rejections", "Requests turned away with 503, by reason: queued_reqs "
            "(--max-num-queued-reqs), queued_tokens (--max-num-queued-tokens), shutting_down.",
            ["model_name", "reason"], registry=registry)
        for reason in REJECT_REASONS:
            self.rejections.labels(model, reason)
        self.model = model
        registry.register(EngineCollector(engine, model))

    async def track(self, first: RequestOutput, rest: AsyncIterator[RequestOutput],
                    on_finished: Callable[[str], None]) -> AsyncIterator[RequestOutput]:
        """``first`` then ``rest``, observing inter-token gaps and, at the end, the request.
        ``on_finished(request_id)`` runs *before* the last output is yielded, so whatever it
        frees (the admission ticket) is free by the time a client can see the end."""
        out: RequestOutput | None = first
        seen, last = 0, 0.0
        while out is not None:
            count = max((len(c.token_ids) for c in out.outputs), default=0)
            if count > seen:
                stamp = time.monotonic()
                if seen:
                    for _ in range(count - seen):
                        self.itl.observe((stamp - last) / (count - seen))
                seen, last = count, stamp
            if out.finished:
                self.observe_finished(out, seen)
                on_finished(out.request_id)
                yield out
                return
            yield out
            out = await anext(rest, None)

    def observe_finished(self, out: RequestOutput, tokens: int) -> None:
        for c in out.outputs:
            self.finished.labels(self.model, c.finish_reason or "unknown").inc()
        m = out.metrics
        if m is None:
            return
        if m.first_token_time is not None:
            self.ttft.observe(m.first_token_time - m.arrival_time)
            if tokens > 1 and m.last_token_time is not None:
                self.tpot.observe((m.last_token_time - m.first_token_time) / (tokens - 1))
        self.e2e.observe((m.finished_time or time.monotonic()) - m.arrival_time)


class EngineCollector:
    """Reads ``engine.stats()`` at scrape time: queues, KV use, prefix hits, token counters,
    per-collective latency and per-expert load."""

    def __init__(self, engine: Any, model: str):
        self.engine, self.model = engine, model

    def collect(self):
        stats, m = self.engine.stats(), self.model
        for name, key, doc in (
                ("xds:num_requests_running", "num_running", "Requests being decoded."),
                ("xds:num_requests_waiting", "num_waiting", "Requests waiting to be scheduled."),
                ("xds:kv_cache_usage_perc", "kv_usage", "Fraction of KV blocks in use (0-1)."),
                ("xds:prefix_cache_hit_rate", "prefix_hit_rate",
                 "Fraction of prompt tokens served from cached prefixes (0-1)."),
                ("xds:kv_cache_free_blocks", "kv_free_blocks",
                 "KV blocks no sequence holds (cached prefixes included), all groups."),
                ("xds:kv_cache_total_blocks", "kv_total_blocks", "KV blocks, all groups."),
                ("xds:num_admitted_seqs", "admitted_seqs",
                 "Sequences admitted and not finished (counted against --max-num-queued-reqs)."),
                ("xds:num_admitted_prompt_tokens", "admitted_tokens",
                 "Prompt tokens admitted and not finished (against --max-num-queued-tokens)."),
                ("xds:healthy_groups", "healthy_groups", "DP groups in service.")):
            for exported in exported_names(name):
                gauge = GaugeMetricFamily(exported, doc, labels=["model_name"])
                gauge.add_metric([m], float(stats.get(key, 0.0)))
                yield gauge
        for name, key, doc in (
                ("xds:num_preemptions", "num_preemptions", "Preemptions by recompute."),
                ("xds:prompt_tokens", "prompt_tokens_total", "Prompt tokens prefilled."),
                ("xds:generation_tokens", "generation_tokens_total", "Tokens generated."),
                ("xds:kv_transfers", "kv_transfers", "PD: KV transfers pulled by decode."),
                ("xds:spec_decode_num_drafts", "spec_num_drafts",
                 "Speculative decoding: draft proposals verified."),
                ("xds:spec_decode_num_draft_tokens", "spec_draft_tokens",
                 "Speculative decoding: tokens drafted."),
                ("xds:spec_decode_num_accepted_tokens", "spec_accepted_tokens",
                 "Speculative decoding: drafted tokens accepted."),
                ("xds:kv_transfer_bytes", "kv_bytes_sent", "PD: KV bytes moved to decode."),
                ("xds:kv_transfer_wait_seconds", "kv_wait_s",
                 "PD: time prefilled KV waited for decode room (backpressure)."),
                ("xds:ma_expert_reruns", "ma_reruns",
                 "MA: steps re-run after an expert capacity overflow."),
                ("xds:eplb_rebalances", "eplb_rebalances",
                 "EPLB: expert maps rebalanced and switched on."),
                ("xds:faults_injected", "faults_injected", "Faults injected (--fault)."),
                ("xds:requests_recovered", "requests_recovered",
                 "Requests moved off a group taken out of service, recomputed elsewhere."),
                ("xds:rollbacks", "rollbacks", "Steps undone and recomputed."),
                ("xds:scale_downs", "scale_downs",
                 "DP groups and MA expert devices taken out of service."),
                ("xds:rejoins", "rejoins", "Stalled DP groups back in service.")):
            for exported in exported_names(name):
                counter = CounterMetricFamily(exported, doc, labels=["model_name"])
                counter.add_metric([m], float(stats.get(key, 0)))
                yield counter
        latency = GaugeMetricFamily("xds:collective_latency_seconds",
                                    "Mean latency of each collective: kv_transfer (PD KV "
                                    "pulls), a2e / e2a hops of MA (with --trace).",
                                    labels=["model_name", "collective"])
        for collective, seconds in sorted(stats.get("collective_latency_s", {}).items()):
            latency.add_metric([m, str(collective)], float(seconds))
        yield latency
        load = GaugeMetricFamily("xds:expert_load", "Tokens routed to each expert (layer "
                                 "num_layers: the MTP block's, when it drafts under MA).",
                                 labels=["model_name", "layer", "expert"])
        for layer, counts in sorted(stats.get("expert_load", {}).items()):
            for expert, count in enumerate(counts):
                load.add_metric([m, str(layer), str(expert)], float(count))
        yield load
        devices = GaugeMetricFamily("xds:expert_device_load",
                                    "Tokens each expert device received in the last window.",
                                    labels=["model_name", "layer", "device"])
        for layer, counts in sorted(stats.get("expert_device_load", {}).items()):
            for device, count in enumerate(counts):
                devices.add_metric([m, str(layer), str(device)], float(count))
        yield devices
