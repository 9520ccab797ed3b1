"""OpenAI's ``POST /v1/embeddings`` (``client.embeddings.create``), as vLLM's pooling runner
answers it: each input's embedding from the served model's final hidden states
(``xds_jax.model.pooling``: the model's sentence-transformers pooling, else the last token's
state, normalised), computed apart from generation on an entry group's devices.

``input`` is a string, a list of strings, a list of token ids or a list of such lists;
``encoding_format`` ``float`` (lists of numbers) or ``base64`` (little-endian float32 bytes, what
the ``openai`` SDK asks for by default); ``dimensions`` may only name the model's own size (it
is no Matryoshka model); vLLM's ``truncate_prompt_tokens``, ``add_special_tokens`` and
``normalize`` are taken. A request holds one admission slot and its inputs' tokens while its
inputs are embedded one after another; a client that leaves (or the request timeout) stops
it between inputs.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
from fastapi import FastAPI, Request

from serving.entrypoints.api_error import ApiError
from serving.entrypoints.openai_protocol import OpenAIModel
from serving.entrypoints.server_requests import completion_prompts, engine_error, truncated
from serving.entrypoints.server_state import Served, Watchdog

ENCODINGS = ("float", "base64")


class EmbeddingRequest(OpenAIModel):
    """``POST /v1/embeddings``: OpenAI's fields and vLLM's extras."""

    null_is_default = frozenset({"encoding_format", "add_special_tokens"})
    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: str | None = "float"
    dimensions: int | None = None
    user: str | None = None
    truncate_prompt_tokens: int | None = None
    add_special_tokens: bool | None = True
    normalize: bool | None = None


def encoded(vector: np.ndarray, encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.astype(np.float32).tolist()


def input_prompts(value: Any, tokenizer: Any, add_special_tokens: bool,
                  field: str = "input") -> list:
    """The inputs as (text, token ids) prompts; errors name ``field``."""
    class Special:  # the tokenizer, with or without its special tokens
        def encode(self, text: str):
            return tokenizer.encode(text, add_special_tokens=add_special_tokens)

    try:
        return completion_prompts(value, None if tokenizer is None else Special())
    except ApiError as error:
        error.param = field
        error.message = error.message.replace("prompt", field)
        raise


def require_embeddings(engine: Any) -> Any:
    if not hasattr(engine, "embed"):
        raise ApiError(400, "this engine does not compute embeddings", None, "unsupported")
    return engine


async def embed_all(served: Served, raw: Request, prompts: list, truncate: int | None,
                    normalize: bool | None, field: str = "input") -> list[np.ndarray]:
    """Each prompt's embedding, one after another under one admission slot (a batch of 2,048
    is OpenAI's limit, LangChain sends 1,000; their tokens count against the queued-token
    limit), stopped where the client leaves; engine errors name ``field``. ``prompts`` are
    cut to ``truncate`` tokens (vLLM's ``truncate_prompt_tokens``) in place."""
    engine = require_embeddings(served.engine)
    prompts[:] = [truncated(p, truncate, engine.max_model_len) for p in prompts]
    try:
        ticket = served.admit(1, sum(len(ids) for _, ids in prompts))
    except ApiError as error:
        error.param = field if error.param in ("prompt", "n") else error.param
        raise
    watch = Watchdog(raw, served, ticket)
    vectors = []
    try:
        for _, ids in prompts:
            if watch.disconnected or watch.timed_out:
                break
            vectors.append(await engine.embed(ids, normalize=normalize))
    except Exception as error:
        failure = engine_error(error)
        failure.param = field if failure.param == "prompt" else failure.param
        raise failure from None
    finally:
        await watch.stop()
    if watch.timed_out:
        raise watch.timeout_error()
    if len(vectors) < len(prompts):  # the client left: no answer is read
        raise ApiError(499, "the client closed the request", None, "client_closed")
    return vectors


def add_embeddings_routes(app: FastAPI, served: Served) -> None:
    engine = served.engine

    @app.post("/v1/embeddings")
    async def embeddings(req: EmbeddingRequest, raw: Request) -> dict:
        model = served.check_model(req.model)
        require_embeddings(engine)
        if req.encoding_format not in ENCODINGS:
            raise ApiError(400, f"encoding_format must be 'float' or 'base64', got "
                           f"{req.encoding_format!r}", "encoding_format", "invalid_value")
        size = engine.cfg.hidden_size
        if req.dimensions is not None and req.dimensions != size:
            raise ApiError(400, f"dimensions: this model's embeddings have {size} dimensions "
                           f"and it is not a Matryoshka model; got {req.dimensions}",
                           "dimensions", "invalid_value")
        prompts = await served.off_loop(input_prompts, req.input, engine.tokenizer,
                                        req.add_special_tokens)
        vectors = await embed_all(served, raw, prompts, req.truncate_prompt_tokens,
                                  req.normalize)
        tokens = sum(len(ids) for _, ids in prompts)
        return {"object": "list", "model": model,
                "data": [{"object": "embedding", "index": i,
                          "embedding": encoded(v, req.encoding_format)}
                         for i, v in enumerate(vectors)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
