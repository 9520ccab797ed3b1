"""Frozen model configuration, read once from a Hugging Face ``config.json`` and validated.

One ``ModelConfig`` describes every supported architecture: Llama-style dense models
(Llama, Mistral, Qwen2, Qwen3, SmolLM, OLMo 2), Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, Granite
MoE and DeepSeek-V3 (MLA attention, grouped sigmoid routing, shared experts, MTP). The
architecture is a choice of stage variants (``mla`` or GQA attention, ``moe`` or dense FFN per
layer), not a separate model.
"""

from __future__ import annotations

import dataclasses

from xds_jax.errors import ConfigError

DTYPES = ("float32", "bfloat16", "float16")
NORM_PLACEMENTS = ("pre", "sandwich", "post")
QK_NORM_SCOPES = ("head", "whole")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding: ``type`` is one of default, linear, dynamic, yarn, llama3, longrope."""

    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True
    # DeepSeek lays rotary pairs out interleaved (x0, x1), (x2, x3), ...
    interleaved: bool = False
    partial_rotary_factor: float = 1.0
    # GGUF ``rope_freqs.weight`` (llama.cpp's Llama 3 conversion): each frequency divided by
    # its factor, on top of ``type`` (which is then default).
    freq_factors: tuple[float, ...] | None = None


@dataclasses.dataclass(frozen=True)
class MLAConfig:
    """DeepSeek multi-head latent attention sizes."""

    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Routed experts, their router, and optional shared experts."""

    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    router: str = "softmax"  # "softmax" (Mixtral/Qwen) or "sigmoid" (DeepSeek-V3)
    norm_topk_prob: bool = True
    n_group: int = 1
    topk_group: int = 1
    group_score: str = "top2_sum"  # a group's rank: its two best scores (V3) or best one (V2)
    routed_scaling_factor: float = 1.0
    score_correction_bias: bool = False
    num_shared_experts: int = 0
    shared_intermediate_size: int = 0
    shared_expert_gate: bool = False  # Qwen2-MoE: shared output scaled by sigmoid(gate(x))
    moe_layers: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything the math needs about a model. Built by ``config_from_hf_dict``."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    attention_out_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    # q/k RMSNorm over each head's dims ("head": Qwen3, Gemma 3) or over the whole q and k
    # projections, all heads at once ("whole": OLMo 2)
    qk_norm_scope: str = "head"
    sliding_window: int | None = None
    mla: MLAConfig | None = None
    moe: MoEConfig | None = None
    num_mtp_layers: int = 0
    # Granite's multipliers. The embedding and residual ones are folded into the weights when
    # a checkpoint loads (``weights_hf``): the embedding table (so a tied head reads it scaled,
    # which ``logits_scale`` undoes), ``o_proj`` and ``down_proj``.
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float | None = None  # the softmax scale, instead of 1/sqrt(d)
    logits_scale: float = 1.0  # logits are multiplied by it
    # Gemma: GeLU (tanh) MLPs, norms after attention and after the MLP too ("sandwich"),
    # tanh soft-capping of attention scores and logits, and local layers: a sliding window and
    # their own RoPE base (the other layers attend to everything).
    mlp_act: str = "silu"  # "silu", "gelu_tanh" or "gelu" (exact)
    # Where a layer's norms sit: "pre" (on the attention and MLP inputs), "sandwich" (Gemma
    # 2/3: on their outputs too) or "post" (OLMo 2: on their outputs only).
    norm_placement: str = "pre"
    attn_softcap: float | None = None
    final_softcap: float | None = None
    local_layers: tuple[int, ...] | None = None  # None: sliding_window (if any) on every layer
    local_rope_theta: float | None = None
    nope_layers: tuple[int, ...] = ()  # layers whose attention has no RoPE (SmolLM3's NoPE)
    dtype: str = "bfloat16"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        validate(self)

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe is not None and layer in self.moe.moe_layers

    def is_local_layer(self, layer: int | None) -> bool:
        """Layer ``layer`` attends within ``sliding_window`` (with ``local_rope_theta``)."""
        if self.sliding_window is None:
            return False
        return self.local_layers is None or (layer is not None and layer in self.local_layers)

    def uses_rope(self, layer: int | None) -> bool:
        """Layer ``layer`` rotates its queries and keys (all but ``nope_layers``)."""
        return layer not in self.nope_layers

    def attention_kind(self, layer: int) -> tuple[bool, bool]:
        """(local, rotated) of layer ``layer``; an MTP layer, ``layer >= num_layers``, is a
        global rotated one."""
        if layer >= self.num_layers:
            return False, True
        return self.is_local_layer(layer), self.uses_rope(layer)

    def attention_kind_layer(self, layer: int) -> int | None:
        """The first layer attending like layer ``layer`` (``attention_kind``), so layers of a
        kind share one attention program; None when no target layer is of that kind."""
        kind = self.attention_kind(layer)
        return next((i for i in range(self.num_layers) if self.attention_kind(i) == kind), None)

    @property
    def rope_dim(self) -> int:
        """Number of rotated dimensions per head."""
        if self.mla is not None:
            return self.mla.qk_rope_head_dim
        return int(self.head_dim * self.rope.partial_rotary_factor)

    def kv_cache_dims(self) -> tuple[int, int]:
        """(kv heads, dims per head) cached per token and layer, K and V counted separately.

        MLA caches one latent head (compressed KV + rope key) and no separate V.
        """
        if self.mla is not None:
            return 1, self.mla.kv_lora_rank + self.mla.qk_rope_head_dim
        return self.num_kv_heads, self.head_dim

    def kv_bytes_per_token(self, itemsize: int) -> int:
        heads, dims = self.kv_cache_dims()
        per_layer = heads * dims * (1 if self.mla is not None else 2)
        return per_layer * self.num_layers * itemsize


