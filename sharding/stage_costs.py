"""FLOPs and compulsory bytes of the model's stages, from XLA's cost analysis on CPU.

Each stage function of ``xds_jax.model.stages`` is lowered with ``jax.jit(...).lower`` on
``ShapeDtypeStruct`` inputs at the target shapes (lowering allocates nothing and takes a
fraction of a second even at DeepSeek-V3 sizes) and ``Lowered.cost_analysis()["flops"]`` is
read. XLA's ``bytes accessed`` is not used: it counts every unfused intermediate (8.2 GB for
one DeepSeek-V3 attention layer at 96 tokens and 3K context, against 0.3 GB of weights and
KV), which a fused decode kernel never writes. Bytes are instead the compulsory traffic,
counted from the same abstract inputs: weight elements, cached KV elements read, and hidden
states in and out; ``sharding.perf_model`` prices them at the hardware's itemsizes.

The attention stage is lowered at context ``L`` and ``2L``: the difference is the
context-dependent core (scores and values over the cache, run at the BF16 peak), the rest
the projections (run as GEMMs).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from xds_jax.model import stages
from xds_jax.model.config import ModelConfig
from xds_jax.model.params import layer_shapes

PAGE = 64  # tokens per KV page of the abstract cache; any size gives the same FLOPs


@dataclasses.dataclass(frozen=True)
class StageCost:
    """One call of a stage. ``gemm_flops`` run at the matmul peak, ``core_flops`` (attention
    over the cache) at the BF16 peak; element counts are priced by the hardware."""

    gemm_flops: float
    weight_elems: int
    act_elems: int = 0
    core_flops: float = 0.0
    kv_latent_elems: int = 0  # latent (or K/V) elements read from the cache
    kv_rope_elems: int = 0  # MLA rotary-key elements read (always 2 bytes)


def _abstract(tree, dtype=jnp.bfloat16):
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, dtype), tree,
                        is_leaf=lambda x: isinstance(x, tuple))


def _elems(tree) -> int:
    return sum(math.prod(a.shape) for a in jax.tree.leaves(tree))


def xla_flops(fn, *args, static_argnums=()) -> float:
    """FLOPs XLA counts for ``fn(*args)`` (abstract args; nothing runs or allocates)."""
    lowered = jax.jit(fn, static_argnums=static_argnums).lower(*args)
    return float(lowered.cost_analysis()["flops"])


def _layer(cfg: ModelConfig, moe: bool) -> dict:
    index = next(i for i in range(cfg.num_layers) if cfg.is_moe_layer(i) == moe)
    return _abstract(layer_shapes(cfg, index))


def _attention_flops(cfg: ModelConfig, batch: int, query: int, context: int) -> float:
    layer = _layer(cfg, cfg.moe is not None)
    pages = -(-context // PAGE)
    heads, dims = cfg.kv_cache_dims()
    kinds = ("c",) if cfg.mla is not None else ("k", "v")
    cache = {k: jax.ShapeDtypeStruct((batch * pages, PAGE, heads, dims), jnp.bfloat16)
             for k in kinds}
    x = jax.ShapeDtypeStruct((batch, query, cfg.hidden_size), jnp.bfloat16)
    pos = jax.ShapeDtypeStruct((batch, query), jnp.int32)
    table = jax.ShapeDtypeStruct((batch, pages), jnp.int32)
    return xla_flops(stages.attention, layer, cfg, x, pos, cache, table, static_argnums=1)


@functools.lru_cache(maxsize=256)
def attention_cost(cfg: ModelConfig, batch: int, query: int, context: int) -> StageCost:
    """Attention of ``batch`` sequences, ``query`` new tokens each, over ``context`` cached
    tokens: pre-norm, projections, MLA (or GQA) over the cache, output projection."""
    base = _attention_flops(cfg, batch, query, context)
    core = _attention_flops(cfg, batch, query, 2 * context) - base
    weights = _elems(_layer(cfg, cfg.moe is not None)["attn"])
    tokens = batch * context
    heads, dims = cfg.kv_cache_dims()
    if cfg.mla is not None:
        latent, rope = tokens * cfg.mla.kv_lora_rank, tokens * cfg.mla.qk_rope_head_dim
    else:
        latent, rope = 2 * tokens * heads * dims, 0
    return StageCost(base - core, weights, 2 * batch * query * cfg.hidden_size, core,
                     latent, rope)


@functools.lru_cache(maxsize=256)
def gate_cost(cfg: ModelConfig, tokens: int) -> StageCost:
    """Post-norm and router over ``tokens`` tokens."""
    moe = _layer(cfg, True)["moe"]
    router = {k: moe[k] for k in ("router", "router_bias") if k in moe}
    layer = {"post_norm": _layer(cfg, True)["post_norm"], "moe": router}
    x = jax.ShapeDtypeStruct((tokens, cfg.hidden_size), jnp.bfloat16)
    flops = xla_flops(stages.moe_gate, layer, cfg, x, static_argnums=1)
    return StageCost(flops, _elems(layer), 2 * tokens * cfg.hidden_size)


@functools.lru_cache(maxsize=256)
def experts_cost(cfg: ModelConfig, slots: int, tokens_per_slot: int) -> StageCost:
    """``slots`` routed experts on one device, ``tokens_per_slot`` tokens each."""
    experts = jax.tree.map(lambda a: jax.ShapeDtypeStruct((slots,) + a.shape[1:], a.dtype),
                           _layer(cfg, True)["moe"]["experts"])
    x = jax.ShapeDtypeStruct((slots, tokens_per_slot, cfg.hidden_size), jnp.bfloat16)
    flops = xla_flops(stages.moe_experts, experts, x)
    return StageCost(flops, _elems(experts), 2 * slots * tokens_per_slot * cfg.hidden_size)


@functools.lru_cache(maxsize=256)
def shared_cost(cfg: ModelConfig, tokens: int) -> StageCost:
    """The shared experts over ``tokens`` tokens (zero when the model has none)."""
    if not cfg.moe.num_shared_experts:
        return StageCost(0.0, 0)
    moe = _layer(cfg, True)["moe"]
    layer = {"moe": {k: moe[k] for k in ("shared", "shared_gate") if k in moe}}
    x = jax.ShapeDtypeStruct((tokens, cfg.hidden_size), jnp.bfloat16)
    flops = xla_flops(stages.moe_shared, layer, cfg, x, static_argnums=1)
    return StageCost(flops, _elems(layer), 2 * tokens * cfg.hidden_size)


@functools.lru_cache(maxsize=256)
def dense_ffn_cost(cfg: ModelConfig, tokens: int) -> StageCost:
    """A dense layer's SwiGLU MLP over ``tokens`` tokens."""
    layer = _layer(cfg, False)
    layer = {"post_norm": layer["post_norm"], "mlp": layer["mlp"]}
    x = jax.ShapeDtypeStruct((tokens, cfg.hidden_size), jnp.bfloat16)
    flops = xla_flops(stages.ffn, layer, cfg, x, static_argnums=1)
    return StageCost(flops, _elems(layer), 2 * tokens * cfg.hidden_size)


@functools.lru_cache(maxsize=256)
def head_cost(cfg: ModelConfig, tokens: int) -> StageCost:
    """Final norm and LM head over ``tokens`` tokens."""
    d, v = cfg.hidden_size, cfg.vocab_size
    params = _abstract({"final_norm": (d,), "lm_head": (d, v)})
    if cfg.tie_word_embeddings:
        params = _abstract({"final_norm": (d,), "embed": (v, d)})
    x = jax.ShapeDtypeStruct((tokens, d), jnp.bfloat16)
    flops = xla_flops(stages.head, params, cfg, x, static_argnums=1)
    return StageCost(flops, _elems(params), tokens * (d + v))


@functools.lru_cache(maxsize=256)
def mtp_proj_cost(cfg: ModelConfig, tokens: int) -> StageCost:
    """The MTP block's ``eh_proj`` ``[2D, D]`` over ``tokens`` tokens (DeepSeek-V3)."""
    d = cfg.hidden_size
    w = jax.ShapeDtypeStruct((2 * d, d), jnp.bfloat16)
    x = jax.ShapeDtypeStruct((tokens, 2 * d), jnp.bfloat16)
    return StageCost(xla_flops(jnp.matmul, x, w), 2 * d * d, 3 * tokens * d)
