"""The ``xds`` command line's options: one parser, every option explained in ``--help``."""

from __future__ import annotations

import argparse

from serving.entrypoints.cli_frontend import (
    add_cors_options,
    add_openai_frontend_options,
    parse_json,
)
from serving.entrypoints.cli_vllm import add_vllm_options, dtype_name, model_len

EPILOG = "Run `xds <command> --help` for the options of each command."


# -- options ----------------------------------------------------------------------------------
def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def json_object(text: str) -> dict:
    value = parse_json(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port in 0..65535, got {text}")
    return value


def fault_spec(text: str):
    """A ``--fault`` value parsed (``serving.core.faults``); a bad one names its field."""
    from serving.core.faults import FaultSpecError, parse_fault

    try:
        return parse_fault(text)
    except FaultSpecError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive (or inf), got {text}")
    return value


def gibibytes(text: str) -> float:
    """A positive, finite size in GiB."""
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of GiB, got {text}")
    return value


# ``EngineArgs`` fields set by the engine flags of the same name (``--max-num-seqs`` sets
# ``max_num_seqs``); their defaults are ``EngineConfig``'s. ``launch.engine_args`` maps them.
ENGINE_FIELDS = ("model", "dtype", "quantization", "max_model_len", "seed", "num_dp_groups",
                 "max_num_seqs", "max_num_batched_tokens", "block_size", "enable_prefix_caching",
                 "scheduling_policy", "staged", "async_scheduling", "num_scheduler_steps",
                 "micro_batches", "speculative_config", "enable_eplb", "eplb_config",
                 "dispatch_dtype", "faults", "heartbeat_timeout_s", "kv_transfer_retries",
                 "generation_config", "override_generation_config")


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    from serving.core.engine_args import EngineArgs

    d = EngineArgs()  # the defaults, from xds_jax.engine_config.EngineConfig
    group = parser.add_argument_group("model and engine")
    group.add_argument("--model", default=d.model,
                       help="registered name (smollm2), Hugging Face directory, .gguf file, or "
                       "config.json (random weights) (default: %(default)s)")
    group.add_argument("--dtype", type=dtype_name,
                       choices=["auto", "float32", "bfloat16", "float16"], default=d.dtype,
                       help="parameter and activation dtype (default auto: the checkpoint's, "
                       "except float16 on CPU, which runs as float32; half and float are "
                       "vLLM's names of float16 and float32)")
    group.add_argument("--quantization", choices=["int8"], default=d.quantization,
                       help="int8: weight-only INT8 linear layers and embeddings, one scale "
                       "per output channel (docs/quantization.md) (default: none)")
    group.add_argument("--deployment", metavar="YAML",
                       help="deployment file (DP groups, PD pools, MoE-attention split); "
                       "default: one device, colocated")
    group.add_argument("--micro-batches", type=positive_int, default=d.micro_batches,
                       metavar="N", help="micro-batches per attention domain and step in "
                       "MoE-attention deployments (default: %(default)s)")
    group.add_argument("--trace", metavar="JSON",
                       help="record a timeline of the disaggregated stages and KV transfers, "
                       "save it as a Chrome trace (chrome://tracing, Perfetto) and print a "
                       "per-role summary at exit")
    group.add_argument("--enable-eplb", action="store_true",
                       help="rebalance the expert slice of an MoE-attention deployment while "
                       "serving (redundant expert replicas, see docs/eplb.md)")
    group.add_argument("--eplb-config", metavar="JSON",
                       help='EPLB options, e.g. \'{"window_size": 100, "step_interval": 300, '
                       '"num_redundant_experts": 32}\' (default: those windows, every spare '
                       "slot)")
    group.add_argument("--dispatch-dtype", choices=["auto", "int8"],
                       help="payload of the expert dispatch of MA (A2E hops and the expert "
                       "mesh's all-to-all) and EP decode: int8 rows with one scale each; "
                       "combine stays in the activations' dtype (default: the deployment's "
                       "field)")
    group.add_argument("--max-model-len", type=model_len, metavar="N", default=d.max_model_len,
                       help="context limit in tokens, prompt plus output, e.g. 4096, 4k or 4K; "
                       "auto (or -1): the longest the KV cache holds, at most the model's "
                       "(default: the model's)")
    group.add_argument("--max-num-seqs", type=positive_int, default=d.max_num_seqs, metavar="N",
                       help="most sequences decoded together per DP group (default: %(default)s)")
    group.add_argument("--max-num-batched-tokens", type=positive_int,
                       default=d.max_num_batched_tokens, metavar="N",
                       help="token budget of one scheduler step, prefill chunks included "
                       "(default: %(default)s)")
    group.add_argument("--block-size", type=positive_int, default=d.block_size, metavar="N",
                       help="tokens per KV cache block (default: %(default)s)")
    group.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                       default=d.enable_prefix_caching,
                       help="reuse the KV blocks of shared prompt prefixes (default: on)")
    group.add_argument("--scheduling-policy", choices=["fcfs", "priority"],
                       default=d.scheduling_policy,
                       help="fcfs: first come, first served; priority: by each request's "
                       "\"priority\" (lower first, then arrival), lower-priority sequences "
                       "preempted for higher ones (default: %(default)s)")
    group.add_argument("--staged", action="store_true", default=d.staged,
                       help="run steps as separately jitted stage programs: faster to "
                       "compile, slower to run")
    group.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction,
                       default=d.async_scheduling,
                       help="schedule and launch step n + 1 while step n runs on the device "
                       "(colocated and PD decode groups; default: on unless "
                       "--num-scheduler-steps chains steps)")
    group.add_argument("--num-scheduler-steps", type=positive_int,
                       default=d.num_scheduler_steps, metavar="N",
                       help="decode steps launched back to back per scheduler step (host "
                       "work paid once per N tokens; tokens stream N at a time) "
                       "(default: %(default)s)")
    group.add_argument("--num-dp-groups", type=positive_int, default=d.num_dp_groups,
                       metavar="N", help="data-parallel groups when no deployment file is "
                       "given (default: %(default)s)")
    group.add_argument("--kv-cache-gib", type=gibibytes, default=d.kv_cache_bytes / (1 << 30),
                       metavar="GIB",
                       help="KV cache size per DP group in GiB (default: %(default)s)")
    group.add_argument("--cpu-devices", type=positive_int, metavar="N",
                       help="virtual CPU devices to simulate a cluster on "
                       "(default: $XDS_CPU_DEVICES, else JAX's)")
    group.add_argument("--seed", type=int, default=d.seed,
                       help="seed of random weights (config-only models) and, for generate "
                       "and chat, of the sampler where --sampling-seed is not given (vLLM's: "
                       "repeated runs sample alike) (default: %(default)s)")
    group.add_argument("--speculative-config", type=json_object, metavar="JSON",
                       default=d.speculative_config,
                       help='speculative decoding, e.g. \'{"method": "mtp", '
                       '"num_speculative_tokens": 2}\' (needs MTP weights or a shipped '
                       'draft head, as smollm2 has; "disable_by_batch_size": N stops drafting '
                       'in decode steps of more than N rows)')
    group.add_argument("--generation-config", default=d.generation_config, metavar="SOURCE",
                       help="default sampling parameters (temperature, top_p, top_k, min_p, "
                       "repetition_penalty; max_new_tokens as the default and most max_tokens) "
                       "for requests that leave them unset: auto, the model directory's "
                       "generation_config.json; vllm, none; or a directory holding one "
                       "(default: %(default)s)")
    group.add_argument("--override-generation-config", type=json_object, metavar="JSON",
                       default=d.override_generation_config,
                       help='sampling defaults set on top of --generation-config, e.g. '
                       '\'{"temperature": 0.5, "max_new_tokens": 512}\'')
    group.add_argument("--no-warmup", action="store_true",
                       help="skip the warm-up request that compiles the step programs up front")
    group.add_argument("--fault", dest="faults", action="append", type=fault_spec, default=[],
                       metavar="SPEC", help="inject a fault (repeatable), e.g. "
                       "group_crash:group=1:after_steps=3, group_stall:group=0:seconds=5, "
                       "kv_transfer_fail:times=2:after_chunks=1, "
                       "expert_rank_down:rank=1:after_steps=2 (MA), "
                       "collective_error:after_steps=2:times=1 (MA); see docs/reliability.md")
    group.add_argument("--heartbeat-timeout", dest="heartbeat_timeout_s", type=positive_float,
                       default=d.heartbeat_timeout_s, metavar="SECONDS",
                       help="a DP group silent this long is taken out of service and its "
                       "requests moved (default: %(default)s)")
    group.add_argument("--kv-transfer-retries", type=int, default=d.kv_transfer_retries,
                       metavar="N", help="PD: a failed KV pull is retried N times, then the "
                       "sequence is prefilled again (default: %(default)s)")
    add_process_options(parser)


