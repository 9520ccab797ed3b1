"""``xds bench`` against test servers (the fake engine and the tiny real model): the JSON has
every field, failures are counted with their reasons, the default run on the shipped prompts
produces text, the PNG is drawn with an honest title."""

from __future__ import annotations

import dataclasses
import json

import pytest

from serving.entrypoints.bench import (
    METRICS,
    NO_TEXT,
    PERCENTILES,
    BenchError,
    arrival_gaps,
    load_requests,
)
from serving.entrypoints.bench_plot import plot_title
from serving.entrypoints.cli import main
from tests.serving.fake_engine import FakeEngine, serve
from tests.serving.real_server import text_server_fixture

RUN_FIELDS = {"date", "backend", "base_url", "endpoint", "model_id", "dataset", "num_prompts",
              "request_rate", "burstiness", "max_concurrency", "duration", "completed", "failed",
              "total_input_tokens", "total_output_tokens", "request_throughput",
              "input_throughput", "output_throughput", "total_token_throughput", "input_lens",
              "output_lens", "ttfts", "itls", "e2els", "generated_texts", "errors",
              "num_requests", "failure_reasons", "achieved_request_rate"}
RUN_FIELDS |= {f"{stat}_{name}_ms" for name in METRICS
               for stat in ("mean", "median", "std", *(f"p{p}" for p in PERCENTILES))}


@pytest.fixture(scope="module")
def server():
    with serve(FakeEngine(delay=0.002, max_model_len=512)) as server:
        yield server


def test_bench_sweep_writes_json_and_png(server, tmp_path, capsys):
    out, png, data = (tmp_path / name for name in ("results.json", "latency.png", "p.jsonl"))
    data.write_text("".join(json.dumps({"prompt": f"Question {i}?", "output_len": 8}) + "\n"
                            for i in range(4)))
    code = main(["bench", "--url", server.url, "--num-prompts", "10", "--request-rate", "40",
                 "inf", "--dataset", str(data), "--output", str(out), "--plot", str(png),
                 "--disable-tqdm"])
    assert code == 0
    runs = json.loads(out.read_text())["runs"]
    assert [r["request_rate"] for r in runs] == [40.0, "inf"]
    for run in runs:
        assert RUN_FIELDS <= set(run), RUN_FIELDS - set(run)
        assert run["completed"] == 10 and run["failed"] == 0 and run["model_id"] == "fake"
        assert run["total_output_tokens"] == sum(run["output_lens"]) > 0
        assert 0 < run["mean_ttft_ms"] <= run["mean_e2el_ms"]
        assert run["p99_itl_ms"] >= run["median_itl_ms"] > 0
        assert len(run["itls"]) == 10 and all(not e for e in run["errors"])
        assert run["num_requests"] == 10 and run["failure_reasons"] == {}
    assert 15 < runs[0]["achieved_request_rate"] < 100 and runs[1]["achieved_request_rate"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Serving Benchmark Result" in capsys.readouterr().out


def test_bench_random_prompts_chat_and_concurrency(server, tmp_path):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    assert main(["bench", "--url", server.url, "--num-prompts", "6", "--random-input-len", "20",
                 "--random-output-len", "7", "--max-concurrency", "2", "--output", str(out),
                 "--plot", str(png), "--disable-tqdm"]) == 0
    run = json.loads(out.read_text())
    assert run["input_lens"] == [20] * 6 and run["output_lens"] == [7] * 6
    assert run["max_concurrency"] == 2 and png.stat().st_size > 0
    assert main(["bench", "--url", server.url, "--endpoint", "/v1/chat/completions",
                 "--num-prompts", "3", "--output", str(out), "--disable-tqdm"]) == 0
    assert json.loads(out.read_text())["completed"] == 3


def test_bench_reports_failures_and_bad_options(server, tmp_path, capsys):
    out = tmp_path / "f.json"
    # prompts too long for the context: every request fails, the run still reports
    assert main(["bench", "--url", server.url, "--num-prompts", "2", "--random-input-len",
                 "600", "--output", str(out), "--disable-tqdm"]) == 0
    run = json.loads(out.read_text())
    assert run["failed"] == 2 and "HTTP 400" in run["errors"][0]
    assert list(run["failure_reasons"].values()) == [2]
    assert "failed x2: HTTP 400" in capsys.readouterr().out
    assert main(["bench", "--url", "http://127.0.0.1:9", "--disable-tqdm"]) == 1
    assert main(["bench", "--url", server.url, "--dataset", str(tmp_path / "none.jsonl")]) == 1
    assert main(["bench", "--url", server.url, "--model", "other"]) == 1
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 3 and all(line.startswith("xds: error: ") for line in errors)


def test_dataset_and_arrivals():
    requests = load_requests(400)
    assert len(requests) == 400 and all(isinstance(r.prompt, str) for r in requests)
    assert len({r.prompt for r in requests}) >= 300
    gaps = arrival_gaps(2000, rate=10.0, burstiness=1.0, seed=0)
    assert abs(sum(gaps) / len(gaps) - 0.1) < 0.01
    assert arrival_gaps(3, float("inf"), 1.0, 0) == [0.0] * 3
    with pytest.raises(BenchError):
        load_requests(0)


class SilentEngine(FakeEngine):
    """Ends every request at once with no text, as a chat model does on a raw completion."""

    async def generate(self, prompt_ids, params, request_id, prompt=None, priority=0,
                       cache_salt=None):
        async for out in super().generate(prompt_ids, dataclasses.replace(params, stop=["T"]),
                                          request_id, prompt):
            yield out


def test_bench_counts_requests_without_text_as_failures(tmp_path, capsys):
    out, png = tmp_path / "s.json", tmp_path / "s.png"
    with serve(SilentEngine(max_model_len=512)) as server:
        assert main(["bench", "--url", server.url, "--endpoint", "/v1/completions",
                     "--num-prompts", "5", "--output", str(out), "--plot", str(png),
                     "--disable-tqdm"]) == 0
    run = json.loads(out.read_text())
    assert (run["num_requests"], run["completed"], run["failed"]) == (5, 0, 5)
    assert run["failure_reasons"] == {NO_TEXT: 5}
    assert f"failed x5: {NO_TEXT}" in capsys.readouterr().out
    assert plot_title([run]).endswith("5 requests, 0 completed, 5 failed")
    assert png.read_bytes()[:4] == b"\x89PNG"


real = text_server_fixture()


def test_bench_defaults_produce_text_on_a_real_model(real, tmp_path):
    """The README's command on the shipped prompts: chat by default, every request streams
    text (issue 17: 32 of 40 raw completions failed with no text)."""
    out, png = tmp_path / "real.json", tmp_path / "real.png"
    assert main(["bench", "--url", real.url, "--num-prompts", "6", "--request-rate", "20",
                 "--output", str(out), "--plot", str(png), "--disable-tqdm"]) == 0
    run = json.loads(out.read_text())
    assert run["endpoint"] == "/v1/chat/completions"
    assert (run["completed"], run["failed"]) == (6, 0), run["failure_reasons"]
    assert all(text for text in run["generated_texts"]) and run["total_output_tokens"] > 6
    assert run["achieved_request_rate"] > 0 and png.stat().st_size > 0
