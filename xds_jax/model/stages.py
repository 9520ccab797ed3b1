"""The model as stages: pure functions a runner jits separately and places on device slices.

| stage         | inputs                                   | outputs                            |
|---------------|------------------------------------------|------------------------------------|
| embed         | token ids [B, S]                         | hidden [B, S, D]                   |
| attention     | hidden, positions, KV pages, block table | hidden (residual added), KV pages  |
| ffn           | hidden                                   | hidden (residual added)            |
| moe_gate      | hidden                                   | normed hidden, ids [T, K], weights |
| moe_experts   | dispatched tokens [E, C, D]              | expert outputs [E, C, D]           |
| moe_shared    | normed hidden                            | shared-expert output               |
| moe_combine   | hidden, routed output, shared output     | hidden (residual added)            |
| head          | hidden [..., D]                          | logits [..., V] float32            |

``cfg`` (a frozen ``ModelConfig``) is static; everything else is an array or a pytree of them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xds_jax.model.attention import as_bits, from_bits, gqa_attention, mla_attention
from xds_jax.model.config import ModelConfig
from xds_jax.model.layers import matmul_f32, rms_norm, swiglu
from xds_jax.model.moe import expert_ffn, moe_local, route
from xds_jax.model.quant import SCALE_SUFFIX


def embed(params: dict, tokens_BS: jax.Array) -> jax.Array:
    """Token embeddings ``[B, S, D]`` in float32: the hidden state between layers is float32
    whatever the weights' dtype (element-wise math is fastest there; matmuls cast their input)."""
    table = params["embed"]
    rows = from_bits(jnp.take(as_bits(table), tokens_BS, axis=0, mode="clip"),
                     table.dtype).astype(jnp.float32)
    scale_V = params.get("embed" + SCALE_SUFFIX)  # int8 rows: one scale per vocabulary row
    if scale_V is None:
        return rows
    return rows * jnp.take(scale_V, tokens_BS, axis=0, mode="clip")[..., None]


def attention(layer: dict, cfg: ModelConfig, x_BSD: jax.Array, positions_BS: jax.Array,
              cache: dict, block_tables_BN: jax.Array, index: int | None = None
              ) -> tuple[jax.Array, dict]:
    """Pre-norm attention with residual: ``x + attn(norm(x))`` (Gemma 2/3's sandwich: ``x +
    norm(attn(norm(x)))``, ``attn["out_norm"]``; OLMo 2's post-norm: ``x + norm(attn(x))``);
    writes this layer's KV pages. ``index``: the layer's number, for models whose layers
    attend differently (``ModelConfig.attention_kind``)."""
    post = cfg.norm_placement == "post"
    h = x_BSD if post else rms_norm(x_BSD, layer["input_norm"], cfg.rms_norm_eps)
    attend = mla_attention if cfg.mla is not None else gqa_attention
    out, cache = attend(layer["attn"], cfg, h, positions_BS, cache, block_tables_BN, index)
    if post:
        out = rms_norm(out, layer["input_norm"], cfg.rms_norm_eps)
    elif "out_norm" in layer["attn"]:
        out = rms_norm(out, layer["attn"]["out_norm"], cfg.rms_norm_eps)
    return x_BSD + out, cache


def ffn(layer: dict, cfg: ModelConfig, x: jax.Array) -> jax.Array:
    """Dense SwiGLU (GeGLU) block with residual: ``x + mlp(norm(x))``, or Gemma 2/3's ``x +
    norm(mlp(norm(x)))`` (``mlp["out_norm"]``), or OLMo 2's ``x + norm(mlp(x))``."""
    if cfg.norm_placement == "post":
        y = swiglu(layer["mlp"], x, cfg.mlp_act)
        return x + rms_norm(y, layer["post_norm"], cfg.rms_norm_eps)
    y = swiglu(layer["mlp"], rms_norm(x, layer["post_norm"], cfg.rms_norm_eps), cfg.mlp_act)
    if "out_norm" in layer["mlp"]:
        y = rms_norm(y, layer["mlp"]["out_norm"], cfg.rms_norm_eps)
    return x + y


def moe_gate(layer: dict, cfg: ModelConfig, x_TD: jax.Array):
    """Normalise and route. Returns ``(h [T, D], ids [T, K], weights [T, K], logits [T, E])``.

    ``h`` is in the experts' dtype: it is only ever a matmul input, and dispatch moves it.
    """
    h_TD = rms_norm(x_TD, layer["post_norm"], cfg.rms_norm_eps)
    h_TD = h_TD.astype(layer["moe"]["router"].dtype)
    ids_TK, w_TK, logits_TE = route(layer["moe"], cfg.moe, h_TD)
    return h_TD, ids_TK, w_TK, logits_TE


def moe_experts(experts: dict, x_ECD: jax.Array) -> jax.Array:
    """Expert SwiGLU on tokens already dispatched to their experts, ``[E, C, D]``."""
    return expert_ffn(experts, x_ECD)


def moe_shared(layer: dict, cfg: ModelConfig, h_TD: jax.Array) -> jax.Array:
    """Shared-expert output (zeros when the model has none)."""
    p = layer["moe"]
    if not cfg.moe.num_shared_experts:
        return jnp.zeros(h_TD.shape, jnp.float32)
    out = swiglu(p["shared"], h_TD)
    if cfg.moe.shared_expert_gate:
        out = out * jax.nn.sigmoid(matmul_f32(h_TD, p["shared_gate"]))
    return out


def moe_combine(x_TD: jax.Array, routed_TD: jax.Array, shared_TD: jax.Array) -> jax.Array:
    """Residual plus routed and shared expert outputs."""
    return x_TD + routed_TD.astype(x_TD.dtype) + shared_TD.astype(x_TD.dtype)


def moe_block(layer: dict, cfg: ModelConfig, x: jax.Array) -> jax.Array:
    """A whole MoE block on one device: gate, all experts locally, shared, combine."""
    shape = x.shape
    x_TD = x.reshape(-1, shape[-1])
    h_TD, ids_TK, w_TK, _ = moe_gate(layer, cfg, x_TD)
    routed = moe_local(layer["moe"]["experts"], h_TD, ids_TK, w_TK)
    return moe_combine(x_TD, routed, moe_shared(layer, cfg, h_TD)).reshape(shape)


def feed_forward(layer: dict, cfg: ModelConfig, index: int, x: jax.Array) -> jax.Array:
    """Layer ``index``'s FFN part: dense or MoE, as the config says."""
    return moe_block(layer, cfg, x) if cfg.is_moe_layer(index) else ffn(layer, cfg, x)


def head(params: dict, cfg: ModelConfig, x: jax.Array) -> jax.Array:
    """Final norm and LM head, logits in float32."""
    h = rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
    if cfg.tie_word_embeddings:  # contract with the embedding as stored: no transposed copy
        logits = matmul_f32(h, params["embed"], w_transposed=True,
                            scale=params.get("embed" + SCALE_SUFFIX))
    else:
        logits = matmul_f32(h, params["lm_head"], scale=params.get("lm_head" + SCALE_SUFFIX))
    if cfg.logits_scale != 1.0:
        logits = logits * cfg.logits_scale
    if cfg.final_softcap is not None:  # Gemma 2
        logits = cfg.final_softcap * jnp.tanh(logits / cfg.final_softcap)
    return logits
