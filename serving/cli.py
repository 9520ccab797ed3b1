"""``xds``: the command line (``serve``, ``generate``, ``chat``, ``bench``, ``plan``).

Every user mistake ends in one line on stderr, ``xds: error: ...``, and a non-zero exit code:
2 for bad options (argparse), 1 for anything else that went wrong, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import logging
import sys
import threading
import time
from typing import Any

from tqdm import tqdm

log = logging.getLogger("xds")

EPILOG = "Run `xds <command> --help` for the options of each command."


class CliError(Exception):
    """A failure reported as one line, without a traceback."""


# -- options ----------------------------------------------------------------------------------
def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port in 0..65535, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive (or inf), got {text}")
    return value


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model and engine")
    group.add_argument("--model", default="smollm2",
                       help="registered name (smollm2), Hugging Face directory, .gguf file, or "
                       "config.json (random weights) (default: %(default)s)")
    group.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                       help="parameter and activation dtype (default: the checkpoint's)")
    group.add_argument("--deployment", metavar="YAML",
                       help="deployment file (DP groups, PD pools, MoE-attention split); "
                       "default: one device, colocated")
    group.add_argument("--max-model-len", type=positive_int, metavar="N",
                       help="context limit in tokens, prompt plus output (default: the model's)")
    group.add_argument("--max-num-seqs", type=positive_int, default=64, metavar="N",
                       help="most sequences decoded together per DP group (default: %(default)s)")
    group.add_argument("--max-num-batched-tokens", type=positive_int, default=512, metavar="N",
                       help="token budget of one scheduler step, prefill chunks included "
                       "(default: %(default)s)")
    group.add_argument("--max-queue", type=positive_int, default=256, metavar="N",
                       help="requests in flight before new ones get HTTP 429 "
                       "(default: %(default)s)")
    group.add_argument("--num-dp-groups", type=positive_int, default=1, metavar="N",
                       help="data-parallel groups when no deployment file is given "
                       "(default: %(default)s)")
    group.add_argument("--kv-cache-gib", type=float, default=1.0, metavar="GIB",
                       help="KV cache size per DP group in GiB (default: %(default)s)")
    group.add_argument("--cpu-devices", type=positive_int, metavar="N",
                       help="virtual CPU devices to simulate a cluster on "
                       "(default: $XDS_CPU_DEVICES, else JAX's)")
    group.add_argument("--seed", type=int, default=0,
                       help="seed of random weights (config-only models) (default: %(default)s)")
    group.add_argument("--no-warmup", action="store_true",
                       help="skip the warm-up request that compiles the step programs up front")


def add_sampling_options(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-tokens", type=positive_int, default=max_tokens, metavar="N",
                       help="most tokens to generate (default: %(default)s)")
    group.add_argument("--temperature", type=float, default=0.0,
                       help="0 is greedy; higher is more random (default: %(default)s)")
    group.add_argument("--top-p", type=float, default=1.0,
                       help="nucleus sampling mass, in (0, 1] (default: %(default)s)")
    group.add_argument("--top-k", type=int, default=0,
                       help="sample among the k likeliest tokens; 0 disables (default: 0)")
    group.add_argument("--sampling-seed", type=int, metavar="SEED",
                       help="seed of the sampler, for reproducible random samples")
    group.add_argument("--stop", action="append", metavar="TEXT",
                       help="stop when this text appears (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xds", epilog=EPILOG,
        description="xds-jax: a JAX/XLA disaggregated LLM inference engine after xDeepServe.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"],
                        help="logging verbosity (default: %(default)s)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve", parents=[common], help="run the OpenAI-compatible HTTP server",
        description="Serve /v1/completions, /v1/chat/completions, /v1/models, /health and "
        "/metrics, like `vllm serve`.")
    add_engine_options(serve)
    group = serve.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1",
                       help="address to listen on; 0.0.0.0 for all interfaces "
                       "(default: %(default)s)")
    group.add_argument("--port", type=port, default=8000, help="TCP port (default: %(default)s)")
    group.add_argument("--served-model-name", nargs="+", metavar="NAME",
                       help="names clients may send as `model` (default: the --model value)")
    group.add_argument("--request-timeout", type=positive_float, metavar="SECONDS",
                       help="abort requests running longer than this (HTTP 504); "
                       "default: no limit")

    generate = commands.add_parser(
        "generate", parents=[common], help="complete prompts and print the text",
        description="Complete each prompt (or each line of stdin when none is given), "
        "streaming the text to stdout.")
    generate.add_argument("prompts", nargs="*", metavar="PROMPT",
                          help="prompt texts; read from stdin, one per line, when omitted")
    add_engine_options(generate)
    add_sampling_options(generate, max_tokens=64)

    chat = commands.add_parser(
        "chat", parents=[common], help="chat with the model in the terminal",
        description="An interactive chat using the model's chat template. Each line of input "
        "is a user turn; /reset clears the history, /exit (or Ctrl-D) quits. Works with piped "
        "stdin too.")
    chat.add_argument("--system", metavar="TEXT", help="system prompt")
    add_engine_options(chat)
    add_sampling_options(chat, max_tokens=256)

    bench = commands.add_parser(
        "bench", parents=[common], help="load-test a server; report latency and throughput",
        description="Send streamed requests at Poisson arrivals (or all at once), then report "
        "request and token throughput and TTFT/TPOT/ITL/E2E latency statistics, like vLLM's "
        "benchmark_serving.py.")
    bench.add_argument("--url", default="http://127.0.0.1:8000",
                       help="server base URL (default: %(default)s)")
    bench.add_argument("--endpoint", default="/v1/completions",
                       choices=["/v1/completions", "/v1/chat/completions"],
                       help="API to load (default: %(default)s)")
    bench.add_argument("--model", help="model name to send (default: the server's first)")
    bench.add_argument("--num-prompts", type=positive_int, default=100, metavar="N",
                       help="requests per rate (default: %(default)s)")
    bench.add_argument("--request-rate", type=positive_float, nargs="+", default=[float("inf")],
                       metavar="RATE", help="requests per second, Poisson arrivals; inf sends "
                       "all at once; several values run a sweep (default: inf)")
    bench.add_argument("--burstiness", type=positive_float, default=1.0,
                       help="gamma shape of the arrival gaps; 1 is Poisson, lower is burstier "
                       "(default: %(default)s)")
    bench.add_argument("--max-concurrency", type=positive_int, metavar="N",
                       help="most requests in flight at once (default: no limit)")
    bench.add_argument("--dataset", metavar="JSONL",
                       help='prompts file, one {"prompt": ..., "output_len": ...} per line '
                       "(default: the shipped serving/datasets/prompts.jsonl)")
    bench.add_argument("--random-input-len", type=positive_int, metavar="N",
                       help="send random token-id prompts of N tokens instead of a dataset")
    bench.add_argument("--random-output-len", type=positive_int, default=128, metavar="N",
                       help="max_tokens of random prompts, or of dataset rows without "
                       "output_len (default: %(default)s)")
    bench.add_argument("--ignore-eos", action="store_true",
                       help="generate exactly max_tokens (always on for random prompts)")
    bench.add_argument("--seed", type=int, default=0,
                       help="seed of prompt order and arrivals (default: %(default)s)")
    bench.add_argument("--output", metavar="JSON",
                       help="write the results (one object, or {'runs': [...]} for a sweep)")
    bench.add_argument("--plot", metavar="PNG",
                       help="draw latency CDFs (and throughput vs rate for a sweep)")
    bench.add_argument("--disable-tqdm", action="store_true", help="no progress bar")

    commands.add_parser("plan", add_help=False,
                        help="plan a deployment's sharding and memory (see `xds plan --help`)")
    return parser


# -- engine -----------------------------------------------------------------------------------
class Status:
    """A one-line status with elapsed time, kept fresh by a thread while work blocks."""

    def __init__(self) -> None:
        self.bar = tqdm(total=None, bar_format="{desc} [{elapsed}]", disable=None, leave=False)
        self.started = time.monotonic()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._tick, daemon=True)
        self._thread.start()

    def _tick(self) -> None:
        for frame in itertools.cycle("|/-\\"):
            if self._done.wait(0.25):
                return
            self.bar.set_postfix_str(frame, refresh=True)

    def stage(self, text: str) -> None:
        log.info("%s", text)
        self.bar.set_description_str(text, refresh=True)

    def close(self) -> float:
        self._done.set()
        self._thread.join()
        self.bar.close()
        return time.monotonic() - self.started


def load_engine(args: argparse.Namespace) -> Any:
    """Build, start and (unless ``--no-warmup``) warm up the engine for ``args``."""
    import os

    from sharding.devices import configure_cpu_devices

    count = getattr(args, "cpu_devices", None)
    if count is None and args.deployment and not os.environ.get("XDS_CPU_DEVICES"):
        from sharding import read_deployment  # no JAX: size the simulated mesh to the layout

        count = read_deployment(args.deployment).num_devices
    configure_cpu_devices(count)
    from serving.async_engine import AsyncEngine, EngineArgs

    options = {"model": args.model, "dtype": args.dtype, "deployment": args.deployment,
               "max_model_len": args.max_model_len, "max_num_seqs": args.max_num_seqs,
               "max_num_batched_tokens": args.max_num_batched_tokens,
               "max_queue": args.max_queue, "num_dp_groups": args.num_dp_groups,
               "kv_cache_bytes": int(args.kv_cache_gib * (1 << 30)), "seed": args.seed}
    known = {f.name for f in dataclasses.fields(EngineArgs)}
    status = Status()
    try:
        status.stage(f"loading {args.model}")
        engine = AsyncEngine.from_args(EngineArgs(**{k: v for k, v in options.items()
                                                     if k in known}))
        engine.start()
        if not args.no_warmup:
            status.stage("compiling step programs (warm-up request)")
            asyncio.run(warm_up(engine))
    finally:
        elapsed = status.close()
    log.info("%s ready in %.1f s (context %d tokens)", engine.model_name, elapsed,
             engine.max_model_len)
    return engine


async def warm_up(engine: Any) -> None:
    from xds_jax.sampling_params import SamplingParams

    tok = engine.tokenizer
    ids = tok.encode("Hello") if tok is not None else [1, 2, 3]
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    async for _ in engine.generate(ids, params, "warmup"):
        pass


def sampling(args: argparse.Namespace, room: int):
    from xds_jax.sampling_params import SamplingParams

    return SamplingParams(max_tokens=max(min(args.max_tokens, room), 1),
                          temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          seed=args.sampling_seed, stop=args.stop)


async def stream_text(engine: Any, ids: list[int], params: Any, request_id: str,
                      prompt: str | None) -> str:
    """Generate and print the text as it arrives; return it."""
    shown = 0
    text = ""
    async for out in engine.generate(ids, params, request_id, prompt=prompt):
        text = out.outputs[0].text
        sys.stdout.write(text[shown:])
        sys.stdout.flush()
        shown = len(text)
    sys.stdout.write("\n")
    return text


# -- commands ---------------------------------------------------------------------------------
def cmd_generate(args: argparse.Namespace) -> None:
    prompts = args.prompts or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not prompts:
        raise CliError("no prompt given (pass it as an argument or on stdin)")
    engine = load_engine(args)
    try:
        if engine.tokenizer is None:
            raise CliError(f"model {engine.model_name!r} has no tokenizer to encode text")
        for i, prompt in enumerate(prompts):
            ids = engine.tokenizer.encode(prompt)
            asyncio.run(stream_text(engine, ids, sampling(args, engine.max_model_len - len(ids)),
                                    f"generate-{i}", prompt))
    finally:
        engine.shutdown()


def read_turns(interactive: bool):
    """User lines from the terminal (with a prompt) or from piped stdin."""
    while True:
        try:
            line = input(">>> ") if interactive else sys.stdin.readline()
        except EOFError:
            return
        if not interactive and not line:
            return
        if line.strip():
            yield line.strip()


def cmd_chat(args: argparse.Namespace) -> None:
    engine = load_engine(args)
    try:
        if engine.tokenizer is None or engine.tokenizer.chat_template is None:
            raise CliError(f"model {engine.model_name!r} has no chat template")
        start = [{"role": "system", "content": args.system}] if args.system else []
        history = list(start)
        interactive = sys.stdin.isatty()
        if interactive:
            print("Chatting with", engine.model_name, "- /reset clears, /exit quits.")
        for turn, line in enumerate(read_turns(interactive)):
            if line in ("/exit", "/quit"):
                break
            if line == "/reset":
                history = list(start)
                continue
            history.append({"role": "user", "content": line})
            text = engine.tokenizer.apply_chat_template(history, add_generation_prompt=True)
            ids = engine.tokenizer.encode(text, add_special_tokens=False)
            if len(ids) >= engine.max_model_len:
                history.pop()
                log.error("the conversation no longer fits the context; /reset to start over")
                continue
            reply = asyncio.run(stream_text(
                engine, ids, sampling(args, engine.max_model_len - len(ids)), f"chat-{turn}",
                text))
            history.append({"role": "assistant", "content": reply})
    finally:
        engine.shutdown()


def cmd_serve(args: argparse.Namespace) -> None:
    from serving.server import run_server

    run_server(args, load_engine(args))


def cmd_bench(args: argparse.Namespace) -> None:
    from serving.bench import format_summary, run_benchmark

    runs = run_benchmark(args)
    for run in runs:
        print(format_summary(run))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(runs[0] if len(runs) == 1 else {"runs": runs}, f, indent=1)
        log.info("wrote %s", args.output)
    if args.plot:
        from serving.bench_plot import plot_results

        log.info("wrote %s", plot_results(runs, args.plot))


def setup_logging(level: str) -> None:
    """Our loggers at ``level``; libraries (orbax, absl, jax) only when they warn."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    for name in ("xds", "serving", "xds_jax", "sharding", "collectives"):
        logging.getLogger(name).setLevel(level.upper())


