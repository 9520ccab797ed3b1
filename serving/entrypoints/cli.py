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

from serving.entrypoints.cli_args import build_parser

log = logging.getLogger("xds")

class CliError(Exception):
    """A failure reported as one line, without a traceback."""


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
    from serving.core.async_engine import AsyncEngine, EngineArgs

    options = {"model": args.model, "dtype": args.dtype, "deployment": args.deployment,
               "max_model_len": args.max_model_len, "max_num_seqs": args.max_num_seqs,
               "max_num_batched_tokens": args.max_num_batched_tokens,
               "max_queue": args.max_queue, "num_dp_groups": args.num_dp_groups,
               "kv_cache_bytes": int(args.kv_cache_gib * (1 << 30)), "seed": args.seed,
               "micro_batches": getattr(args, "micro_batches", 2),
               "trace": bool(getattr(args, "trace", None)),
               "enable_eplb": getattr(args, "enable_eplb", False),
               "eplb_config": getattr(args, "eplb_config", None),
               "dispatch_dtype": getattr(args, "dispatch_dtype", None)}
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
    if timeline_of(engine) is not None:
        timeline_of(engine).clear()  # the trace starts after the warm-up
    return engine


def timeline_of(engine: Any):
    """The engine's timeline when it records one (``--trace``), else None."""
    return getattr(getattr(engine, "engine", None), "timeline", None)


def finish_trace(engine: Any, args: argparse.Namespace) -> None:
    """With ``--trace``: save the Chrome trace and print the per-role summary (stderr)."""
    timeline = timeline_of(engine)
    if not getattr(args, "trace", None) or timeline is None:
        return
    from serving.core.timeline import format_summary

    path = timeline.save(args.trace)
    print(format_summary(timeline.summary()), file=sys.stderr)
    print(f"trace: {path} ({len(timeline.events)} events; open in chrome://tracing or "
          "ui.perfetto.dev)", file=sys.stderr)


async def warm_up(engine: Any) -> None:
    from xds_jax.sampling.params import SamplingParams

    tok = engine.tokenizer
    ids = tok.encode("Hello") if tok is not None else [1, 2, 3]
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    async for _ in engine.generate(ids, params, "warmup"):
        pass


def sampling(args: argparse.Namespace, room: int):
    from xds_jax.sampling.params import SamplingParams

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
        finish_trace(engine, args)
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
        finish_trace(engine, args)
    finally:
        engine.shutdown()


def cmd_serve(args: argparse.Namespace) -> None:
    from serving.entrypoints.server import run_server

    engine = load_engine(args)
    try:
        run_server(args, engine)
    finally:
        finish_trace(engine, args)


def cmd_bench(args: argparse.Namespace) -> None:
    from serving.entrypoints.bench import format_summary, run_benchmark

    runs = run_benchmark(args)
    for run in runs:
        print(format_summary(run))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(runs[0] if len(runs) == 1 else {"runs": runs}, f, indent=1)
        log.info("wrote %s", args.output)
    if args.plot:
        from serving.entrypoints.bench_plot import plot_results

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
    from serving.entrypoints.bench import BenchError
    from sharding.devices import DeviceSetupError
    from xds_jax.errors import XdsError

    return isinstance(error, CliError | XdsError | BenchError | DeviceSetupError | ValueError
                      | OSError)


if __name__ == "__main__":
    sys.exit(main())
