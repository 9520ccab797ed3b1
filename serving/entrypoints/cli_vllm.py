"""``vllm serve`` spellings ``xds serve`` takes, so a vLLM launch line carries over: the model
as a positional argument, ``$VLLM_API_KEY``, human-readable lengths (``4k``), the dtype
aliases ``half`` / ``float``, and the flags that mean nothing here or only one thing
(``--tensor-parallel-size 1``, ``--trust-remote-code``, ``--gpu-memory-utilization``), which
are taken or refused with a line saying why; ``--response-role``, ``--max-logprobs``,
``--uvicorn-log-level`` and ``--enable-log-requests`` act as in vLLM.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from fractions import Fraction
from pathlib import Path
from typing import Any

from xds_jax.sampling.params import MAX_LOGPROBS

log = logging.getLogger(__name__)

DTYPE_ALIASES = {"half": "float16", "float": "float32"}  # vLLM's --dtype spellings
UVICORN_LEVELS = ["critical", "error", "warning", "info", "debug", "trace"]


def dtype_name(text: str) -> str:
    """A ``--dtype`` value with vLLM's aliases read as ours (``half``, ``float``)."""
    return DTYPE_ALIASES.get(text, text)


def human_int(text: str) -> int:
    """A positive count as vLLM's ``--max-model-len`` reads it: ``4096``, ``4k`` (4,000),
    ``4K`` (4,096), ``1m`` / ``1M``, ``0.5k``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)\s*", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"must be a positive integer such as 4096, 4k or 4K, "
                                         f"got {text!r}")
    number, unit = Fraction(match[1]), match[2]  # exact: 1.001k is 1001
    scale = {"k": 10**3, "m": 10**6, "g": 10**9, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    value = number * scale.get(unit, 1)
    if value.denominator != 1 or value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number of tokens, got "
                                         f"{text!r}")
    return int(value)


def model_len(text: str) -> int | str:
    """``--max-model-len``: a count as ``human_int`` reads it, or ``auto`` (vLLM's; ``-1``
    too): the longest context the KV cache holds, at most the model's."""
    return "auto" if text.strip().lower() in ("auto", "-1") else human_int(text)


def add_vllm_options(serve: argparse.ArgumentParser) -> None:
    """``vllm serve``'s spellings on the ``serve`` parser (after ``add_engine_options``)."""
    serve.add_argument("model_tag", nargs="?", metavar="MODEL",
                       help="the model, as vllm serve takes it (the same as --model)")
    serve.set_defaults(model_default=serve.get_default("model"))
    group = serve.add_argument_group("vllm serve options taken here")
    group.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, metavar="N",
                       help="1 only: tensor parallelism is a deployment file's layout "
                       "(--deployment)")
    group.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1, metavar="N",
                       help="1 only (no pipeline parallelism)")
    group.add_argument("--data-parallel-size", "-dp", type=int, metavar="N",
                       help="the same as --num-dp-groups")
    group.add_argument("--trust-remote-code", action="store_true",
                       help="accepted; no checkpoint code ever runs (architectures are built in)")
    group.add_argument("--tokenizer", metavar="PATH",
                       help="the model's own only: the tokenizer is read from the model")
    for flag in ("--revision", "--tokenizer-revision", "--code-revision"):
        group.add_argument(flag, metavar="REV",
                           help="main only: models load from local paths, nothing is downloaded")
    group.add_argument("--gpu-memory-utilization", type=float, metavar="FRACTION",
                       help="accepted, no effect: the KV pool is sized by --kv-cache-gib")
    group.add_argument("--uvicorn-log-level", choices=UVICORN_LEVELS,
                       help="the HTTP server's log level (default: --log-level)")
    group.add_argument("--enable-log-requests", action="store_true",
                       help="log each request's id, prompts and sampling parameters")
    group.add_argument("--disable-log-requests", action="store_true",
                       help="accepted: requests are not logged unless --enable-log-requests")
    group.add_argument("--response-role", default="assistant", metavar="ROLE",
                       help="role of chat replies (default: %(default)s)")
    group.add_argument("--max-logprobs", type=int, default=MAX_LOGPROBS, metavar="N",
                       help=f"most logprobs / top_logprobs / prompt_logprobs a request may ask "
                       f"(0..{MAX_LOGPROBS}; default: %(default)s)")


def apply_vllm_options(args: Any, error: type[Exception]) -> None:
    """Check the vLLM spellings in parsed ``serve`` arguments and fold them into ours; raises
    ``error`` with a line naming the flag."""
    if args.model_tag is not None:
        if args.model not in (args.model_default, args.model_tag):
            raise error(f"the model is given twice: {args.model_tag!r} and --model "
                        f"{args.model!r}")
        args.model = args.model_tag
    elif args.model == args.model_default and len(args.served_model_name or ()) > 1 \
            and _names_a_model(args.served_model_name[-1]):
        raise error(f"--served-model-name took the model {args.served_model_name[-1]!r} as a "
                    "name (it takes several): put the model first (xds serve MODEL "
                    "--served-model-name ...) or give --model")
    if args.tensor_parallel_size != 1:
        raise error(f"--tensor-parallel-size {args.tensor_parallel_size}: each DP group runs "
                    "TP=1 here; tensor parallelism is a deployment's layout (--deployment, "
                    "e.g. configs/deployments/cpu10-pd-tp3.yaml; docs/deployments.md)")
    if args.pipeline_parallel_size != 1:
        raise error(f"--pipeline-parallel-size {args.pipeline_parallel_size}: pipeline "
                    "parallelism is not supported (stages are split by --deployment)")
    if args.data_parallel_size is not None:
        if args.data_parallel_size < 1:
            raise error(f"--data-parallel-size must be >= 1, got {args.data_parallel_size}")
        args.num_dp_groups = args.data_parallel_size
    if args.tokenizer is not None and not _same_path(args.tokenizer, args.model):
        raise error(f"--tokenizer {args.tokenizer!r}: the tokenizer is read from the model "
                    f"({args.model!r}: its tokenizer.json or GGUF metadata); another one is "
                    "not supported")
    for flag in ("revision", "tokenizer_revision", "code_revision"):
        value = getattr(args, flag)
        if value not in (None, "main"):
            raise error(f"--{flag.replace('_', '-')} {value!r}: models load from local paths "
                        "and nothing is downloaded, so only 'main' is accepted")
    fraction = args.gpu_memory_utilization
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise error(f"--gpu-memory-utilization must be in (0, 1], got {fraction}")
        log.warning("--gpu-memory-utilization has no effect here: the KV pool of each DP "
                    "group is sized by --kv-cache-gib (docs/cli.md)")
    if not 0 <= args.max_logprobs <= MAX_LOGPROBS:
        raise error(f"--max-logprobs must be in 0..{MAX_LOGPROBS}, got {args.max_logprobs}")


def api_key(args: Any) -> str | None:
    """The key requests must carry: ``--api-key``, else ``$XDS_API_KEY``, else vLLM's
    ``$VLLM_API_KEY``; None for an open server."""
    return (getattr(args, "api_key", None) or os.environ.get("XDS_API_KEY")
            or os.environ.get("VLLM_API_KEY") or None)


def _names_a_model(name: str) -> bool:
    """A path that exists, or a registered model name: what a positional model looks like."""
    from xds_jax.loading.loader import registered_models

    return Path(name).expanduser().exists() or name in registered_models()


def _same_path(a: str, b: str) -> bool:
    return a == b or Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
