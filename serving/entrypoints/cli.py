"""``xds``: the command line (``serve``, ``generate``, ``chat``, ``bench``, ``plan``).

Every user mistake ends in one line on stderr, ``xds: error: ...``, and a non-zero exit code:
2 for bad options (argparse), 1 for anything else that went wrong, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from typing import Any

from serving.entrypoints.cli_args import build_parser
from serving.entrypoints.cli_vllm import apply_vllm_options
from serving.entrypoints.launch import finish_trace, load_engine, run_follower

log = logging.getLogger("xds")


class CliError(Exception):
    """A failure reported as one line, without a traceback."""


def sampling(args: argparse.Namespace, room: int, defaults: dict | None = None,
             index: int = 0):
    """The flags' ``SamplingParams``: a flag left out takes the model's default (``defaults``,
    the engine's ``sampling_defaults``: its generation config), else the CLI's (greedy);
    the generation config's ``max_new_tokens`` is the default and the most (vLLM's). The
    sampler's seed: ``--sampling-seed``, else ``--seed`` plus the prompt's (turn's) ``index``
    (vLLM's: repeated runs sample alike, different prompts apart)."""
    from xds_jax.sampling.params import SamplingParams

    defaults = dict(defaults or {})
    cap = defaults.pop("max_tokens", None)
    fields = {k: v for k in ("temperature", "top_p", "top_k")
              if (v := getattr(args, k)) is not None}
    max_tokens = args.max_tokens or cap or args.max_tokens_default
    if cap is not None:
        max_tokens = min(max_tokens, cap)
    return SamplingParams(**({"temperature": 0.0} | defaults | fields),
                          max_tokens=max(min(max_tokens, room), 1),
                          seed=args.sampling_seed if args.sampling_seed is not None
                          else getattr(args, "seed", 0) + index, stop=args.stop)


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


PLOT_FORMATS = (".png", ".pdf", ".svg", ".jpg", ".jpeg")


def writable(path: str, flag: str) -> None:
    """``flag``'s file can be written (its folder exists and takes files): checked before the
    run it records, not after."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) or not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise CliError(f"{flag} {path}: cannot write a file there")


def check_outputs(args: argparse.Namespace) -> None:
    """The files a command writes at its end, checked at its start: ``--trace`` (a
    disaggregated deployment's timeline: without ``--deployment`` nothing records one),
    ``bench``'s ``--output`` and ``--plot`` (an image format matplotlib writes)."""
    if getattr(args, "trace", None):
        if not getattr(args, "deployment", None):
            raise CliError("--trace records a disaggregated deployment's stages and KV "
                           "transfers; give --deployment (a colocated engine records none)")
        writable(args.trace, "--trace")
    if getattr(args, "output", None):
        writable(args.output, "--output")
    if getattr(args, "plot", None):
        if not args.plot.lower().endswith(PLOT_FORMATS):
            raise CliError(f"--plot {args.plot}: name an image file ({', '.join(PLOT_FORMATS)})")
        writable(args.plot, "--plot")


# -- commands ---------------------------------------------------------------------------------
def cmd_generate(args: argparse.Namespace) -> None:
    prompts = args.prompts or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not prompts:
        raise CliError("no prompt given (pass it as an argument or on stdin)")
    for i, prompt in enumerate(prompts):  # undecodable input named before the slow load
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as error:
            raise CliError(f"prompt {i + 1} is not UTF-8 text: byte "
                           f"0x{ord(prompt[error.start]) & 0xff:02x} at character "
                           f"{error.start}") from None
    engine = load_engine(args)
    try:
        if engine.tokenizer is None:
            raise CliError(f"model {engine.model_name!r} has no tokenizer to encode text")
        for i, prompt in enumerate(prompts):
            ids = engine.tokenizer.encode(prompt)
            if len(ids) >= engine.max_model_len:  # named before any text of it is printed
                raise CliError(f"prompt {i + 1} of {len(prompts)} has {len(ids)} tokens; the "
                               f"context holds {engine.max_model_len} (prompt and at least one "
                               "new token)")
            params = sampling(args, engine.max_model_len - len(ids),
                              getattr(engine, "sampling_defaults", None), i)
            asyncio.run(stream_text(engine, ids, params, f"generate-{i}", prompt))
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
    from serving.entrypoints.server import load_chat_template

    template = load_chat_template(args.chat_template) if args.chat_template else None
    engine = load_engine(args)
    try:
        if template is not None and engine.tokenizer is not None:
            engine.tokenizer.chat_template = template
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
                engine, ids,
                sampling(args, engine.max_model_len - len(ids),
                         getattr(engine, "sampling_defaults", None), turn),
                f"chat-{turn}",
                text))
            history.append({"role": "assistant", "content": reply})
        finish_trace(engine, args)
    finally:
        engine.shutdown()


def cmd_serve(args: argparse.Namespace) -> None:
    from serving.entrypoints.server import front_end_options, run_server

    front_end = front_end_options(args)  # bad parser names, template or address: before loading
    engine = load_engine(args)
    try:
        run_server(args, engine, front_end)
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


def dashed(argv: list[str]) -> list[str]:
    """Flags spelled with underscores (``--max_model_len``, which vLLM's parser takes) as
    ours (``--max-model-len``); values and everything after a bare ``--`` as they are."""
    out = []
    for i, arg in enumerate(argv):
        if arg == "--":
            return out + argv[i:]
        if arg.startswith("--") and "_" in arg.split("=", 1)[0]:
            name, eq, value = arg.partition("=")
            arg = name.replace("_", "-") + eq + value
        out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``xds`` console script; returns the exit code."""
    argv = dashed(sys.argv[1:] if argv is None else list(argv))
    try:
        if argv[:1] == ["plan"]:
            return cmd_plan(argv[1:])
        if argv[:1] == ["launch"]:
            from serving.distributed.launcher import main as launch_main

            return launch_main(argv[1:])
        args = build_parser().parse_args(argv)
        setup_logging(args.log_level)
        if args.command == "serve":
            apply_vllm_options(args, CliError)
        if getattr(args, "process_id", 0):  # another process runs the command; follow it
            return run_follower(args)
        check_outputs(args)
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
        _exit_now_if_distributed(1)
        return 1


def _exit_now_if_distributed(code: int) -> None:
    """A failed process of a multi-process run exits at once: JAX's distributed shutdown at
    interpreter exit waits for every peer, so it would hang instead of letting ``xds launch``
    see the failure and name it."""
    if "jax" not in sys.modules:
        return
    from xds_jax.multihost import multi_process

    if multi_process():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def is_user_error(error: Exception) -> bool:
    """Errors whose message says what to fix (as opposed to bugs)."""
    from serving.entrypoints.bench import BenchError
    from sharding.devices import DeviceSetupError
    from xds_jax.errors import XdsError

    return isinstance(error, CliError | XdsError | BenchError | DeviceSetupError | ValueError
                      | OSError)


if __name__ == "__main__":
    sys.exit(main())