def cmd_plan(argv: list[str]) -> int:
    try:
        from sharding.plan import main as plan_main
    except ImportError as error:
        raise CliError(f"xds plan is not available: {error}") from None
    return plan_main(argv) or 0


COMMANDS = {"serve": cmd_serve, "generate": cmd_generate, "chat": cmd_chat, "bench": cmd_bench}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``xds`` console script; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["plan"]:
            return cmd_plan(argv[1:])
        args = build_parser().parse_args(argv)
        setup_logging(args.log_level)
        COMMANDS[args.command](args)
        return 0
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except Exception as error:  # one line for the user instead of a traceback
        if is_user_error(error):
            print(f"xds: error: {error}", file=sys.stderr)
        else:
            log.debug("traceback", exc_info=error)
            print(f"xds: error: {type(error).__name__}: {error} (run with --log-level debug "
                  "for the traceback)", file=sys.stderr)
        return 1


def is_user_error(error: Exception) -> bool:
    """Errors whose message says what to fix (as opposed to bugs)."""
    from serving.bench import BenchError
    from sharding.devices import DeviceSetupError
    from xds_jax.errors import XdsError

    return isinstance(error, CliError | XdsError | BenchError | DeviceSetupError | ValueError
                      | OSError)


if __name__ == "__main__":
    sys.exit(main())