def add_process_options(parser: argparse.ArgumentParser) -> None:
    """Several ``jax.distributed`` processes serving one engine (``xds launch`` sets them)."""
    group = parser.add_argument_group("processes (docs/multihost.md)")
    group.add_argument("--coordinator", metavar="HOST:PORT",
                       help="jax.distributed coordinator, on process 0's host; with it this "
                       "process is one of --num-processes sharing the deployment's devices")
    group.add_argument("--num-processes", type=positive_int, default=1, metavar="N",
                       help="processes in all (default: %(default)s)")
    group.add_argument("--process-id", type=int, default=0, metavar="I",
                       help="this process, 0..N-1; process 0 runs the control plane and "
                       "prints, the others follow it (default: %(default)s)")


# -- admission, shutdown and access (``xds serve``) ---------------------------------------------
# ``EngineArgs`` fields set by the admission flags of the same name (``launch.engine_args``).
ADMISSION_FIELDS = ("max_num_queued_reqs", "max_num_queued_tokens")


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be zero or more, got {text}")
    return value


def add_admission_options(parser: argparse.ArgumentParser) -> None:
    from serving.core.engine_args import EngineArgs
    from serving.entrypoints.server_guards import DEFAULT_MAX_REQUEST_BYTES

    d = EngineArgs()
    group = parser.add_argument_group("admission, shutdown and access")
    group.add_argument("--max-num-queued-reqs", "--max-queue", type=positive_int,
                       default=d.max_num_queued_reqs, metavar="N",
                       help="most sequences in flight, running or waiting (a request counts "
                       "prompts x n); more are answered 503 with Retry-After "
                       "(default: %(default)s)")
    group.add_argument("--max-num-queued-tokens", type=positive_int,
                       default=d.max_num_queued_tokens, metavar="N",
                       help="most prompt tokens of the requests in flight; more are answered "
                       "503 with Retry-After (default: %(default)s)")
    group.add_argument("--shutdown-timeout", type=non_negative_float, default=30.0,
                       metavar="SECONDS",
                       help="on SIGTERM, let requests in flight finish for up to this long "
                       "(new ones get 503), then abort the rest and exit 0; 0 stops at once "
                       "(default: %(default)s)")
    group.add_argument("--api-key", metavar="KEY",
                       help="require 'Authorization: Bearer KEY' on the /v1 API and /score, "
                       "/rerank, as vllm serve (default: $XDS_API_KEY, else $VLLM_API_KEY; "
                       "none: open)")
    group.add_argument("--max-request-bytes", type=positive_int,
                       default=DEFAULT_MAX_REQUEST_BYTES, metavar="N",
                       help="largest request body accepted; larger ones get 413 "
                       "(default: %(default)s, 16 MiB)")


