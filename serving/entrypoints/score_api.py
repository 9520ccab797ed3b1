"""vLLM's score and rerank routes over embeddings: ``POST /score`` (``/v1/score``) and ``POST
/rerank`` (``/v1/rerank``, ``/v2/rerank``: Jina's and Cohere's shape), as vLLM answers them for
an embedding model: a pair's score is the cosine similarity of the two texts' embeddings
(``embeddings_api``: the model's pooling). Meaningful for a model trained for embeddings
(Qwen3-Embedding, e5-mistral); a cross-encoder reranker is not a model this engine loads.

``/score``: ``text_1`` and ``text_2`` each a string or a list of strings: one against each of
the other's (1:N), or pairwise (N:N, equal lengths); ``data[i].score`` for pair ``i``.
``/rerank``: ``query`` against ``documents`` (strings, or ``{"text"}`` objects), the results
best first, ``top_n`` of them (all by default, and for 0 as in vLLM), each with its ``index``,
``relevance_score`` and ``document``.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request

from serving.entrypoints.api_error import ApiError
from serving.entrypoints.embeddings_api import embed_all, input_prompts, require_embeddings
from serving.entrypoints.openai_protocol import OpenAIModel, now, random_id
from serving.entrypoints.server_state import Served
from xds_jax.embedding import check_pair_counts, cosine, paired


class ScoreRequest(OpenAIModel):
    model: str | None = None
    text_1: str | list[str]
    text_2: str | list[str]
    truncate_prompt_tokens: int | None = None


class RerankRequest(OpenAIModel):
    model: str | None = None
    query: str
    documents: list[str | dict[str, Any]]
    top_n: int | None = None
    truncate_prompt_tokens: int | None = None


def texts(value: str | list[str], field: str) -> list[str]:
    items = [value] if isinstance(value, str) else list(value)
    if not items or any(not isinstance(t, str) or not t for t in items):
        raise ApiError(400, f"{field} must be a non-empty string or a list of them", field,
                       "invalid_value")
    return items


async def scores(served: Served, raw: Request, left: list[str], right: list[str],
                 truncate: int | None, fields: tuple[str, str]) -> tuple[list[float], int]:
    """The cosine similarity of each (left, right) pair (``left`` may be one text against
    several) and the tokens embedded."""
    engine = require_embeddings(served.engine)
    check_pair_counts(len(left), len(right), fields,
                      lambda message: ApiError(400, message, fields[1], "invalid_value"))
    sides, tokens = [], 0
    for side, field in zip((left, right), fields, strict=True):
        prompts = await served.off_loop(input_prompts, side, engine.tokenizer, True, field)
        sides.append(await embed_all(served, raw, prompts, truncate, True, field))
        tokens += sum(len(ids) for _, ids in prompts)
    return [cosine(x, y) for x, y in paired(*sides)], tokens


def add_score_routes(app: FastAPI, served: Served) -> None:
    async def score(req: ScoreRequest, raw: Request) -> dict:
        model = served.check_model(req.model)
        found, tokens = await scores(served, raw, texts(req.text_1, "text_1"),
                                     texts(req.text_2, "text_2"), req.truncate_prompt_tokens,
                                     ("text_1", "text_2"))
        return {"id": random_id("score"), "object": "list", "created": now(), "model": model,
                "data": [{"index": i, "object": "score", "score": s}
                         for i, s in enumerate(found)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    async def rerank(req: RerankRequest, raw: Request) -> dict:
        model = served.check_model(req.model)
        docs = [d.get("text") if isinstance(d, dict) else d for d in req.documents]
        if not docs or any(not isinstance(d, str) or not d for d in docs):
            raise ApiError(400, "documents must be a non-empty list of strings or {\"text\"} "
                           "objects", "documents", "invalid_value")
        found, tokens = await scores(served, raw, texts(req.query, "query"), docs,
                                     req.truncate_prompt_tokens, ("query", "documents"))
        top = req.top_n if req.top_n and req.top_n > 0 else len(docs)  # vLLM: 0 is all
        order = sorted(range(len(docs)), key=lambda i: -found[i])[:top]
        return {"id": random_id("rerank"), "model": model, "usage": {"total_tokens": tokens},
                "results": [{"index": i, "document": {"text": docs[i]},
                             "relevance_score": found[i]} for i in order]}

    for path in ("/score", "/v1/score"):
        app.post(path)(score)
    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        app.post(path)(rerank)
