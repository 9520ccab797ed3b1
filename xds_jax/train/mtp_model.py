"""The MTP block as a trainable dense function, and its distillation loss.

Serving runs the block over paged KV (``xds_jax.model.mtp.mtp_block``); training runs it over
whole padded sequences with dense causal attention (same projections, RoPE, norms and FFN, so
the trained weights serve unchanged; ``tests/xds_jax/test_mtp_train.py`` checks the two agree).

Two passes mirror drafting ``k = 2``: pass 1 takes the target's hidden ``h[s]`` and token
``t[s+1]`` at position ``s`` and predicts the target's choice for token ``s+2``; pass 2 takes
pass 1's own output ``g[s]`` and that token at position ``s+1`` and predicts token ``s+3``.
Its queries attend to pass-1 keys at positions ``<= s`` and to their own key only, which is
what the serving block's KV holds when it drafts its second token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from xds_jax.model import stages
from xds_jax.model.config import ModelConfig
from xds_jax.model.fused import unfuse_layer
from xds_jax.model.layers import (
    apply_rope,
    attention_scale,
    linear,
    matmul_f32,
    rms_norm,
    rope_cos_sin,
)


def init_block(params: dict, cfg: ModelConfig, seed: int) -> dict:
    """A float32 MTP block: the target's last decoder layer and final norm as a start, fresh
    ``eh_proj`` (normal, 0.02) and unit ``enorm`` / ``hnorm``."""
    d = cfg.hidden_size
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    rng = np.random.default_rng(seed)
    return {"enorm": jnp.ones((d,)), "hnorm": jnp.ones((d,)),
            "eh_proj": f32(rng.normal(0.0, 0.02, (2 * d, d))),
            "layer": jax.tree_util.tree_map(f32, unfuse_layer(params["layers"][-1], cfg)),
            "final_norm": f32(params["final_norm"])}


def block_pass(block: dict, embed_VD: jax.Array, cfg: ModelConfig, tokens_BS: jax.Array,
               hidden_BSD: jax.Array, positions_BS: jax.Array, prev_kv: tuple | None = None):
    """The block's output ``[B, S, D]`` (before its final norm) and its keys and values.

    Without ``prev_kv``: causal attention over the pass's own keys (index = position).
    With ``prev_kv`` (pass 1's keys and values): query ``s`` sees those at ``<= s`` and its own.
    """
    eps = cfg.rms_norm_eps
    e = rms_norm(jnp.take(embed_VD, tokens_BS, axis=0), block["enorm"], eps)
    h = rms_norm(hidden_BSD, block["hnorm"], eps)
    x = matmul_f32(jnp.concatenate([e, h], axis=-1), block["eh_proj"])
    layer, p = block["layer"], block["layer"]["attn"]
    b, s, _ = x.shape
    nh, nk, dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    hn = rms_norm(x, layer["input_norm"], eps)
    q = linear(hn, p["q"], p.get("q_bias")).reshape(b, s, nh, dh)
    k = linear(hn, p["k"], p.get("k_bias")).reshape(b, s, nk, dh)
    v = linear(hn, p["v"], p.get("v_bias")).reshape(b, s, nk, dh)
    cos, sin = rope_cos_sin(cfg, positions_BS)
    q = apply_rope(q, cos, sin, cfg.rope.interleaved).reshape(b, s, nk, nh // nk, dh)
    k = apply_rope(k, cos, sin, cfg.rope.interleaved)
    keys, vals = (k, v) if prev_kv is None else prev_kv
    scores = jnp.einsum("bskgd,blkd->bkgsl", q, keys) * attention_scale(cfg)
    causal = jnp.arange(s)[None, :] <= jnp.arange(s)[:, None]
    scores = jnp.where(causal, scores, -jnp.inf)
    if prev_kv is None:
        probs = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("bkgsl,blkd->bskgd", probs, vals)
    else:
        own = jnp.einsum("bskgd,bskd->bkgs", q, k) * attention_scale(cfg)
        probs = jax.nn.softmax(jnp.concatenate([scores, own[..., None]], axis=-1), axis=-1)
        out = (jnp.einsum("bkgsl,blkd->bskgd", probs[..., :s], vals)
               + jnp.einsum("bkgs,bskd->bskgd", probs[..., s], v))
    x = x + linear(out.reshape(b, s, nh * dh), p["o"], p.get("o_bias"))
    return stages.ffn(layer, cfg, x), (k, v)


def draft_logits(block: dict, head_ND: jax.Array, cfg: ModelConfig, x: jax.Array) -> jax.Array:
    """Logits over the draft vocabulary ``[..., N]`` (as ``xds_jax.model.mtp.mtp_logits``)."""
    return matmul_f32(rms_norm(x, block["final_norm"], cfg.rms_norm_eps), head_ND,
                      w_transposed=True)


def teacher_logits(hidden_BSD: jax.Array, norm_D: jax.Array, head_ND: jax.Array,
                   cfg: ModelConfig, ahead: int) -> jax.Array:
    """The target's logits over the draft vocabulary for the token ``ahead + 1`` positions on
    ``[B, S, N]``: its head over its own hidden at ``s + ahead`` (wrapping at the end, where
    no pair is used)."""
    h = jnp.roll(hidden_BSD, -ahead, axis=1).astype(jnp.float32)
    return matmul_f32(rms_norm(h, norm_D, cfg.rms_norm_eps), head_ND, w_transposed=True)


def _masked_loss(logits, labels, teacher, mask, soft: float):
    """``soft`` x cross-entropy to the teacher's distribution (KL up to a constant) plus
    ``1 - soft`` x cross-entropy to its choice, averaged over ``mask``; and the hits.
    ``teacher``: the teacher's logits, None when ``soft`` is 0 (nothing reads them then)."""
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0))
    if soft:
        dist = optax.softmax_cross_entropy(logits, jax.nn.softmax(teacher, axis=-1))
        loss = soft * dist + (1.0 - soft) * loss
    hit = (jnp.argmax(logits, axis=-1) == labels) & mask
    return jnp.sum(loss * mask) / jnp.maximum(mask.sum(), 1), hit


