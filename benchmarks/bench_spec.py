"""SmolLM2 greedy decoding with and without MTP speculation (the shipped draft head), side by
side in one process, at batch 1, 8 and 32 on held-out prompts (the serving benchmark's
dataset, past the ones ``make train-mtp`` measures acceptance on).

Batch ``b`` runs ``max(1, --prompts // b)`` batches of distinct prompts one after another (24
prompts by default: at batch 1 the speed-up then averages 24 prompts' acceptance, not one's;
8 prompts measured 1.59 accepted tokens a step where 24 and ``make train-mtp``'s 48 measure
1.70, so 8 were too few to stand for the held-out set).
Each config runs twice to compile (the second time its prompts hit the prefix cache, as in
the measured runs), then ``--repeats`` times alternating the two engines; tokens/s is generated
tokens over the wall time of ``LLM.chat`` (prefill included: one short prompt step per
sequence), median over repeats; decode tokens/s (``decode_ratio``) leaves the prefill and
first token out, as ``benchmarks.compare`` does: ``(N - B) / (T(N tokens) - T(1 token))``, the
one-token run timed just before. One JSON line per batch size; the mean
accepted length is ``1 + accepted / drafts`` over the measured runs. ``--draft-vocabs
49152,4096`` also times the head cut to those draft vocabularies (its most frequent ids; 49152:
the full vocabulary, what the head would cost drafting through the whole shared LM head).
On CPU, decode steps of more than ``serving.core.spec_decode.DISABLE_BY_BATCH_SIZE`` rows do
not draft by default (mean accepted length 1.0 there), so at batch 8 and 32 the speculative
engine drafts only in the last steps, once few sequences are left; ``--disable-by-batch-size
N`` sets ``speculative_config``'s limit (e.g. 64: draft in every step).
Usage: ``python -m benchmarks.bench_spec [--batches 1,8,32] [--k 2] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from xds_jax import LLM, SamplingParams
from xds_jax.loading.draft_heads import SHIPPED, read_head, save_head
from xds_jax.train.mtp_prompts import held_out_conversations

FIRST_PROMPT = 48  # make train-mtp measures acceptance on the first 48 held-out prompts


def timed_chat(llm: LLM, groups: list[list], params: SamplingParams) -> tuple[int, float]:
    """Generated tokens and wall time of one ``LLM.chat`` per group, one after another."""
    start, n = time.perf_counter(), 0
    for conversations in groups:
        outs = llm.chat(conversations, params)
        n += sum(len(o.outputs[0].token_ids) for o in outs)
    return n, time.perf_counter() - start


def spec_counters(llm: LLM) -> tuple[int, int]:
    s = llm.engine.stats()
    return s["spec_num_drafts"], s["spec_accepted_tokens"]


def bench_batch(base: LLM, spec: LLM, groups: list[list], params: SamplingParams,
                repeats: int) -> dict:
    """Both engines over ``groups`` (each a batch of conversations, run in turn)."""
    first = dataclasses.replace(params, max_tokens=1)
    for llm in (base, spec):  # compile both engines' shapes for this batch (prefix hits too)
        for _ in range(2):
            timed_chat(llm, groups, first)
            timed_chat(llm, groups, params)
    drafts0, accepted0 = spec_counters(spec)
    rates = {"base": [], "spec": [], "base_decode": [], "spec_decode": []}
    rows, tokens = sum(len(g) for g in groups), {}
    for _ in range(repeats):
        for name, llm in (("base", base), ("spec", spec)):
            _, dt1 = timed_chat(llm, groups, first)
            n, dt = tokens[name] = timed_chat(llm, groups, params)
            rates[name].append(n / dt)
            rates[name + "_decode"].append((n - rows) / max(dt - dt1, 1e-9))
    drafts, accepted = (a - b for a, b in zip(spec_counters(spec), (drafts0, accepted0),
                                               strict=True))
    med = {name: statistics.median(r) for name, r in rates.items()}
    # in bfloat16 the two may differ by a few tokens: a k + 1-token verify pass rounds its
    # matmuls unlike a one-token step, and a near-tie can flip (float32: equal)
    return {"prompts": rows, "tokens_per_run": tokens["spec"][0],
            "baseline_tokens_per_run": tokens["base"][0], "baseline_tok_s": round(med["base"], 2),
            "spec_tok_s": round(med["spec"], 2), "ratio": round(med["spec"] / med["base"], 3),
            "baseline_decode_tok_s": round(med["base_decode"], 2),
            "spec_decode_tok_s": round(med["spec_decode"], 2),
            "decode_ratio": round(med["spec_decode"] / med["base_decode"], 3),
            "mean_accepted_len": round(1 + accepted / max(drafts, 1), 3),
            **{f"{name}_tok_s_all": [round(r, 2) for r in rs] for name, rs in rates.items()}}


def spec_engine(k: int, draft_vocab: int | None, options: dict,
                limit: int | None = None) -> LLM:
    """SmolLM2 with the shipped head, its draft vocabulary cut to ``draft_vocab`` ids (or,
    past the head's own, widened with the remaining ids: the full shared head's cost)."""
    spec = {"method": "mtp", "num_speculative_tokens": k, "disable_by_batch_size": limit}
    if draft_vocab is None:
        return LLM("smollm2", speculative_config=spec, **options)
    block, ids, meta = read_head(SHIPPED["SmolLM2-135M-Instruct.Q4_1.gguf"])
    have = set(ids.tolist())
    rest = [i for i in range(meta["vocab_size"]) if i not in have]
    ids = [*ids.tolist(), *rest][:draft_vocab]
    with tempfile.TemporaryDirectory() as tmp:
        save_head(Path(tmp), block, ids, meta)
        os.environ["XDS_DRAFT_HEAD"] = tmp
        try:
            return LLM("smollm2", speculative_config=spec, **options)
        finally:
            del os.environ["XDS_DRAFT_HEAD"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--k", type=int, default=2, help="num_speculative_tokens")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=24,
                    help="distinct prompts per batch size: batch b runs max(1, N // b) "
                         "batches of b in turn (one prompt would time one prompt's acceptance)")
    ap.add_argument("--dtype", default=None, help="parameter dtype (default: auto)")
    ap.add_argument("--disable-by-batch-size", type=int, default=None,
                    help="speculative_config's drafting limit (default: the platform's)")
    ap.add_argument("--draft-vocabs", default="",
                    help="comma-separated draft vocabulary sizes to time besides the shipped")
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",") if b]
    size = max(batches)
    options = {"dtype": args.dtype, "max_num_seqs": size}
    base = LLM("smollm2", **options)
    limit = args.disable_by_batch_size
    shipped = spec_engine(args.k, None, options, limit)
    engines = {"shipped": shipped, **{int(v): spec_engine(args.k, int(v), options, limit)
                                      for v in args.draft_vocabs.split(",") if v}}
    prompts = held_out_conversations()[FIRST_PROMPT:]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    draft_vocab = int(shipped.params["mtp"][0]["vocab_ids"].shape[0])
    ratios = {}
    for b in batches:
        for name, spec in engines.items():
            groups = [prompts[g * b:(g + 1) * b] for g in range(max(1, args.prompts // b))]
            result = bench_batch(base, spec, groups, params, args.repeats)
            vocab = draft_vocab if name == "shipped" else name
            print(json.dumps({"bench": "spec", "model": "smollm2", "k": args.k, "batch": b,
                              "draft_vocab": vocab, "max_tokens": args.max_tokens, **result}),
                  flush=True)
            ratios[f"batch{b}_vocab{vocab}_speedup"] = result["ratio"]
            ratios[f"batch{b}_vocab{vocab}_decode_speedup"] = result["decode_ratio"]
    print(json.dumps({"ratios": ratios}))


if __name__ == "__main__":
    main()
