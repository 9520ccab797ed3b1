"""Log-probabilities of a prompt's own tokens (vLLM's ``prompt_logprobs``) and a prompt's
embedding (``xds_jax.model.pooling``), apart from serving.

Scoring a prompt is one jitted forward over the whole prompt from an empty KV cache of its own,
on a DP group's own parameters and device(s), then the log-softmax of every position's logits.
The group's KV pages, its prefix cache and its compiled step programs are never touched, so
scoring requests cannot disturb the requests being served (nor reuse a cached prefix whose
logits were never kept). Prompts are padded to power-of-two lengths (one program per bucket and
``top_n``); the head runs over chunks of positions so a long prompt never holds its whole
``[S, V]`` logits at once.

Shape legend: S prompt positions (bucketed), C positions per chunk, V vocabulary, K top_n.
"""

from __future__ import annotations

import functools
import itertools
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from serving.core.runner import ModelRunner
from xds_jax.generate import bucket
from xds_jax.memory_maps import ProgramShapes
from xds_jax.model import stages
from xds_jax.model.config import ModelConfig
from xds_jax.model.params import model_dtype
from xds_jax.model.pooling import embed_tokens
from xds_jax.model.reference import forward, new_caches
from xds_jax.multihost import host_get
from xds_jax.outputs import Logprob
from xds_jax.sampling.params import logprobs_width

MIN_PROMPT_BUCKET = 16
# Logits that exist at once, [C, V] float32 (128 MB): C = 512 positions of SmolLM2's 49152
# tokens, 256 of Llama 3's 128256. Over a 2048-token prompt SmolLM2's head took 2.14 / 1.55 /
# 1.39 s in chunks of 128 / 256 / 512 positions (fewer passes over the head's weights).
HEAD_LOGITS = 1 << 25
MAX_HEAD_CHUNK = 512