def two_pass_loss(block: dict, embed_VD: jax.Array, head_ND: jax.Array, cfg: ModelConfig,
                  batch: dict, teacher_norm_D: jax.Array, soft: float = 1.0):
    """Mean distillation loss of both passes, and per-row hits ``(hit1, hit2) [B, S]``.

    ``batch``: ``hidden [B, S, D]``, ``tok1``/``tok2``, ``lab1``/``lab2`` (draft-vocabulary
    indices, -1 outside it) and ``use1``/``use2`` masks ``[B, S]``. Each pass is pulled towards
    the target's next-token distribution over the draft vocabulary (``teacher_norm_D``: the
    target's final norm; ``soft`` weighs it against the target's hard choice).
    """
    s = batch["tok1"].shape[1]
    pos = jnp.broadcast_to(jnp.arange(s), batch["tok1"].shape)
    hidden = batch["hidden"].astype(jnp.float32)
    g, kv = block_pass(block, embed_VD, cfg, batch["tok1"], hidden, pos)
    m1 = batch["use1"] & (batch["lab1"] >= 0)
    t1 = teacher_logits(hidden, teacher_norm_D, head_ND, cfg, 1) if soft else None
    l1, hit1 = _masked_loss(draft_logits(block, head_ND, cfg, g), batch["lab1"], t1, m1, soft)
    g2, _ = block_pass(block, embed_VD, cfg, batch["tok2"], g, pos + 1, prev_kv=kv)
    m2 = batch["use2"] & (batch["lab2"] >= 0)
    t2 = teacher_logits(hidden, teacher_norm_D, head_ND, cfg, 2) if soft else None
    l2, hit2 = _masked_loss(draft_logits(block, head_ND, cfg, g2), batch["lab2"], t2, m2, soft)
    return l1 + l2, (hit1, hit2)


def make_batch(c, rows, index_of: np.ndarray, prompt_pairs: bool = False) -> dict:
    """Pass inputs, labels and masks (``two_pass_loss``) for rows ``rows`` of corpus ``c``.

    ``choice[s]`` is the target's pick for token ``s+1``; ``index_of`` maps a target id to its
    draft-vocabulary index (-1 outside). By default only pairs that decoding drafts from count:
    ``s`` from the last prompt token on (the prompt's pairs only fill the block's KV). With
    ``prompt_pairs`` the prompt's pairs are labelled too (the target's pick after each prompt
    token: more data at no cost, the same positions run either way). Pass 2 at ``s`` needs
    ``t[s+2]`` to be the target's pick, so that the target's next pick after it is known.
    """
    tokens, lengths, choice = c.tokens[rows], c.lengths[rows], c.choice[rows]
    b, s = tokens.shape
    shift = lambda a, n: np.concatenate([a[:, n:], np.zeros((b, n), a.dtype)], axis=1)  # noqa: E731
    idx = np.arange(s)[None, :]
    first = 0 if prompt_pairs else c.prompt_lens[rows][:, None]
    use1 = (idx + 1 <= lengths[:, None] - 1) & (idx + 1 >= first)
    use2 = use1 & (idx + 2 <= lengths[:, None] - 1) & (shift(tokens, 2) == shift(choice, 1))
    return {"hidden": c.hidden[rows], "tok1": shift(tokens, 1), "tok2": shift(tokens, 2),
            "lab1": index_of[shift(choice, 1)], "lab2": index_of[shift(choice, 2)],
            "use1": use1, "use2": use2}
