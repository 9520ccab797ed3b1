"""DeepSeek multi-token prediction (MTP) as a draft model: pure stage functions.

One MTP block turns the target model's hidden state at position ``p`` (before the final norm)
and the embedding of token ``p + 1`` into a prediction of token ``p + 2``::

    h = eh_proj([enorm(embed(t[p + 1])), hnorm(hidden[p])])     # [.., 2D] @ [2D, D]
    h = decoder_block(h, position p)                             # its own paged KV
    logits = lm_head(final_norm(h))                              # the target's shared head

Drafting ``k`` tokens runs the first MTP block ``k`` times, each time feeding its own output
hidden state as the next "target" hidden (vLLM and SGLang do the same with DeepSeek's one
released MTP layer). The block's KV lives in its own pages, indexed by the target's block
table, so it is freed and rolled back with the target's KV.

A block may carry a draft vocabulary (FR-Spec, EAGLE-3): ``vocab_ids [N]`` (int32 target ids)
and ``head [N, D]`` (those rows of the target's LM head). Its logits then cover those ``N``
tokens only and drafts are mapped back to target ids: a smaller head is cheaper to read at
small batch (``xds_jax/assets/mtp``). Blocks without them (DeepSeek) use the full shared head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xds_jax.engine_config import MAX_SPECULATIVE_TOKENS  # one MTP block drifts past a few
from xds_jax.model import stages
from xds_jax.model.config import ModelConfig
from xds_jax.model.layers import matmul_f32, project, rms_norm
from xds_jax.sampling.argmax import argmax_last

__all__ = ["MAX_SPECULATIVE_TOKENS", "draft_argmax", "draft_tokens", "mtp_block", "mtp_input",
           "mtp_logits"]


def mtp_block(block: dict, params: dict, cfg: ModelConfig, tokens_BS: jax.Array,
              hidden_BSD: jax.Array, positions_BS: jax.Array, cache: dict,
              block_tables_BN: jax.Array) -> tuple[jax.Array, dict]:
    """Hidden states ``[B, S, D]`` of one MTP block (before its final norm) and its new cache.

    ``tokens_BS[b, s]`` is the token after the one whose target hidden is ``hidden_BSD[b, s]``;
    ``positions_BS`` are the target positions of those hiddens (negative: padding).
    """
    x = mtp_input(block, params, cfg, tokens_BS, hidden_BSD)
    layer = block["layer"]
    x, cache = stages.attention(layer, cfg, x, positions_BS, cache, block_tables_BN)
    if "moe" in layer:
        x = stages.moe_block(layer, cfg, x)
    else:
        x = stages.ffn(layer, cfg, x)
    return x, cache


def mtp_input(block: dict, params: dict, cfg: ModelConfig, tokens_BS: jax.Array,
              hidden_BSD: jax.Array) -> jax.Array:
    """The block's decoder input ``[B, S, D]``: ``eh_proj([enorm(embed(t)), hnorm(h)])``."""
    e = rms_norm(stages.embed(params, tokens_BS), block["enorm"], cfg.rms_norm_eps)
    h = rms_norm(hidden_BSD.astype(e.dtype), block["hnorm"], cfg.rms_norm_eps)
    return project(block, "eh_proj", jnp.concatenate([e, h], axis=-1))


def mtp_logits(block: dict, params: dict, cfg: ModelConfig, x: jax.Array) -> jax.Array:
    """The shared head on an MTP hidden state: the block's norm, the target's LM head (only
    the rows of the block's draft vocabulary when it has one: ``[..., N]``)."""
    if "vocab_ids" in block:
        h = rms_norm(x, block["final_norm"], cfg.rms_norm_eps)
        return matmul_f32(h, block["head"], w_transposed=True)
    return stages.head({**params, "final_norm": block["final_norm"]}, cfg, x)


def draft_argmax(block: dict, params: dict, cfg: ModelConfig, x: jax.Array) -> jax.Array:
    """The greedy draft (a target token id, int32) of an MTP hidden state."""
    ids = argmax_last(mtp_logits(block, params, cfg, x))
    return block["vocab_ids"][ids] if "vocab_ids" in block else ids


def draft_tokens(block: dict, params: dict, cfg: ModelConfig, tokens_BW: jax.Array,
                 hidden_BWD: jax.Array, positions_BW: jax.Array, last_B: jax.Array,
                 num_drafts_B: jax.Array, cache: dict, block_tables_BN: jax.Array,
                 k: int) -> tuple[jax.Array, dict]:
    """Greedy draft of ``k`` tokens per row ``[B, k]`` and the MTP block's new cache.

    First the block runs over each row's pending (target hidden, next token) pairs, ``W``
    wide (writing its KV with the target's true hiddens); the output at ``last_B`` drafts
    token 1. Then draft ``j + 1`` comes from the block's own hidden and draft ``j``, at the
    next position; rows write KV only for their first ``num_drafts_B`` drafts.
    """
    x, cache = mtp_block(block, params, cfg, tokens_BW, hidden_BWD, positions_BW, cache,
                         block_tables_BN)
    g_BD = jnp.take_along_axis(x, last_B[:, None, None], axis=1)[:, 0]
    position_B = jnp.take_along_axis(positions_BW, last_B[:, None], axis=1)[:, 0]
    drafts = [draft_argmax(block, params, cfg, g_BD)]
    for j in range(1, k):
        pos_B = jnp.where((j < num_drafts_B) & (position_B >= 0), position_B + j, -1)
        out, cache = mtp_block(block, params, cfg, drafts[-1][:, None], g_BD[:, None],
                               pos_B[:, None], cache, block_tables_BN)
        g_BD = out[:, 0]
        drafts.append(draft_argmax(block, params, cfg, g_BD))
    return jnp.stack(drafts, axis=1), cache
