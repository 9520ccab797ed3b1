"""The whole model as a chain of stages, on one device: the ground truth for every other path.

``forward`` is jitted whole by the single-device loop; distributed runners call the same stage
functions one by one on their own device slices.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from xds_jax.model import stages
from xds_jax.model.attention import new_layer_cache
from xds_jax.model.config import ModelConfig
from xds_jax.model.params import model_dtype
from xds_jax.sampling.argmax import argmax_last

# A layer's two stages as programs of their own, keyed by the first layer of the same kind
# (``attention_kind_layer``, ``dense_or_moe``). ``staged_step`` dispatches them one by one
# (the KV pages donated); inside the whole-model programs (``forward``) the layers of a kind
# call one function, traced and lowered once (XLA inlines the calls and ignores a nested
# donation: the compiled step is the same op for op). SmolLM2's 30 layers were traced and
# lowered one by one: 0.65 s of each step shape's 2.4 s (with the test suite's XLA flags),
# now 0.17 s.
_embed = jax.jit(stages.embed)
_attention = jax.jit(stages.attention, static_argnums=(1, 6), donate_argnums=4)
_feed_forward = jax.jit(stages.feed_forward, static_argnums=(1, 2))


def dense_or_moe(cfg: ModelConfig, index: int) -> int:
    """A layer index standing for its kind, so all dense (or all MoE) layers share a program."""
    return next(i for i in range(cfg.num_layers) if cfg.is_moe_layer(i) == cfg.is_moe_layer(index))


def forward(params: dict, cfg: ModelConfig, tokens_BS: jax.Array, positions_BS: jax.Array,
            caches: list[dict], block_tables_BN: jax.Array) -> tuple[jax.Array, list[dict]]:
    """Hidden states ``[B, S, D]`` after the last layer (before the final norm), new caches."""
    outs, new_caches = layer_outputs(params, cfg, stages.embed(params, tokens_BS), positions_BS,
                                     caches, block_tables_BN)
    return outs[-1], new_caches


def layer_outputs(params: dict, cfg: ModelConfig, x_BSD: jax.Array, positions_BS: jax.Array,
                  caches: list[dict], block_tables_BN: jax.Array
                  ) -> tuple[list[jax.Array], list[dict]]:
    """Every layer's output ``[B, S, D]`` from embeddings ``x_BSD``, and the new caches."""
    outs, new_caches = [], []
    for i, layer in enumerate(params["layers"]):
        x_BSD, cache = _attention(layer, cfg, x_BSD, positions_BS, caches[i], block_tables_BN,
                                  cfg.attention_kind_layer(i))
        x_BSD = _feed_forward(layer, cfg, dense_or_moe(cfg, i), x_BSD)
        outs.append(x_BSD)
        new_caches.append(cache)
    return outs, new_caches


def last_token_logits(params: dict, cfg: ModelConfig, x_BSD: jax.Array,
                      last_B: jax.Array) -> jax.Array:
    """Logits ``[B, V]`` of token ``last_B[b]`` of each sequence."""
    x_BD = jnp.take_along_axis(x_BSD, last_B[:, None, None], axis=1)[:, 0]
    return stages.head(params, cfg, x_BD)


