"""``POST /v1/embeddings`` through the ``openai`` SDK on the real engine (the tiny golden Llama,
byte tokenizer): each input's vector is transformers' last hidden state of the same tokens (the
golden file), pooled at the last token and normalised; base64 (the SDK's default) and float
agree; bad inputs are 400s naming the field."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import openai
import pytest

from tests.helpers import golden
from tests.serving.fake_engine import client
from tests.serving.real_server import text_server_fixture

real = text_server_fixture()


GOLD = golden("llama")  # transformers' hidden states of 3 prompts (tests/golden/README.md)


def test_vectors_are_the_models_last_hidden_states(real):
    sdk = client(real)
    name = real.engine.model_name
    ids = [GOLD[f"prompt_{i}"].tolist() for i in (1, 2)]
    want = [GOLD[f"hidden_{i}"][-1][-1] for i in (1, 2)]  # the last token's, after the norm
    want = [w / np.linalg.norm(w) for w in want]
    r = sdk.embeddings.create(model=name, input=ids)  # base64 on the wire (the SDK's default)
    assert [d.index for d in r.data] == [0, 1] and r.model == name
    for d, w in zip(r.data, want, strict=True):
        np.testing.assert_allclose(d.embedding, w, rtol=1e-4, atol=1e-5)
    assert r.usage.prompt_tokens == r.usage.total_tokens == sum(map(len, ids))
    floats = sdk.embeddings.create(model=name, input=ids, encoding_format="float")
    assert [d.embedding for d in floats.data] == [d.embedding for d in r.data]
    one = sdk.embeddings.create(model=name, input=ids[1], encoding_format="float")
    assert one.data[0].embedding == floats.data[1].embedding
    tok = real.engine.tokenizer
    texts = sdk.embeddings.create(model=name, input=["hello", "a longer input, with commas"],
                                  encoding_format="float")
    by_ids = sdk.embeddings.create(model=name, encoding_format="float",
                                   input=[tok.encode("hello"), tok.encode("a longer input, "
                                                                          "with commas")])
    assert [d.embedding for d in texts.data] == [d.embedding for d in by_ids.data]
    raw = httpx.post(real.url + "/v1/embeddings", json={
        "input": [ids[0]], "encoding_format": "base64", "normalize": False}).json()
    vector = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), "<f4")
    assert vector.shape == (real.engine.cfg.hidden_size,)
    np.testing.assert_allclose(vector, GOLD["hidden_1"][-1][-1], rtol=1e-4, atol=1e-5)
    assert real.engine.stats()["admitted_seqs"] == 0
    many = sdk.embeddings.create(model=name, input=[[5, i] for i in range(300)])
    assert len(many.data) == 300  # more inputs than --max-num-queued-reqs (256): one request
    assert [d.index for d in many.data] == list(range(300))


def test_bad_inputs_are_400s_naming_the_field(real):
    sdk = client(real)
    name = real.engine.model_name
    cases = [(dict(input=""), "input"), (dict(input=[]), "input"),
             (dict(input=[1] * 10_000), "input"), (dict(input=[[1, 10**9]]), "input"),
             (dict(input="x", dimensions=3), "dimensions"),
             (dict(input="x", encoding_format="int8"), "encoding_format"),
             (dict(input="x", extra_body={"truncate_prompt_tokens": 0}),
              "truncate_prompt_tokens")]
    for fields, param in cases:
        with pytest.raises(openai.BadRequestError) as error:
            sdk.embeddings.create(model=name, **fields)
        assert error.value.param == param, fields
    with pytest.raises(openai.NotFoundError):
        sdk.embeddings.create(model="nope", input="x")
    assert real.engine.stats()["admitted_seqs"] == 0


def test_score_and_rerank_are_cosine_similarities_of_the_embeddings(real):
    name = real.engine.model_name
    query, docs = "river", ["a stone", "the river bank", "blue light"]
    vectors = client(real).embeddings.create(model=name, input=[query, *docs],
                                             encoding_format="float").data
    q, d = np.array(vectors[0].embedding), [np.array(v.embedding) for v in vectors[1:]]
    want = [float(q @ v / np.linalg.norm(q) / np.linalg.norm(v)) for v in d]
    r = httpx.post(real.url + "/v1/score", json={"model": name, "text_1": query,
                                                  "text_2": docs}).json()
    assert [x["index"] for x in r["data"]] == [0, 1, 2] and r["object"] == "list"
    np.testing.assert_allclose([x["score"] for x in r["data"]], want, rtol=1e-5, atol=1e-6)
    pairwise = httpx.post(real.url + "/score", json={"text_1": [query, docs[0]],
                                                      "text_2": [docs[1], docs[2]]}).json()
    assert len(pairwise["data"]) == 2
    ranked = httpx.post(real.url + "/v1/rerank", json={
        "model": name, "query": query, "documents": [docs[0], {"text": docs[1]}, docs[2]],
        "top_n": 2}).json()
    best = sorted(range(3), key=lambda i: -want[i])[:2]
    assert [x["index"] for x in ranked["results"]] == best
    assert [x["document"]["text"] for x in ranked["results"]] == [docs[i] for i in best]
    every = httpx.post(real.url + "/rerank", json={"query": query, "documents": docs,
                                                   "top_n": 0}).json()  # vLLM: 0 is all
    assert len(every["results"]) == 3
    np.testing.assert_allclose([x["relevance_score"] for x in ranked["results"]],
                               [want[i] for i in best], rtol=1e-5, atol=1e-6)
    for path, body, param in [
            ("/score", {"text_1": ["a", "b"], "text_2": ["c", "d", "e"]}, "text_2"),
            ("/score", {"text_1": ["a", "b"], "text_2": ["c"]}, "text_2"),  # vLLM: no N:1
            ("/score", {"text_1": "", "text_2": "x"}, "text_1"),
            ("/rerank", {"query": "q", "documents": []}, "documents"),
            ("/score", {"text_1": "x", "text_2": "y" * 10_000}, "text_2"),
            ("/rerank", {"query": "q", "documents": ["a", "b" * 10_000]}, "documents")]:
        answer = httpx.post(real.url + path, json=body)
        assert answer.status_code == 400 and answer.json()["error"]["param"] == param, body
    assert real.engine.stats()["admitted_seqs"] == 0
