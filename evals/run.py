"""``make eval``: lm-evaluation-harness as a real client of a local ``xds serve``.

Starts the server (unless ``--url`` points at one), writes the shipped offline tasks
(``evals.tasks``: QA ``generate_until``, ``multiple_choice`` loglikelihood, a RULER needle
sized with the server's tokenizer), runs lm-eval's ``local-completions`` model with the
server's own tokenizer (``tokenizer_backend=remote``: ``/tokenizer_info``, ``/tokenize``,
``/detokenize``) and token-id requests, prints the score table and writes the results JSON.

    python -m evals.run --model smollm2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from evals.tasks import write_tasks


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_server(model: str, max_model_len: int, extra: list[str]):
    """``xds serve`` in a subprocess until the block ends; yields its base URL."""
    port = free_port()
    cmd = [sys.executable, "-m", "serving.entrypoints.cli", "serve", "--model", model,
           "--port", str(port), "--max-model-len", str(max_model_len), *extra]
    print("starting:", " ".join(cmd), file=sys.stderr)
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 900
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"xds serve exited with status {proc.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError("xds serve did not become healthy in 900 s")
            time.sleep(1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def evaluate(url: str, model: str, args: argparse.Namespace) -> dict:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the tasks are local JSONL files
    import lm_eval
    from lm_eval.tasks import TaskManager

    folder = Path(args.work_dir or tempfile.mkdtemp(prefix="xds-eval-"))
    names = write_tasks(folder, url, args.needle_tokens, args.needles)
    model_args = {"base_url": f"{url}/v1/completions", "model": model,
                  "tokenizer_backend": "remote", "tokenized_requests": True,
                  "num_concurrent": args.num_concurrent, "batch_size": args.batch_size,
                  "max_length": args.max_model_len, "max_retries": 1, "timeout": 600}
    return lm_eval.simple_evaluate(
        model="local-completions", model_args=model_args, tasks=names,
        task_manager=TaskManager(include_path=str(folder)), limit=args.limit,
        log_samples=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evals.run", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="model to serve (default: smollm2)")
    parser.add_argument("--url", help="evaluate a running server instead of starting one")
    parser.add_argument("--served-name", help="model name to send (default: --model)")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--needle-tokens", type=int, default=1024,
                        help="haystack length of the RULER needle task, in server tokens")
    parser.add_argument("--needles", type=int, default=8, help="needle documents")
    parser.add_argument("--limit", type=int, help="documents per task (default: all)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--num-concurrent", type=int, default=2)
    parser.add_argument("--work-dir", help="where the task configs go (default: a temp dir)")
    parser.add_argument("--output", default="eval_results.json")
    parser.add_argument("--serve-arg", action="append", default=[],
                        help="extra `xds serve` option (repeatable)")
    args = parser.parse_args(argv)
    from lm_eval.utils import make_table

    with contextlib.ExitStack() as stack:
        url = args.url or stack.enter_context(
            local_server(args.model, args.max_model_len, args.serve_arg))
        results = evaluate(url.rstrip("/"), args.served_name or args.model, args)
    print(make_table(results))
    Path(args.output).write_text(json.dumps(results["results"], indent=1, default=str))
    print(f"results: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
