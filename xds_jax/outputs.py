"""Results in vLLM's shapes: ``RequestOutput`` holding one ``CompletionOutput`` per sample."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Logprob:
    """Log-probability of one token, its rank among all tokens (1 = best) and its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclasses.dataclass
class CompletionOutput:
    """One generated sequence. ``finish_reason`` is "stop", "length" or "abort" once finished;
    ``stop_reason`` is the stop string or token id that ended it (None for EOS or length)."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass
class RequestMetrics:
    """Wall-clock stamps in seconds (``time.monotonic``) of a request's life."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None


@dataclasses.dataclass
class RequestOutput:
    """Everything returned for one prompt. ``prompt_logprobs`` (when asked for) has one entry
    per prompt token: None for the first, then the token's and the top alternatives' entries."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    metrics: RequestMetrics | None = None
    error: str | None = None  # set when the engine failed this request (finish reason abort)
    # the exception behind ``error`` (its kind: a client's mistake, no group left, internal)
    failure: Exception | None = dataclasses.field(default=None, repr=False, compare=False)
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    num_cached_tokens: int | None = None  # prompt tokens the prefix cache held (vLLM's)


@dataclasses.dataclass
class EmbeddingOutput:
    """One prompt's embedding (``LLM.embed``)."""

    embedding: list[float]


@dataclasses.dataclass
class EmbeddingRequestOutput:
    """vLLM's shape for ``LLM.embed``: the prompt's token ids and its ``outputs.embedding``."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: EmbeddingOutput
    finished: bool = True


@dataclasses.dataclass
class ScoringOutput:
    """One pair's score (``LLM.score``)."""

    score: float


@dataclasses.dataclass
class ScoringRequestOutput:
    """vLLM's shape for ``LLM.score``: the pair's token ids and its ``outputs.score``."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: ScoringOutput
    finished: bool = True