def last_token_outputs(params: dict, cfg: ModelConfig, x_BSD: jax.Array,
                       last_B: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Logits ``[B, V]`` of token ``last_B[b]`` of each row and their greedy tokens ``[B]``
    (int32): an all-greedy batch takes them as sampled, with no sampler program after the
    step (``xds_jax.sampling.rows.dispatch_rows``)."""
    logits_BV = last_token_logits(params, cfg, x_BSD, last_B)
    return logits_BV, argmax_last(logits_BV)


def new_caches(cfg: ModelConfig, num_pages: int, page_size: int, dtype) -> list[dict]:
    """Zeroed KV pages for every layer."""
    return [new_layer_cache(cfg, num_pages, page_size, dtype) for _ in range(cfg.num_layers)]


MIN_REFERENCE_LENGTH = 16


def reference_length(t: int, max_positions: int) -> int:
    """The length a ``t``-token sequence runs at in the whole-sequence references: the next
    power of two (at least ``MIN_REFERENCE_LENGTH``, at most the model's positions unless
    ``t`` is past them). Tokens past ``t`` are padding that the causal mask hides from the
    real ones, so one program serves every length up to it (the test suite compiled one per
    prompt length: most of its compile time)."""
    bucket = max(MIN_REFERENCE_LENGTH, 1 << max(0, t - 1).bit_length())
    return max(t, min(bucket, max_positions))


def _padded(tokens, cfg: ModelConfig) -> jax.Array:
    """``tokens`` with zeros to ``reference_length``; on the host where they are concrete
    (a device pad would compile once per length)."""
    xp = jnp if isinstance(tokens, jax.core.Tracer) else np
    tokens = xp.asarray(tokens)
    t = tokens.shape[0]
    return xp.pad(tokens, (0, reference_length(t, cfg.max_position_embeddings) - t))


@functools.partial(jax.jit, static_argnames=("cfg",))
def _reference_logits(params: dict, cfg: ModelConfig, tokens: jax.Array) -> jax.Array:
    t = tokens.shape[0]
    caches = new_caches(cfg, 1, t, model_dtype(params))
    x, _ = forward(params, cfg, tokens[None], jnp.arange(t)[None], caches,
                   jnp.zeros((1, 1), jnp.int32))
    return stages.head(params, cfg, x[0])


def reference_logits(params: dict, cfg: ModelConfig, tokens: jax.Array) -> jax.Array:
    """Logits ``[T, V]`` of one sequence, every position, from an empty cache of one page
    (run padded to ``reference_length(T)``)."""
    t = len(tokens)
    return _reference_logits(params, cfg, _padded(tokens, cfg))[:t]


@functools.partial(jax.jit, static_argnames=("cfg",))
def _reference_hidden_states(params: dict, cfg: ModelConfig, tokens: jax.Array) -> jax.Array:
    t = tokens.shape[0]
    caches = new_caches(cfg, 1, t, model_dtype(params))
    positions, table = jnp.arange(t)[None], jnp.zeros((1, 1), jnp.int32)
    x = stages.embed(params, tokens[None])
    outs, _ = layer_outputs(params, cfg, x, positions, caches, table)
    return jnp.stack([x[0]] + [out[0] for out in outs])


def reference_hidden_states(params: dict, cfg: ModelConfig, tokens: jax.Array) -> jax.Array:
    """``[L + 1, T, D]``: the embedding, then the output of every layer (run padded, as
    ``reference_logits``)."""
    t = len(tokens)
    return _reference_hidden_states(params, cfg, _padded(tokens, cfg))[:, :t]


_last_outputs = jax.jit(last_token_outputs, static_argnums=1)


def staged_step(params: dict, cfg: ModelConfig, tokens_BS: jax.Array, positions_BS: jax.Array,
                caches: list[dict], block_tables_BN: jax.Array,
                last_B: jax.Array) -> tuple[jax.Array, jax.Array, list[dict]]:
    """One step as separately jitted stage programs: embed, then per layer attention (KV pages
    donated) and dense/MoE FFN, then the head. Each stage compiles once per shape and is reused
    by every layer, so compile time does not grow with depth; dispatch is asynchronous.
    Returns logits, greedy tokens (``last_token_outputs``) and caches, as ``model_step``."""
    x = _embed(params, tokens_BS)
    new = []
    for i, layer in enumerate(params["layers"]):
        x, cache = _attention(layer, cfg, x, positions_BS, caches[i], block_tables_BN,
                              cfg.attention_kind_layer(i))
        x = _feed_forward(layer, cfg, dense_or_moe(cfg, i), x)
        new.append(cache)
    return *_last_outputs(params, cfg, x, last_B), new
