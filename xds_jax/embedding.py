"""``LLM.embed`` and ``LLM.score``: prompts' embeddings (``xds_jax.model.pooling``) through the
serving engine's prompt scorers, and the cosine similarities of pairs of them (vLLM's shapes,
``EmbeddingRequestOutput`` and ``ScoringRequestOutput``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from xds_jax.errors import InvalidPromptError
from xds_jax.model.pooling import check_pooling
from xds_jax.outputs import (
    EmbeddingOutput,
    EmbeddingRequestOutput,
    ScoringOutput,
    ScoringRequestOutput,
)
from xds_jax.sampling.params import SamplingParams


def embedding_options(llm, pooling: str | None, normalize: bool | None) -> tuple[str, bool]:
    """The pooling and normalisation to embed with: those given, else the model's own
    (``LLM.pooling``)."""
    default_pooling, default_normalize = llm.pooling
    return (check_pooling(pooling or default_pooling),
            default_normalize if normalize is None else bool(normalize))


def embed_prompts(llm, prompts: Any, pooling: str | None, normalize: bool | None,
                  truncate_prompt_tokens: int | None) -> list[EmbeddingRequestOutput]:
    """Each prompt's embedding; ``pooling`` / ``normalize`` None: the model's own."""
    if isinstance(prompts, str | dict):
        prompts = [prompts]
    pooling, normalize = embedding_options(llm, pooling, normalize)
    params = SamplingParams(max_tokens=0, truncate_prompt_tokens=truncate_prompt_tokens)
    outputs = []
    for prompt in prompts:
        _, ids = llm.prompt_ids_of(prompt)
        ids = llm.truncate_prompt(ids, params)
        llm.check_prompt(ids, params)
        vector = llm.scoring.embed(ids, pooling, normalize)
        outputs.append(EmbeddingRequestOutput(str(next(llm._request_ids)), ids,
                                              EmbeddingOutput(vector.tolist())))
    return outputs


def pairs(data: Any) -> list:
    """A side of ``LLM.score``: one prompt or a list of them."""
    return [data] if isinstance(data, str | dict) else list(data)


def check_pair_counts(left: int, right: int, names: tuple[str, str], error=None) -> None:
    """vLLM's rule for the two sides of a score: 1:1, 1:N or N:N (``error``: the exception
    type, ``InvalidPromptError`` by default, called with the message)."""
    if not left or not right or (left > 1 and left != right):
        raise (error or InvalidPromptError)(
            f"{names[0]} must be one prompt (against one or several of {names[1]}) or as many "
            f"as {names[1]}; got {left} and {right}")


def paired(a: list, b: list) -> list[tuple]:
    """The pairs a score compares: a side of one against each of the other's, else in order
    (the callers check the lengths)."""
    n = max(len(a), len(b))
    return list(zip(a * n if len(a) == 1 else a, b * n if len(b) == 1 else b, strict=True))


def cosine(u: np.ndarray, v: np.ndarray) -> float:
    return float(u @ v / max(float(np.linalg.norm(u) * np.linalg.norm(v)), 1e-12))


def score_prompts(llm, data_1: Any, data_2: Any,
                  truncate_prompt_tokens: int | None) -> list[ScoringRequestOutput]:
    """The cosine similarity of each pair: one prompt against several, or pairwise (lists of
    equal length: ``check_pair_counts``)."""
    left, right = pairs(data_1), pairs(data_2)
    check_pair_counts(len(left), len(right), ("data_1", "data_2"))
    vectors = embed_prompts(llm, left + right, None, None, truncate_prompt_tokens)
    return [ScoringRequestOutput(str(next(llm._request_ids)),
                                 x.prompt_token_ids + y.prompt_token_ids,
                                 ScoringOutput(cosine(np.asarray(x.outputs.embedding),
                                                      np.asarray(y.outputs.embedding))))
            for x, y in paired(vectors[:len(left)], vectors[len(left):])]
