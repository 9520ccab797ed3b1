"""Verification of draft tokens: greedy prefix match and lossless rejection sampling.

The draft is greedy, so its distribution ``q`` is one-hot on the drafted token ``d``. Leviathan
et al.'s rule then reads: accept ``d`` with probability ``min(1, p(d) / q(d)) = p(d)``; at the
first rejection draw from the residual ``max(p - q, 0)``, that is ``p`` with ``d`` removed;
when every draft is accepted draw a bonus token from ``p`` of the next position. The emitted
tokens are distributed exactly as tokens drawn one by one from the target ``p`` (temperature,
top-k and top-p applied). Greedy rows accept while the draft equals the target's argmax.

Shape legend: B rows, K draft slots, V vocabulary, N logprobs.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from xds_jax.sampling.argmax import argmax_last
from xds_jax.sampling.draws import inverse_cdf
from xds_jax.sampling.truncation import truncate


def _keys(seed_B: jax.Array, step_B: jax.Array, k1: int, salt: int) -> jax.Array:
    """A key per row and position: ``fold_in(fold_in(key(seed), step + j), salt)``."""
    def row(seed, step):
        return jax.vmap(lambda j: jax.random.fold_in(
            jax.random.fold_in(jax.random.key(seed), step + j), salt))(jnp.arange(k1))
    return jax.vmap(row)(seed_B, step_B)


def _categorical(probs_NV: jax.Array, keys_N: jax.Array) -> jax.Array:
    return inverse_cdf(probs_NV, jax.vmap(jax.random.uniform)(keys_N))


@partial(jax.jit, static_argnames=("random", "top_k_top_p", "logprobs", "num_logprobs"))
def verify_drafts(logits_BKV: jax.Array, drafts_BK: jax.Array, num_drafts_B: jax.Array,
                  temperature_B: jax.Array, top_k_B: jax.Array, top_p_B: jax.Array,
                  seed_B: jax.Array, step_B: jax.Array, *, random: bool = False,
                  top_k_top_p: bool = False, logprobs: bool = True, num_logprobs: int = 0):
    """Tokens to emit per row and how many drafts were accepted.

    Args:
      logits_BKV: target logits ``[B, K + 1, V]`` at the last token and each draft.
      drafts_BK: drafted tokens; only the first ``num_drafts_B[b]`` of row b count.
      temperature_B, top_k_B, top_p_B: the rows' sampling parameters (0: greedy).
      seed_B, step_B: per-row seed and output length, for reproducible draws.

    Returns:
      ``tokens [B, K + 1]`` (row b emits ``tokens[b, :accepted[b] + 1]``), ``accepted [B]``,
      and for each emitted slot its logprob ``[B, K + 1]``, rank ``[B, K + 1]`` and the top-N
      ids and logprobs ``[B, K + 1, N]`` under the raw target distribution; only the first two
      when ``logprobs`` is False (no row asked for any: the log-softmax over the vocabulary
      is skipped, as the plain sampler skips it).
    """
    b, k1, v = logits_BKV.shape
    k = k1 - 1
    logits = logits_BKV.astype(jnp.float32)
    greedy_BK1 = argmax_last(logits)
    has_draft_BK = jnp.arange(k)[None, :] < num_drafts_B[:, None]
    drafts_pad = jnp.concatenate([drafts_BK, jnp.zeros((b, 1), drafts_BK.dtype)], axis=1)
    has_draft_BK1 = jnp.concatenate([has_draft_BK, jnp.zeros((b, 1), bool)], axis=1)
    accept_BK = has_draft_BK & (drafts_BK == greedy_BK1[:, :k])
    tokens_BK1 = greedy_BK1
    if random:
        temp = jnp.where(temperature_B > 0, temperature_B, 1.0)[:, None, None]
        scaled = (logits / temp).reshape(b * k1, v)
        if top_k_top_p:
            scaled = truncate(scaled, jnp.repeat(top_k_B, k1), jnp.repeat(top_p_B, k1))
        probs = jax.nn.softmax(scaled, axis=-1).reshape(b, k1, v)
        p_draft = jnp.take_along_axis(probs, drafts_pad[..., None], axis=-1)[..., 0]
        u = jax.vmap(jax.vmap(jax.random.uniform))(_keys(seed_B, step_B, k1, 1))
        sampled_accept = has_draft_BK & (u[:, :k] < p_draft[:, :k])
        residual = jnp.where(has_draft_BK1[..., None]
                             & (jnp.arange(v)[None, None, :] == drafts_pad[..., None]),
                             0.0, probs)
        residual = jnp.where(residual.sum(-1, keepdims=True) > 0, residual, probs)
        drawn = _categorical(residual.reshape(b * k1, v),
                             _keys(seed_B, step_B, k1, 2).reshape(b * k1)).reshape(b, k1)
        is_random = (temperature_B > 0)[:, None]
        accept_BK = jnp.where(is_random, sampled_accept, accept_BK)
        # Accepted slots emit the draft; the first rejected (or the bonus) slot the draw.
        tokens_BK1 = jnp.where(is_random, jnp.where(
            jnp.concatenate([sampled_accept, jnp.zeros((b, 1), bool)], axis=1),
            drafts_pad, drawn.astype(jnp.int32)), greedy_BK1)
    accepted_B = jnp.sum(jnp.cumprod(accept_BK.astype(jnp.int32), axis=1), axis=1)
    if not logprobs:
        return tokens_BK1, accepted_B.astype(jnp.int32)
    raw = jax.nn.log_softmax(logits, axis=-1)
    token_lp = jnp.take_along_axis(raw, tokens_BK1[..., None], axis=-1)[..., 0]
    rank = 1 + jnp.sum(raw > token_lp[..., None], axis=-1)
    num_logprobs = min(num_logprobs, raw.shape[-1])  # a bucketed width past a tiny vocabulary
    top_lp, top_ids = jax.lax.top_k(raw, max(num_logprobs, 1))
    return (tokens_BK1, accepted_B.astype(jnp.int32), token_lp, rank.astype(jnp.int32),
            top_ids[..., :num_logprobs], top_lp[..., :num_logprobs])
