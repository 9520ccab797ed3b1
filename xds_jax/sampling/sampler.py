"""Token sampling on device: penalties, temperature, top-k, top-p, min-p, seeded draws, logprobs.

Every row carries its own parameters, so one compiled program serves a mixed batch. The random
key of a row is ``fold_in(PRNGKey(seed), step)``: a seeded request draws the same tokens
whatever else shares its batch. Shape legend: B rows, V vocabulary, N returned logprobs.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from xds_jax.sampling.argmax import argmax_last
from xds_jax.sampling.draws import inverse_cdf
from xds_jax.sampling.params import SamplingParams, logprobs_program_width
from xds_jax.sampling.truncation import truncate


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingBatch:
    """Per-row sampling parameters as device arrays (``[B]`` each, counts ``[B, V]``)."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    repetition_penalty: jax.Array
    frequency_penalty: jax.Array
    presence_penalty: jax.Array
    seed: jax.Array
    step: jax.Array
    output_counts: jax.Array  # [B, V] int32: how often each token was generated
    prompt_mask: jax.Array  # [B, V] bool: token occurs in the prompt
    banned: jax.Array  # [B, V] bool: may not be sampled now (EOS before min_tokens)
    bias: jax.Array  # [B, V] float32 added to the logits (logit_bias)


@dataclasses.dataclass(frozen=True)
class SamplerFlags:
    """Static switches so a batch only pays for the filters it uses."""

    penalties: bool = False
    bias: bool = False  # some row has a logit_bias
    random: bool = False  # some row samples (temperature > 0); else all rows are greedy
    top_k_top_p: bool = False  # some sampling row has a top_k or a top_p (``truncation``)
    min_p: bool = False
    logprobs: bool = False  # some row asked for logprobs (even 0: the sampled token's)
    num_logprobs: int = 0


def flags_for(params: list[SamplingParams]) -> SamplerFlags:
    return SamplerFlags(
        penalties=any(p.penalized for p in params),
        bias=any(p.logit_bias for p in params),
        random=any(not p.greedy for p in params),
        top_k_top_p=any(p.top_p < 1 or p.top_k > 0 for p in params if not p.greedy),
        min_p=any(p.min_p > 0 for p in params if not p.greedy),
        logprobs=any(p.logprobs is not None for p in params),
        num_logprobs=logprobs_program_width(params),
    )


def make_batch(params: list[SamplingParams], seeds: list[int], steps: list[int],
               prompts: list[list[int]], outputs: list[list[int]], banned: list[list[int]],
               vocab_size: int, flags: SamplerFlags,
               allowed: list[np.ndarray | None] | None = None) -> SamplingBatch:
    """Host lists to a ``SamplingBatch`` (one row per sequence).

    Token statistics are built ``[B, V]`` only when penalties are on, the banned mask only
    when some row bans a token and the bias only when some row has one; otherwise they are
    ``[B, 1]`` and broadcast. ``allowed``: per row None or a ``[V]`` bool mask of the only
    ids it may draw (a grammar's); where it and the row's banned ids leave nothing, the
    grammar wins (``min_tokens`` yields to a grammar that is complete).
    """
    rows = len(params)
    f32 = partial(np.asarray, dtype=np.float32)
    width = vocab_size if flags.penalties else 1
    counts = np.zeros((rows, width), np.int32)
    in_prompt = np.zeros((rows, width), bool)
    if flags.penalties:
        for i, (prompt, out) in enumerate(zip(prompts, outputs, strict=True)):
            np.add.at(counts[i], np.asarray(out, np.int64), 1)
            in_prompt[i, prompt] = True
    allowed = allowed or [None] * rows
    masked = any(a is not None for a in allowed)
    ban = np.zeros((rows, vocab_size if any(banned) or masked else 1), bool)
    for i, ids in enumerate(banned):
        ban[i, [t for t in ids if 0 <= t < vocab_size]] = True  # others can never be drawn
        if allowed[i] is not None:
            ban[i] = ~allowed[i] if (ban[i] >= allowed[i]).all() else ban[i] | ~allowed[i]
    bias = np.zeros((rows, vocab_size if flags.bias else 1), np.float32)
    if flags.bias:
        for i, p in enumerate(params):
            for t, v in p.logit_bias.items():
                if t < vocab_size:  # others can never be drawn
                    bias[i, t] = v
    return SamplingBatch(
        temperature=f32([p.temperature for p in params]),
        top_k=np.asarray([min(p.top_k, vocab_size) for p in params], np.int32),
        top_p=f32([p.top_p for p in params]),
        min_p=f32([p.min_p for p in params]),
        repetition_penalty=f32([p.repetition_penalty for p in params]),
        frequency_penalty=f32([p.frequency_penalty for p in params]),
        presence_penalty=f32([p.presence_penalty for p in params]),
        seed=np.asarray([s % (1 << 32) for s in seeds], np.uint32),
        step=np.asarray(steps, np.int32),
        output_counts=counts,
        prompt_mask=in_prompt,
        banned=ban,
        bias=bias,
    )