def temperature(text: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def top_p(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def top_k(text: str) -> int:
    value = int(text)
    if value < -1:
        raise argparse.ArgumentTypeError(f"must be 0 or -1 (off) or a positive count, got {text}")
    return value


def add_sampling_options(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    """Sampling flags; one left out takes the model's generation config (``--generation-
    config``), else the default named here (``cli.sampling`` applies them)."""
    group = parser.add_argument_group(
        "sampling", "a flag left out takes the model's generation config (--generation-config), "
        "else the default shown")
    group.set_defaults(max_tokens_default=max_tokens)
    group.add_argument("--max-tokens", type=positive_int, metavar="N",
                       help=f"most tokens to generate (default: {max_tokens}; the generation "
                       "config's max_new_tokens is the default and the most)")
    group.add_argument("--temperature", type=temperature,
                       help="0 is greedy; higher is more random (default: 0.0)")
    group.add_argument("--top-p", type=top_p,
                       help="nucleus sampling mass, in (0, 1] (default: 1.0)")
    group.add_argument("--top-k", type=top_k,
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
    group.add_argument("--precompile-seconds", type=non_negative_float, default=60.0,
                       metavar="SECONDS",
                       help="after the warm-up, compile the decode step of every batch and "
                       "context bucket, smallest first, for up to this long, so traffic does "
                       "not stall on compiles; 0 skips it (default: %(default)s)")
    add_admission_options(serve)
    add_openai_frontend_options(serve)
    add_cors_options(serve)
    add_vllm_options(serve)

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
    chat.add_argument("--chat-template", metavar="FILE",
                      help="Jinja chat template replacing the model's (a file, or the template "
                      "text itself)")
    add_engine_options(chat)
    add_sampling_options(chat, max_tokens=256)

    bench = commands.add_parser(
        "bench", parents=[common], help="load-test a server; report latency and throughput",
        description="Send streamed requests at Poisson arrivals (or all at once), then report "
        "request and token throughput and TTFT/TPOT/ITL/E2E latency statistics, like vLLM's "
        "benchmark_serving.py.")
    bench.add_argument("--url", default="http://127.0.0.1:8000",
                       help="server base URL (default: %(default)s)")
    bench.add_argument("--endpoint", choices=["/v1/completions", "/v1/chat/completions"],
                       help="API to load (default: /v1/chat/completions for dataset prompts, "
                       "/v1/completions for --random-input-len)")
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
                       "(default: the shipped serving/entrypoints/datasets/prompts.jsonl)")
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

    commands.add_parser("launch", add_help=False,
                        help="run an xds command as N local processes (see `xds launch --help`)")
    commands.add_parser("plan", add_help=False,
                        help="plan a deployment's sharding and memory (see `xds plan --help`)")
    return parser


# -- engine -----------------------------------------------------------------------------------
