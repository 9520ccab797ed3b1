"""Long-prompt prefill: dense against blockwise attention (``xds_jax.model.attention_blocks``),
and against the CPU prefill kernel (``xds_jax/kernels/prefill_attention.cc``) where it runs.

SmolLM2-135M (the shipped default model) in each ``--dtypes``, one JSON line per configuration:

- ``engine``: ``LLM.generate`` of one fresh prompt with ``max_tokens=1``, default chunking
  (``max_num_batched_tokens`` 512), whole-call wall time;
- ``one_chunk``: ``model_step`` over the whole prompt as one chunk from an empty KV pool of
  16-token pages (what ``max_num_batched_tokens`` = prompt length runs);
- ``scorer``: the prompt scorer's ``score_tokens`` (``prompt_logprobs`` / ``echo``): one forward
  over the whole prompt from a single page, then the log-softmax of every position.

Prefill tokens/s of each path, the blockwise / dense ratio (``speedup``) and the kernel /
blockwise ratio (``kernel_speedup``) as medians of per-round ratios (the variants run
alternately in one process: this 2-core machine is shared), and for the jitted
programs XLA's temporary buffer bytes (``compile().memory_analysis()``): the working memory
beyond parameters, inputs and outputs, where the dense ``[B, K, G*S, L]`` scores live.

The path is chosen when a program traces (``attention_blocks.BLOCKWISE_MIN_SCORES``, and
``cpu_attention.prefill_applies``, which ``dense`` and ``blockwise`` turn off), so each
variant gets its own jitted function: the engine's runner looks ``model_step`` up at call time
and is handed the variant's (a new function object, see ``fresh_jit``).
Usage: ``python -m benchmarks.bench_long_prefill [--quick]``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from serving.core import runner as runner_module
from serving.core.prompt_scoring import score_tokens
from xds_jax import LLM, SamplingParams
from xds_jax.generate import model_step
from xds_jax.kernels import cpu_attention
from xds_jax.model import attention_blocks
from xds_jax.model.reference import new_caches

VARIANTS = ("dense", "blockwise", "kernel")
PAGE = 16


@contextlib.contextmanager
def variant(name: str):
    """Programs traced inside take XLA's dense path (``dense``), XLA's at the shipped threshold
    (``blockwise``), or what ships (``kernel``: the CPU kernel where it runs)."""
    shipped = attention_blocks.BLOCKWISE_MIN_SCORES, cpu_attention.prefill_applies
    if name == "dense":
        attention_blocks.BLOCKWISE_MIN_SCORES = 1 << 62
    if name != "kernel":
        cpu_attention.prefill_applies = lambda *a: False
    try:
        yield
    finally:
        attention_blocks.BLOCKWISE_MIN_SCORES, cpu_attention.prefill_applies = shipped


def fresh_prompt(length: int, vocab: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(100, vocab, length).tolist()


def fresh_jit(fun, **options):
    """``fun`` jitted through a new function object: JAX caches traces per Python function,
    so two ``jax.jit(fun)`` would share the variant traced first."""
    @functools.wraps(fun)  # its signature, for the static and donated argument names
    def call(*args, **kwargs):
        return fun(*args, **kwargs)

    return jax.jit(call, **options)


def jitted_step():
    return fresh_jit(model_step.__wrapped__, static_argnames=("cfg",),
                     donate_argnames=("caches",))


def step_args(cfg, params, length: int, dtype, seed: int) -> tuple:
    """One row of ``length`` prompt tokens at positions 0.., an empty pool of its pages."""
    tokens = jnp.asarray([fresh_prompt(length, cfg.vocab_size, seed)], jnp.int32)
    caches = new_caches(cfg, length // PAGE, PAGE, dtype)
    table = jnp.arange(length // PAGE, dtype=jnp.int32)[None]
    return (params, tokens, jnp.arange(length)[None], caches, table,
            jnp.asarray([length - 1], jnp.int32))


def compiled_program(kind: str, name: str, llm: LLM, length: int, dtype):
    """The variant's compiled ``one_chunk`` or ``scorer`` program and a call that runs it
    (on a fresh prompt of seed ``seed``), returning its seconds."""
    params, cfg = llm.engine.groups[0].runner.params, llm.cfg
    with variant(name):
        if kind == "one_chunk":
            program = jitted_step().lower(*step_args(cfg, params, length, dtype, 0),
                                          cfg=cfg).compile()

            def run(seed):
                args = step_args(cfg, params, length, dtype, seed)
                start = time.perf_counter()
                jax.block_until_ready(program(*args))
                return time.perf_counter() - start
        else:
            scorer = fresh_jit(score_tokens.__wrapped__, static_argnames=("cfg", "top_n"))
            tokens = jnp.asarray(fresh_prompt(length, cfg.vocab_size, 0), jnp.int32)
            program = scorer.lower(params, tokens, cfg=cfg, top_n=1).compile()

            def run(seed):
                start = time.perf_counter()
                jax.block_until_ready(program(params, tokens))
                return time.perf_counter() - start
    return program, run


def engine_runner(name: str, llm: LLM, length: int):
    """A call that prefills one fresh ``length``-token prompt through the engine, returning
    its seconds (the first call of a variant compiles its step programs)."""
    step = jitted_step()

    runner = llm.engine.drivers[0].runner

    def run(seed):
        with variant(name), contextlib.ExitStack() as stack:
            shipped = runner_module.model_step
            runner_module.model_step = step
            stack.callback(setattr, runner_module, "model_step", shipped)
            if name != "kernel":  # XLA's attention reads every key its table holds
                stack.callback(setattr, runner, "prefill_blocks", runner.prefill_blocks)
                runner.prefill_blocks = None
            start = time.perf_counter()
            llm.generate({"prompt_token_ids": fresh_prompt(length, llm.cfg.vocab_size, seed)},
                         SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
            return time.perf_counter() - start
    return run


def compare(kind: str, llm: LLM, length: int, dtype: str, rounds: int) -> dict:
    """Both variants, alternately, ``rounds`` times (after a warm-up call each on the engine,
    which compiles as it goes)."""
    runs, temp, seeds = {}, {}, iter(range(1, 1 << 30))  # a fresh prompt each call
    for name in VARIANTS:
        if kind == "engine":
            runs[name] = engine_runner(name, llm, length)
        else:
            program, runs[name] = compiled_program(kind, name, llm, length, jnp.dtype(dtype))
            temp[name] = program.memory_analysis().temp_size_in_bytes
            continue
        runs[name](next(seeds))
    seconds = {name: [] for name in VARIANTS}
    for r in range(rounds):
        for name in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
            seconds[name].append(runs[name](next(seeds)))
    line = {"path": kind, "dtype": dtype, "tokens": length, "rounds": rounds}
    for name in VARIANTS:
        line[f"{name}_tok_s"] = round(length / statistics.median(seconds[name]), 1)
    line["speedup"] = round(statistics.median(
        d / b for d, b in zip(seconds["dense"], seconds["blockwise"], strict=True)), 2)
    line["kernel_speedup"] = round(statistics.median(
        b / k for b, k in zip(seconds["blockwise"], seconds["kernel"], strict=True)), 2)
    for name, size in temp.items():
        line[f"{name}_temp_mb"] = round(size / 2**20, 1)
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[512, 2048, 4096])
    parser.add_argument("--scorer-lengths", nargs="+", type=int, default=[4096, 8192])
    parser.add_argument("--paths", nargs="+", default=["engine", "one_chunk", "scorer"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--long", type=int, default=4096, help="longer prompts: one round")
    parser.add_argument("--quick", action="store_true", help="one round, 512 and 2048 only")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.lengths, args.scorer_lengths = 1, [512, 2048], [2048]
    for dtype in args.dtypes:
        llm = LLM("smollm2", dtype=dtype)
        for kind in args.paths:
            for length in args.scorer_lengths if kind == "scorer" else args.lengths:
                rounds = args.rounds if length <= args.long else 1  # dense 8192: minutes a call
                print(json.dumps(compare(kind, llm, length, dtype, rounds)), flush=True)
        del llm


if __name__ == "__main__":
    main()
