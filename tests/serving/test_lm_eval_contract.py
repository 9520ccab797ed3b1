"""The requests lm-evaluation-harness's ``local-completions`` model sends, answered as it parses
them (without lm-eval installed): ``_create_payload`` and ``parse_logprobs`` /
``parse_generations`` of ``lm_eval/models/openai_completions.py`` (0.4.13), copied below.
Loglikelihoods over HTTP equal those computed in process and the reference model's."""

from __future__ import annotations

import asyncio
from operator import itemgetter

import httpx
import numpy as np

from tests.serving.real_server import text_server_fixture
from tests.serving.test_prompt_logprobs import in_process, reference_logprobs

server = text_server_fixture()
SEED = 1234  # lm-eval's default


# -- lm-eval 0.4.13, LocalCompletionsAPI (verbatim but for self, defaults and stop helper) --
def create_payload(model, messages, generate=False, gen_kwargs=None, seed=SEED, eos=None):
    if generate:
        gen_kwargs.pop("do_sample", False)
        if "max_tokens" in gen_kwargs:
            max_tokens = gen_kwargs.pop("max_tokens")
        else:
            max_tokens = gen_kwargs.pop("max_gen_toks", 256)
        temperature = gen_kwargs.pop("temperature", 0)
        stop = gen_kwargs.pop("until", None) or [eos]  # handle_stop_sequences, simplified
        return {"prompt": messages, "model": model, "max_tokens": max_tokens,
                "temperature": temperature, "stop": stop, "seed": seed, **gen_kwargs}
    return {"model": model, "prompt": messages, "temperature": 0, "max_tokens": 1,
            "logprobs": 1, "seed": seed, "echo": True}


def parse_logprobs(outputs, tokens=None, ctxlens=None, **kwargs):
    res = []
    if not isinstance(outputs, list):
        outputs = [outputs]
    for out in outputs:
        for choice, ctxlen in zip(sorted(out["choices"], key=itemgetter("index")), ctxlens,
                                  strict=False):
            assert ctxlen > 0, "Context length must be greater than 0"
            logprobs = sum(choice["logprobs"]["token_logprobs"][ctxlen:-1])
            tokens_logprobs = choice["logprobs"]["token_logprobs"][ctxlen:-1]
            top_logprobs = choice["logprobs"]["top_logprobs"][ctxlen:-1]
            is_greedy = True
            for tok, top in zip(tokens_logprobs, top_logprobs, strict=False):
                if tok != max(top.values()):
                    is_greedy = False
                    break
            res.append((logprobs, is_greedy))
    return res


def parse_generations(outputs, **kwargs):
    res = []
    if not isinstance(outputs, list):
        outputs = [outputs]
    for out in outputs:
        tmp = [None] * len(out["choices"])
        for choices in out["choices"]:
            tmp[choices["index"]] = choices["text"]
        res = res + tmp
    return res


# -- (context, continuation) pairs as token ids, as lm-eval batches them ------------------------
REQUESTS = [([5, 6, 7, 8], [9, 10]), ([40, 41, 3, 3, 90], [12]), ([7, 7, 7], [7, 7, 7, 7]),
            ([100, 101, 102, 103, 104, 105], [106, 107, 108])]


def post(server, body: dict) -> dict:
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_loglikelihood_batch_as_lm_eval_parses_it(server):
    messages = [ctx + cont for ctx, cont in REQUESTS]
    ctxlens = [len(ctx) for ctx, _ in REQUESTS]
    out = post(server, create_payload(server.engine.model_name, messages))
    assert [c["index"] for c in out["choices"]] == list(range(len(REQUESTS)))
    parsed = parse_logprobs(out, messages, ctxlens)
    for (ctx, cont), (loglik, greedy) in zip(REQUESTS, parsed, strict=True):
        ids = ctx + cont
        scored = in_process(server.engine, ids, top_n=1).prompt_logprobs
        assert loglik == sum(scored[i][ids[i]].logprob for i in range(len(ctx), len(ids)))
        want = reference_logprobs(server.engine, ids)
        np.testing.assert_allclose(loglik, sum(want[i - 1, ids[i]]
                                               for i in range(len(ctx), len(ids))), atol=1e-4)
        assert greedy == all(int(np.argmax(want[i - 1])) == ids[i]
                             for i in range(len(ctx), len(ids)))


def test_echo_only_max_tokens_zero_scores_the_same(server):
    """vLLM-style clients (and lm-eval forks) that send ``max_tokens: 0`` read the whole list."""
    messages = [ctx + cont for ctx, cont in REQUESTS]
    one = post(server, create_payload(server.engine.model_name, messages))
    zero = post(server, create_payload(server.engine.model_name, messages) | {"max_tokens": 0})
    for a, b in zip(one["choices"], zero["choices"], strict=True):
        assert a["logprobs"]["token_logprobs"][:-1] == b["logprobs"]["token_logprobs"]
        assert len(b["logprobs"]["top_logprobs"]) == len(b["logprobs"]["tokens"])


def test_concurrent_loglikelihood_requests_agree(server):
    """lm-eval's ``num_concurrent``: the same batch sent at once answers the same."""
    messages = [ctx + cont for ctx, cont in REQUESTS]
    body = create_payload(server.engine.model_name, messages)

    async def run():
        async with httpx.AsyncClient(timeout=120) as c:
            replies = await asyncio.gather(*(c.post(server.url + "/v1/completions", json=body)
                                             for _ in range(4)))
        return [r.json() for r in replies]

    ctxlens = [len(ctx) for ctx, _ in REQUESTS]
    parsed = [parse_logprobs(out, messages, ctxlens) for out in asyncio.run(run())]
    assert all(p == parsed[0] for p in parsed)


def test_generate_until_batch_as_lm_eval_parses_it(server):
    tok = server.engine.tokenizer
    contexts = ["abc", "hello wor", "1 2 3"]
    messages = [tok.encode(c) for c in contexts]
    gen_kwargs = {"until": ["\n\n", "."], "max_gen_toks": 8, "do_sample": False}
    body = create_payload(server.engine.model_name, messages, generate=True,
                          gen_kwargs=dict(gen_kwargs), eos=tok.decode([tok.eos_token_id]))
    texts = parse_generations(post(server, body))
    assert len(texts) == len(contexts)
    for ids, text in zip(messages, texts, strict=True):
        alone = post(server, {"prompt": ids, "max_tokens": 8, "temperature": 0,
                              "stop": gen_kwargs["until"], "seed": SEED})
        assert text == alone["choices"][0]["text"]
        assert "." not in text and "\n\n" not in text
