"""Load generator for an OpenAI-compatible server, after vLLM's ``benchmark_serving.py``.

Requests arrive as a Poisson process at ``request_rate`` per second (``inf``: all at once),
optionally capped at ``max_concurrency`` in flight. Each one streams, so the client measures
time to first token (TTFT), inter-token latency (ITL, between streamed chunks), time per output
token after the first (TPOT) and end-to-end latency (E2EL). Token counts come from the server's
``usage`` (``stream_options.include_usage``), so no tokenizer is needed here.

The shipped prompts are questions and instructions, so they go to the chat endpoint by default:
a raw completion of them often ends at once with no text, which counts as a failure (there is no
first token to time). Every failure is counted and its reason reported; the achieved request
rate (how fast requests actually went out) is reported beside the offered one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import random
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import httpx
import numpy as np
from tqdm import tqdm

SHIPPED_DATASET = Path(__file__).parent / "datasets" / "prompts.jsonl"
METRICS = ("ttft", "tpot", "itl", "e2el")
PERCENTILES = (90, 99)
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
NO_TEXT = ("the stream held no text (the model ended at once; try --endpoint "
           "/v1/chat/completions or --ignore-eos)")


class BenchError(RuntimeError):
    """The benchmark cannot run: the server is unreachable, or the options do not fit."""


@dataclasses.dataclass
class BenchRequest:
    prompt: str | list[int]
    output_len: int


@dataclasses.dataclass
class RequestResult:
    success: bool = False
    prompt_len: int = 0
    output_len: int = 0
    ttft: float = 0.0
    itl: list[float] = dataclasses.field(default_factory=list)
    latency: float = 0.0
    text: str = ""
    error: str = ""
    sent_at: float = 0.0  # perf_counter when the request went out

    @property
    def tpot(self) -> float | None:
        if self.output_len < 2:
            return None
        return (self.latency - self.ttft) / (self.output_len - 1)


def load_requests(num_prompts: int, dataset: str | None = None, random_input_len: int | None = None,
                  random_output_len: int = 128, vocab_size: int | None = None,
                  seed: int = 0) -> list[BenchRequest]:
    """``num_prompts`` requests: random token ids if ``random_input_len`` is set, else prompts
    from a JSONL file (``{"prompt", "output_len"}`` per line; the shipped set by default),
    cycled as needed."""
    rng = random.Random(seed)
    if num_prompts < 1:
        raise BenchError(f"--num-prompts must be at least 1, got {num_prompts}")
    if random_input_len is not None:
        if random_input_len < 1 or random_output_len < 1:
            raise BenchError("--random-input-len and --random-output-len must be at least 1")
        high = vocab_size or 1000
        return [BenchRequest([rng.randrange(high) for _ in range(random_input_len)],
                             random_output_len) for _ in range(num_prompts)]
    path = Path(dataset) if dataset else SHIPPED_DATASET
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError) as error:
        raise BenchError(f"cannot read dataset {path}: {error}") from None
    if not rows or not all(isinstance(r, dict) and isinstance(r.get("prompt"), str) for r in rows):
        raise BenchError(f"dataset {path} needs JSON lines with a string 'prompt'")
    rng.shuffle(rows)
    return [BenchRequest(r["prompt"], int(r.get("output_len", random_output_len)))
            for r in (rows[i % len(rows)] for i in range(num_prompts))]


async def send(client: httpx.AsyncClient, url: str, model: str, request: BenchRequest,
               chat: bool, ignore_eos: bool) -> RequestResult:
    """Stream one request and time its chunks."""
    body: dict = {"model": model, "max_tokens": request.output_len, "temperature": 0.0,
                  "stream": True, "stream_options": {"include_usage": True},
                  "ignore_eos": ignore_eos}
    if chat:
        body["messages"] = [{"role": "user", "content": request.prompt}]
    else:
        body["prompt"] = request.prompt
    result, chunks = RequestResult(), []
    start = last = result.sent_at = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                await response.aread()
                result.error = f"HTTP {response.status_code}: {response.text[:200]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    result.error = event["error"].get("message", "error event")
                    return result
                if event.get("usage"):
                    result.prompt_len = event["usage"]["prompt_tokens"]
                    result.output_len = event["usage"]["completion_tokens"]
                for choice in event.get("choices", []):
                    text = choice.get("text") or (choice.get("delta") or {}).get("content")
                    if text:
                        now = time.perf_counter()
                        if not chunks:
                            result.ttft = now - start
                        else:
                            result.itl.append(now - last)
                        chunks.append(text)
                        last = now
        result.latency = time.perf_counter() - start
        result.text = "".join(chunks)
        result.success = bool(chunks) or result.output_len == 0
        if not result.success:
            result.error = NO_TEXT
    except (httpx.HTTPError, json.JSONDecodeError) as error:
        result.error = f"{type(error).__name__}: {error}"
    return result


def arrival_gaps(count: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Seconds before each request: gamma-distributed (Poisson when ``burstiness`` is 1)."""
    if math.isinf(rate):
        return [0.0] * count
    rng = np.random.default_rng(seed)
    return list(rng.gamma(burstiness, 1.0 / (rate * burstiness), size=count))