def head_chunk(positions: int, vocab: int) -> int:
    """Positions per head pass: the largest power of two whose logits fit ``HEAD_LOGITS``
    (at least 16, at most ``MAX_HEAD_CHUNK``), and no more than the (power-of-two) prompt."""
    chunk = 1 << max(4, (HEAD_LOGITS // vocab).bit_length() - 1)
    return min(positions, chunk, MAX_HEAD_CHUNK)


@functools.partial(jax.jit, static_argnames=("cfg", "top_n"))
def score_tokens(params: dict, tokens_S: jax.Array, *, cfg: ModelConfig, top_n: int):
    """For each position ``i``, the log-probability of token ``i + 1`` given tokens ``..i``.

    Returns ``logprob [S]``, ``rank [S]`` (1 = likeliest), ``top_ids [S, K]`` and
    ``top_logprobs [S, K]``; the last position (and the padding) pairs with a dummy token.
    """
    s = tokens_S.shape[0]
    caches = new_caches(cfg, 1, s, model_dtype(params))
    x_1SD, _ = forward(params, cfg, tokens_S[None], jnp.arange(s)[None], caches,
                       jnp.zeros((1, 1), jnp.int32))
    chunk = head_chunk(s, cfg.vocab_size)
    next_S = jnp.concatenate([tokens_S[1:], jnp.zeros((1,), tokens_S.dtype)])

    def score_chunk(args):
        x_CD, next_C = args
        logprobs_CV = jax.nn.log_softmax(stages.head(params, cfg, x_CD), axis=-1)
        token_C = jnp.take_along_axis(logprobs_CV, next_C[:, None], axis=1)[:, 0]
        rank_C = 1 + jnp.sum(logprobs_CV > token_C[:, None], axis=-1)
        top_lps, top_ids = jax.lax.top_k(logprobs_CV, min(top_n, logprobs_CV.shape[-1]))
        return token_C, rank_C, top_ids, top_lps

    d = x_1SD.shape[-1]
    out = jax.lax.map(score_chunk, (x_1SD[0].reshape(s // chunk, chunk, d),
                                    next_S.reshape(s // chunk, chunk)))
    return tuple(a.reshape(s, *a.shape[2:]) for a in out)


class ScoringCancelled(Exception):
    """The request was aborted while its prompt waited for the scorer: it was not scored."""


class PromptScorer:
    """Scores prompts with one parameter copy on its device(s); one prompt at a time, so the
    memory scoring takes is bounded by the longest prompt."""

    def __init__(self, params: dict, cfg: ModelConfig, input_sharding: Any, tokenizer: Any):
        self.params, self.cfg = params, cfg
        self.input_sharding, self.tokenizer = input_sharding, tokenizer
        self.lock = threading.Lock()
        self._shapes_seen = ProgramShapes()

    def raw(self, ids: list[int], top_n: int,
            cancelled: threading.Event | None = None) -> tuple[np.ndarray, ...]:
        """``score_tokens`` of ``ids`` cut to the ``len(ids) - 1`` real positions; raises
        ``ScoringCancelled`` where ``cancelled`` is set by the time the scorer is free (a
        program once launched runs to its end)."""
        length = bucket(len(ids), MIN_PROMPT_BUCKET)
        tokens = np.zeros((length,), np.int32)
        tokens[: len(ids)] = ids
        with self.lock:
            if cancelled is not None and cancelled.is_set():
                raise ScoringCancelled
            width = max(logprobs_width(top_n), 1)
            self._shapes_seen.first_launch((length, width), "prompt scoring (positions, top)")
            out = score_tokens(self.params, jax.device_put(tokens, self.input_sharding),
                               cfg=self.cfg, top_n=width)
            out = host_get(out)
        return tuple(a[: len(ids) - 1] for a in out)

    def score(self, ids: list[int], top_n: int, cancelled: threading.Event | None = None
              ) -> list[dict[int, Logprob] | None]:
        """vLLM's ``prompt_logprobs``: None for the first token, then for each later token
        its own entry and the ``top_n`` likeliest tokens at its position (``cancelled``: as
        ``raw`` takes it)."""
        logprob, rank, top_ids, top_lps = self.raw(ids, top_n, cancelled)
        result: list[dict[int, Logprob] | None] = [None]
        for i, token in enumerate(ids[1:]):
            entry = {int(t): Logprob(float(lp), r + 1, self._piece(int(t)))
                     for r, (t, lp) in enumerate(zip(top_ids[i][:top_n], top_lps[i][:top_n],
                                                     strict=True))}
            if token not in entry:
                entry[token] = Logprob(float(logprob[i]), int(rank[i]), self._piece(token))
            result.append(entry)
        return result

    def embed(self, ids: list[int], pooling: str, normalize: bool) -> np.ndarray:
        """The embedding of ``ids`` (``xds_jax.model.pooling``), float32 ``[D]``."""
        length = bucket(len(ids), MIN_PROMPT_BUCKET)
        tokens = np.zeros((length,), np.int32)
        tokens[: len(ids)] = ids
        with self.lock:
            self._shapes_seen.first_launch((length, pooling, normalize),
                                           "embedding (positions, pooling, normalize)")
            out = embed_tokens(self.params, jax.device_put(tokens, self.input_sharding),
                               np.int32(len(ids)), cfg=self.cfg, pooling=pooling,
                               normalize=normalize)
            return np.asarray(host_get(out))

    def _piece(self, token: int) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode([token], False)


class PromptScoring:
    """A scorer per entry group of an engine (the group's ``ModelRunner`` parameters and
    devices), taken in turn; layouts whose groups hold no whole model (MA attention ranks) score
    on the loaded parameters on the default device."""

    def __init__(self, engine: Any, params: dict, cfg: ModelConfig, tokenizer: Any):
        runners = [g.runner for g in getattr(engine, "entry", [])
                   if isinstance(getattr(g, "runner", None), ModelRunner)]
        if runners:
            self.scorers = [PromptScorer(r.params, cfg, r.input_sharding, tokenizer)
                            for r in runners]
        else:
            device = jax.devices()[0]
            self.scorers = [PromptScorer(jax.device_put(params, device), cfg, device, tokenizer)]
        self._turns = itertools.cycle(range(len(self.scorers)))
        self._lock = threading.Lock()

    def _next(self) -> PromptScorer:
        with self._lock:
            return self.scorers[next(self._turns)]

    def score(self, ids: list[int], top_n: int, cancelled: threading.Event | None = None
              ) -> list[dict[int, Logprob] | None]:
        return self._next().score(ids, top_n, cancelled)

    def embed(self, ids: list[int], pooling: str, normalize: bool) -> np.ndarray:
        return self._next().embed(ids, pooling, normalize)