def _positive(cfg: object, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def validate(cfg: ModelConfig) -> None:
    """Raise ``ConfigError`` naming the first inconsistent field."""
    _positive(
        cfg, "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
        "head_dim", "max_position_embeddings",
    )
    if cfg.num_heads % cfg.num_kv_heads:
        raise ConfigError(
            f"num_attention_heads ({cfg.num_heads}) must be a multiple of "
            f"num_key_value_heads ({cfg.num_kv_heads})"
        )
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {DTYPES}, got {cfg.dtype!r}")
    if not cfg.rms_norm_eps > 0:
        raise ConfigError(f"rms_norm_eps must be positive, got {cfg.rms_norm_eps!r}")
    if cfg.rope.theta <= 0:
        raise ConfigError(f"rope_theta must be positive, got {cfg.rope.theta!r}")
    if cfg.rope_dim % 2:
        raise ConfigError(f"the rotary dimension must be even, got {cfg.rope_dim}")
    if cfg.sliding_window is not None and cfg.sliding_window <= 0:
        raise ConfigError(f"sliding_window must be positive, got {cfg.sliding_window!r}")
    if cfg.mlp_act not in ("silu", "gelu_tanh", "gelu"):
        raise ConfigError(f"mlp activation must be silu, gelu_tanh or gelu, got {cfg.mlp_act!r}")
    if cfg.norm_placement not in NORM_PLACEMENTS:
        raise ConfigError(f"norm_placement must be one of {NORM_PLACEMENTS}, "
                          f"got {cfg.norm_placement!r}")
    if cfg.qk_norm_scope not in QK_NORM_SCOPES:
        raise ConfigError(f"qk_norm_scope must be one of {QK_NORM_SCOPES}, "
                          f"got {cfg.qk_norm_scope!r}")
    for name in ("local_layers", "nope_layers"):
        bad = [i for i in getattr(cfg, name) or () if not 0 <= i < cfg.num_layers]
        if bad:
            raise ConfigError(f"{name} {bad} are outside 0..{cfg.num_layers - 1}")
    dense_layers = [i for i in range(cfg.num_layers) if not cfg.is_moe_layer(i)]
    if dense_layers and cfg.intermediate_size <= 0:
        raise ConfigError(f"intermediate_size must be positive, got {cfg.intermediate_size!r}")
    if cfg.mla is not None:
        _positive(cfg.mla, "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
        if cfg.mla.q_lora_rank is not None:
            _positive(cfg.mla, "q_lora_rank")
    if cfg.mla is not None and cfg.nope_layers:
        raise ConfigError("nope_layers (attention without RoPE) are not supported with MLA")
    if cfg.moe is not None and cfg.norm_placement == "post":
        raise ConfigError("norm_placement 'post' is not supported with MoE layers")
    if cfg.moe is not None:
        _validate_moe(cfg.moe, cfg.num_layers)


def _validate_moe(moe: MoEConfig, num_layers: int) -> None:
    _positive(moe, "num_experts", "num_experts_per_tok", "moe_intermediate_size")
    if moe.num_experts_per_tok > moe.num_experts:
        raise ConfigError(
            f"num_experts_per_tok ({moe.num_experts_per_tok}) exceeds the number of experts "
            f"({moe.num_experts})"
        )
    if moe.router not in ("softmax", "sigmoid"):
        raise ConfigError(f"router (scoring_func) must be softmax or sigmoid, got {moe.router!r}")
    if moe.n_group < 1 or moe.num_experts % moe.n_group:
        raise ConfigError(
            f"n_group ({moe.n_group}) must divide n_routed_experts ({moe.num_experts})"
        )
    if moe.group_score not in ("top2_sum", "max"):
        raise ConfigError(f"group_score must be top2_sum or max, got {moe.group_score!r}")
    if not 1 <= moe.topk_group <= moe.n_group:
        raise ConfigError(f"topk_group ({moe.topk_group}) must be in 1..n_group ({moe.n_group})")
    per_group = moe.num_experts // moe.n_group
    if moe.n_group > 1 and moe.topk_group * per_group < moe.num_experts_per_tok:
        raise ConfigError(
            f"topk_group ({moe.topk_group}) groups of {per_group} experts cannot hold "
            f"num_experts_per_tok ({moe.num_experts_per_tok}) experts"
        )
    if moe.num_shared_experts and moe.shared_intermediate_size <= 0:
        raise ConfigError("shared experts need a positive shared intermediate size")
    bad = [i for i in moe.moe_layers if not 0 <= i < num_layers]
    if bad:
        raise ConfigError(f"MoE layer indices {bad} are outside 0..{num_layers - 1}")