def rows_batch(params: SamplingParams, rows: int, vocab_size: int,
               flags: SamplerFlags) -> SamplingBatch:
    """``rows`` rows of ``params`` with seed and step 0 and no prompt, outputs or bans: a
    batch whose programs compile, or are read, only for its shapes."""
    zeros, none = [0] * rows, [[]] * rows
    return make_batch([params] * rows, zeros, zeros, none, none, none, vocab_size, flags)


def apply_penalties(logits_BV: jax.Array, b: SamplingBatch) -> jax.Array:
    """vLLM semantics: repetition over prompt and output, frequency/presence over output."""
    seen = b.prompt_mask | (b.output_counts > 0)
    rep = b.repetition_penalty[:, None]
    penalised = jnp.where(logits_BV > 0, logits_BV / rep, logits_BV * rep)
    logits_BV = jnp.where(seen, penalised, logits_BV)
    counts = b.output_counts.astype(jnp.float32)
    logits_BV = logits_BV - b.frequency_penalty[:, None] * counts
    return logits_BV - b.presence_penalty[:, None] * (counts > 0)


def _draw(scaled_BV: jax.Array, b: SamplingBatch) -> jax.Array:
    """One categorical draw per row from a single uniform: the first token whose cumulative
    probability exceeds it (masked tokens have probability 0 and are never chosen)."""
    keys = jax.vmap(lambda s, t: jax.random.fold_in(jax.random.key(s), t))(b.seed, b.step)
    u = jax.vmap(lambda k: jax.random.uniform(k))(keys)
    return inverse_cdf(jax.nn.softmax(scaled_BV, axis=-1), u)


@partial(jax.jit, static_argnames=("flags",))
def sample(logits_BV: jax.Array, b: SamplingBatch, flags: SamplerFlags):
    """Choose one token per row.

    Returns:
      tokens ``[B]`` int32, their logprobs ``[B]``, their rank ``[B]`` (1 = most likely), and
      the top-N ids ``[B, N]`` and logprobs ``[B, N]`` (N = ``flags.num_logprobs``); the
      logprob outputs are zeros unless ``flags.logprobs``.
    """
    logits_BV = logits_BV.astype(jnp.float32)
    raw_logits = logits_BV
    if flags.bias:  # before the penalties, as vLLM applies its logits processors
        logits_BV = logits_BV + b.bias
    if flags.penalties:
        logits_BV = apply_penalties(logits_BV, b)
    logits_BV = jnp.where(b.banned, -jnp.inf, logits_BV)
    tokens_B = argmax_last(logits_BV)
    if flags.random:
        temp = jnp.where(b.temperature > 0, b.temperature, 1.0)[:, None]
        scaled = logits_BV / temp
        if flags.min_p:  # before top-k / top-p, as vLLM (V1) applies it
            probs = jax.nn.softmax(scaled, axis=-1)
            floor = b.min_p[:, None] * jnp.max(probs, axis=-1, keepdims=True)
            scaled = jnp.where(probs >= floor, scaled, -jnp.inf)
        if flags.top_k_top_p:
            scaled = truncate(scaled, b.top_k, b.top_p)
        tokens_B = jnp.where(b.temperature > 0, _draw(scaled, b), tokens_B)
    tokens_B = tokens_B.astype(jnp.int32)
    n = min(flags.num_logprobs, logits_BV.shape[-1])  # a bucketed width past a tiny vocabulary
    if not flags.logprobs:
        rows = tokens_B.shape[0]
        none = jnp.zeros((rows, 0), jnp.float32)
        return (tokens_B, jnp.zeros((rows,), jnp.float32), jnp.zeros((rows,), jnp.int32),
                none.astype(jnp.int32), none)
    raw_logprobs = jax.nn.log_softmax(raw_logits, axis=-1)
    token_lp = jnp.take_along_axis(raw_logprobs, tokens_B[:, None], axis=-1)[:, 0]
    rank = 1 + jnp.sum(raw_logprobs > token_lp[:, None], axis=-1)
    top_lp, top_ids = jax.lax.top_k(raw_logprobs, max(n, 1))
    return tokens_B, token_lp, rank.astype(jnp.int32), top_ids[:, :n], top_lp[:, :n]