async def run_one_rate(url: str, model: str, requests: list[BenchRequest], rate: float,
                       max_concurrency: int | None, chat: bool, ignore_eos: bool,
                       burstiness: float = 1.0, seed: int = 0,
                       progress: bool = True) -> tuple[list[RequestResult], float]:
    """Send every request at ``rate``; return the results and the wall time in seconds."""
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    bar = tqdm(total=len(requests), desc=f"rate {rate:g}/s", disable=not progress, unit="req")
    timeout = httpx.Timeout(None, connect=10.0)
    connections = httpx.Limits(max_connections=max_concurrency or len(requests))

    async with httpx.AsyncClient(timeout=timeout, limits=connections) as client:
        async def one(request: BenchRequest) -> RequestResult:
            if limit is None:
                result = await send(client, url, model, request, chat, ignore_eos)
            else:
                async with limit:
                    result = await send(client, url, model, request, chat, ignore_eos)
            bar.update(1)
            return result

        started = time.perf_counter()
        tasks = []
        for request, gap in zip(requests, arrival_gaps(len(requests), rate, burstiness, seed),
                                strict=True):
            await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(one(request)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - started
    bar.close()
    return list(results), duration


def achieved_rate(results: list[RequestResult]) -> float:
    """Requests per second as they actually went out (first to last send); inf when they all
    left at once."""
    sent = sorted(r.sent_at for r in results)
    spread = sent[-1] - sent[0] if len(sent) > 1 else 0.0
    return (len(sent) - 1) / spread if spread > 1e-3 else math.inf


def error_counts(results: list[RequestResult]) -> dict[str, int]:
    """How many requests failed for each reason, most frequent first."""
    counts = Counter(r.error for r in results if not r.success)
    return dict(counts.most_common())


def summarize(results: list[RequestResult], duration: float) -> dict:
    """Throughputs and latency statistics (milliseconds), plus the per-request lists."""
    ok = [r for r in results if r.success]
    rate = achieved_rate(results)
    input_tokens = sum(r.prompt_len for r in ok)
    output_tokens = sum(r.output_len for r in ok)
    samples = {"ttft": [r.ttft for r in ok], "tpot": [r.tpot for r in ok if r.tpot is not None],
               "itl": [gap for r in ok for gap in r.itl], "e2el": [r.latency for r in ok]}
    summary = {
        "duration": duration, "num_requests": len(results), "completed": len(ok),
        "failed": len(results) - len(ok), "failure_reasons": error_counts(results),
        "achieved_request_rate": "inf" if math.isinf(rate) else rate,
        "total_input_tokens": input_tokens, "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration, "input_throughput": input_tokens / duration,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
    }
    for name in METRICS:
        values_ms = np.asarray(samples[name] or [0.0]) * 1000
        summary[f"mean_{name}_ms"] = float(values_ms.mean())
        summary[f"median_{name}_ms"] = float(np.median(values_ms))
        summary[f"std_{name}_ms"] = float(values_ms.std())
        for p in PERCENTILES:
            summary[f"p{p}_{name}_ms"] = float(np.percentile(values_ms, p))
    summary.update(
        input_lens=[r.prompt_len for r in results], output_lens=[r.output_len for r in results],
        ttfts=[r.ttft for r in results], itls=[r.itl for r in results],
        e2els=[r.latency for r in results], generated_texts=[r.text for r in results],
        errors=[r.error for r in results])
    return summary


def fetch_model(base_url: str, model: str | None) -> tuple[str, int | None]:
    """The model to ask for (the server's first unless given) and its vocabulary size."""
    try:
        cards = httpx.get(base_url + "/v1/models", timeout=10).json()["data"]
    except (httpx.HTTPError, KeyError, ValueError) as error:
        raise BenchError(f"cannot reach an OpenAI server at {base_url}: {error}") from None
    card = next((c for c in cards if model in (None, c["id"])), None)
    if card is None:
        raise BenchError(f"the server does not serve {model!r}; it serves "
                         f"{', '.join(c['id'] for c in cards)}")
    return card["id"], card.get("vocab_size")


def run_benchmark(args) -> list[dict]:
    """Run ``xds bench`` (``args`` from its parser): one result dict per request rate."""
    base_url = args.url.rstrip("/")
    endpoint = args.endpoint or (COMPLETIONS if args.random_input_len is not None else CHAT)
    chat = endpoint == CHAT
    if chat and args.random_input_len is not None:
        raise BenchError("random token prompts need --endpoint /v1/completions")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise BenchError(f"--max-concurrency must be at least 1, got {args.max_concurrency}")
    if any(not rate > 0 for rate in args.request_rate):
        raise BenchError("--request-rate values must be positive (or inf)")
    model, vocab = fetch_model(base_url, args.model)
    requests = load_requests(args.num_prompts, args.dataset, args.random_input_len,
                             args.random_output_len, vocab, args.seed)
    runs = []
    for rate in args.request_rate:
        results, duration = asyncio.run(run_one_rate(
            base_url + endpoint, model, requests, rate, args.max_concurrency, chat,
            args.ignore_eos or args.random_input_len is not None, args.burstiness, args.seed,
            not args.disable_tqdm))
        runs.append({
            "date": datetime.now().strftime("%Y%m%d-%H%M%S"), "backend": "openai",
            "base_url": base_url, "endpoint": endpoint, "model_id": model,
            "dataset": "random" if args.random_input_len is not None
            else str(args.dataset or SHIPPED_DATASET.name),
            "num_prompts": args.num_prompts, "request_rate": "inf" if math.isinf(rate) else rate,
            "burstiness": args.burstiness, "max_concurrency": args.max_concurrency,
            **summarize(results, duration)})
    return runs


def format_summary(run: dict) -> str:
    """A human-readable table of one run, like vLLM's."""
    achieved = run["achieved_request_rate"]
    rows = [("Requests sent", run["num_requests"]), ("Successful requests", run["completed"]),
            ("Failed requests", run["failed"]),
            ("Offered request rate (req/s)", run["request_rate"]),
            ("Achieved request rate (req/s)", achieved if achieved == "inf" else f"{achieved:.2f}"),
            ("Benchmark duration (s)", f"{run['duration']:.2f}"),
            ("Total input tokens", run["total_input_tokens"]),
            ("Total generated tokens", run["total_output_tokens"]),
            ("Request throughput (req/s)", f"{run['request_throughput']:.2f}"),
            ("Input token throughput (tok/s)", f"{run['input_throughput']:.2f}"),
            ("Output token throughput (tok/s)", f"{run['output_throughput']:.2f}")]
    for name in METRICS:
        for stat in ("mean", "median", *(f"p{p}" for p in PERCENTILES)):
            rows.append((f"{stat.capitalize()} {name.upper()} (ms)",
                         f"{run[f'{stat}_{name}_ms']:.2f}"))
    lines = ["{:=^60}".format(" Serving Benchmark Result ")]
    lines += [f"{label:<44}{value:>16}" for label, value in rows]
    lines.append("=" * 60)
    for reason, count in list(run["failure_reasons"].items())[:5]:
        lines.append(f"failed x{count}: {reason[:200]}")
    return "\n".join(lines)
