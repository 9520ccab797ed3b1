"""The shipped offline lm-eval tasks, as task configs written into a folder for
``TaskManager(include_path=...)``: a ``generate_until`` QA task and a ``multiple_choice``
(loglikelihood) task over the JSONL files in ``evals/data``, and a RULER single-needle task
whose haystack is sized with the server's own tokenizer (``POST /tokenize``).

Configs are written as JSON, which is YAML too; data paths are absolute so lm-eval can run
from anywhere. Nothing here needs the network.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import httpx

DATA = Path(__file__).parent / "data"
FEW_SHOT = ("Q: What is the capital of Portugal?\nA: Lisbon\n\n"
            "Q: How many wheels does a bicycle have?\nA: Two\n\n")
EXACT_MATCH = {"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
               "ignore_case": True, "ignore_punctuation": True}
# RULER's niah_single_1: a needle in a haystack of repeated noise sentences
NOISE = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
         "There and back again. ")
NEEDLE = "One of the special magic numbers for {key} is: {value}. "
QUESTION = ("What is the special magic number for {key} mentioned in the provided text? "
            "The special magic number for {key} mentioned in the provided text is")
KEYS = ["apple", "river", "lantern", "violin", "harbor", "meadow", "falcon", "copper"]


def json_task(name: str, data: Path, output_type: str, **fields) -> dict:
    return {"task": name, "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data.resolve())}},
            "test_split": "test", "output_type": output_type, "metadata": {"version": 1.0},
            **fields}


def qa_task() -> dict:
    return json_task(
        "xds_qa", DATA / "qa.jsonl", "generate_until",
        doc_to_text=FEW_SHOT + "Q: {{question}}\nA:", doc_to_target="{{answer}}",
        generation_kwargs={"until": ["\n"], "max_gen_toks": 8, "do_sample": False,
                           "temperature": 0},
        filter_list=[{"name": "strip", "filter": [{"function": "remove_whitespace"},
                                                  {"function": "take_first"}]}],
        metric_list=[EXACT_MATCH])


def mc_task() -> dict:
    return json_task(
        "xds_mc", DATA / "mc.jsonl", "multiple_choice",
        doc_to_text="{{question}}", doc_to_choice="{{choices}}", doc_to_target="{{answer}}",
        metric_list=[{"metric": m, "aggregation": "mean", "higher_is_better": True}
                     for m in ("acc", "acc_norm")])


def count_tokens(base_url: str, text: str) -> int:
    r = httpx.post(f"{base_url}/tokenize", json={"prompt": text}, timeout=60)
    r.raise_for_status()
    return r.json()["count"]


def needle_docs(base_url: str, context_tokens: int, count: int, seed: int = 0) -> list[dict]:
    """``count`` haystacks of at most ``context_tokens`` tokens (as the server tokenizes them),
    each with one needle at an evenly spread depth, as RULER builds them."""
    rng = random.Random(seed)
    needles = [(KEYS[i % len(KEYS)], str(rng.randrange(1_000_000, 10_000_000)))
               for i in range(count)]

    def build(repeats: int) -> list[dict]:
        docs = []
        for i, (key, value) in enumerate(needles):
            depth = round(repeats * i / max(count - 1, 1))
            haystack = (NOISE * depth + NEEDLE.format(key=key, value=value)
                        + NOISE * (repeats - depth))
            docs.append({"input": haystack + "\n" + QUESTION.format(key=key), "answer": value})
        return docs

    per_noise = count_tokens(base_url, NOISE * 20) / 20
    repeats = max(int(context_tokens / per_noise), 1)
    while repeats > 1 and count_tokens(base_url, build(repeats)[0]["input"]) > context_tokens:
        repeats = int(repeats * 0.95)  # the server's tokenizer has the last word
    return build(repeats)


def needle_task(docs: list[dict], folder: Path, context_tokens: int) -> dict:
    data = folder / "ruler_niah.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return json_task(
        "xds_ruler_niah", data, "generate_until",
        doc_to_text="{{input}}", doc_to_target="{{answer}}",
        generation_kwargs={"until": ["\n"], "max_gen_toks": 16, "do_sample": False,
                           "temperature": 0},
        filter_list=[{"name": "number", "filter": [
            {"function": "regex", "regex_pattern": r"(\d{7})"}, {"function": "take_first"}]}],
        metric_list=[EXACT_MATCH], metadata={"version": 1.0, "context_tokens": context_tokens})


def write_tasks(folder: Path, base_url: str, context_tokens: int, needles: int) -> list[str]:
    """Write the three task configs into ``folder``; returns the task names."""
    folder.mkdir(parents=True, exist_ok=True)
    tasks = [qa_task(), mc_task(),
             needle_task(needle_docs(base_url, context_tokens, needles), folder, context_tokens)]
    for task in tasks:
        (folder / f"{task['task']}.yaml").write_text(json.dumps(task, indent=1))
    return [t["task"] for t in tasks]
