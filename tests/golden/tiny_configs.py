"""The tiny random-weight models make_golden.py saves and runs: one transformers config per
architecture (and the prompt seed), built on a common small shape."""

import transformers as tf

BASE = dict(
    vocab_size=320,
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_hidden_layers=3,
    intermediate_size=96,
    max_position_embeddings=256,
)
# DeepSeek-V3's MoE as the tiny models have it (DeepSeek, GLM-4.5, dots.llm1).
DEEPSEEK_MOE = dict(
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_group=4,
    topk_group=2,
    n_shared_experts=1,
    moe_intermediate_size=32,
    first_k_dense_replace=1,
    routed_scaling_factor=2.5,
)
DEEPSEEK = dict(
    BASE,
    num_key_value_heads=4,  # MLA expands the latent into one K/V per query head.
    q_lora_rank=32,
    kv_lora_rank=24,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    **DEEPSEEK_MOE,
    norm_topk_prob=True,
    rope_parameters=dict(
        rope_type="yarn",
        rope_theta=10000.0,
        factor=4.0,
        original_max_position_embeddings=64,
        beta_fast=32.0,
        beta_slow=1.0,
        mscale=1.0,
        mscale_all_dim=1.0,
    ),
)
LLAMA3_ROPE = dict(
    rope_type="llama3",
    rope_theta=10000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=64,
)

# name -> (config, prompt seed). A prompt seed is non-zero only where seed 0 gave a greedy margin
# below MIN_MARGIN or a router gap below MIN_ROUTER_GAP. Weights always use torch seed 0.
TINY_MODELS = {
    "llama": (
        tf.LlamaConfig(**BASE, head_dim=16, rope_parameters=LLAMA3_ROPE, tie_word_embeddings=False),
        0,
    ),
    "qwen2": (tf.Qwen2Config(**BASE, tie_word_embeddings=True), 0),
    # Gemma: GeGLU, norms applied as 1 + w, embeddings scaled by sqrt(hidden), tied head.
    "gemma": (tf.GemmaConfig(**BASE, head_dim=16, hidden_activation="gelu_pytorch_tanh"), 0),
    # Gemma 2: + sandwich norms, query_pre_attn_scalar, soft-capped scores and logits (small
    # caps, so tanh bends), a sliding window of 8 on the even layers (the prompt crosses it).
    "gemma2": (
        tf.Gemma2Config(
            **BASE, head_dim=16, query_pre_attn_scalar=24, attn_logit_softcapping=2.0,
            final_logit_softcapping=3.0, sliding_window=8,
        ),
        0,
    ),
    # Gemma 3 (text): + q/k norms, local layers with their own RoPE base, global layers with
    # linear RoPE scaling (per-layer-type rope_parameters, transformers 5's spelling).
    "gemma3_text": (
        tf.Gemma3TextConfig(
            **BASE, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            },
        ),
        0,
    ),
    # Granite 3.x: Llama with multipliers on the embeddings, residual branches, attention
    # scores and logits; tied embeddings (the head reads the table the multiplier scales).
    "granite": (
        tf.GraniteConfig(
            **BASE,
            tie_word_embeddings=True,
            embedding_multiplier=12.0,
            residual_multiplier=0.22,
            attention_multiplier=0.125,
            logits_scaling=4.0,
        ),
        0,
    ),
    # Granite with attention and MLP biases: the residual multiplier scales o_proj's and
    # down_proj's biases too (folded with their weights)
    "granite_bias": (
        tf.GraniteConfig(
            **BASE,
            attention_bias=True,
            mlp_bias=True,
            embedding_multiplier=12.0,
            residual_multiplier=0.22,
            attention_multiplier=0.125,
            logits_scaling=4.0,
        ),
        2,
    ),
    # Phi-3/3.5/4-mini: fused qkv_proj and gate_up_proj, LongRoPE (served within its original
    # context: short factors, attention factor sqrt(1 + ln 4 / ln 64)), partial rotary 0.75 as
    # Phi-4-mini, a 16-token sliding window the 23-token prompt crosses.
    "phi3": (
        tf.Phi3Config(
            **BASE,
            head_dim=16,
            tie_word_embeddings=False,
            sliding_window=16,
            pad_token_id=None,
            bos_token_id=1,
            eos_token_id=2,
            original_max_position_embeddings=64,
            rope_parameters=dict(
                rope_type="longrope",
                rope_theta=10000.0,
                partial_rotary_factor=0.75,
                short_factor=[1.0, 1.1, 1.3, 1.7, 2.2, 3.0],
                long_factor=[1.0, 2.0, 4.0, 8.0, 16.0, 32.0],
            ),
        ),
        3,
    ),
    # SmolLM3: a Llama whose layer 1 attends without RoPE (no_rope_layers), tied embeddings.
    "smollm3": (
        tf.SmolLM3Config(**BASE, no_rope_layers=[1, 0, 1], tie_word_embeddings=True,
                         pad_token_id=None, bos_token_id=1, eos_token_id=2),
        0,
    ),
    # OLMo 2: norms on the attention and MLP outputs only, q/k norms over the whole q and k
    # projections (64 and 32 wide: GQA), untied head.
    "olmo2": (tf.Olmo2Config(**BASE, tie_word_embeddings=False, eos_token_id=2), 0),
    # OLMo 3: OLMo 2 plus sliding-window layers (window 8 the prompt crosses) with a plain
    # rotation; the full-attention layer's RoPE is yarn-scaled (per-layer-type rope_parameters).
    "olmo3": (
        tf.Olmo3Config(
            **BASE,
            tie_word_embeddings=False,
            eos_token_id=2,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={
                "full_attention": {"rope_type": "yarn", "rope_theta": 5e5, "factor": 4.0,
                                   "original_max_position_embeddings": 64},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            },
        ),
        0,
    ),
    "qwen3": (tf.Qwen3Config(**BASE, head_dim=32), 0),
    "qwen3_moe": (
        tf.Qwen3MoeConfig(
            **BASE,
            head_dim=16,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            norm_topk_prob=True,
            mlp_only_layers=[0],
            decoder_sparse_step=1,
        ),
        0,
    ),
    "mixtral": (
        tf.MixtralConfig(
            **BASE, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=None
        ),
        0,
    ),
    "deepseek_v3": (tf.DeepseekV3Config(**DEEPSEEK), 3),
    "deepseek_v3_noqlora": (
        tf.DeepseekV3Config(
            **dict(
                DEEPSEEK,
                q_lora_rank=None,
                n_group=1,
                topk_group=1,
                rope_parameters=dict(rope_type="default", rope_theta=10000.0),
            )
        ),
        0,
    ),
    # DeepSeek-V2(-Lite): MLA without q_lora, softmax router, group-limited greedy (group score =
    # its best expert), no renormalisation, two shared experts; yarn with mscale 0.707 as V2 ships.
    "deepseek_v2": (
        tf.DeepseekV2Config(
            **dict(
                DEEPSEEK,
                q_lora_rank=None,
                n_shared_experts=2,
                topk_method="group_limited_greedy",
                norm_topk_prob=False,
                routed_scaling_factor=2.0,
                rope_parameters=dict(
                    DEEPSEEK["rope_parameters"], mscale=0.707, mscale_all_dim=0.707
                ),
            )
        ),
        0,
    ),
    # ERNIE 4.5 dense: a Llama with RoPE on interleaved pairs, biases on every attention and MLP
    # projection (use_bias), tied embeddings (its default).
    "ernie4_5": (tf.Ernie4_5Config(**dict(BASE, head_dim=16), use_bias=True, pad_token_id=0,
                                   bos_token_id=1, eos_token_id=2), 0),
    # Seed-OSS: a Llama with q/k/v biases (attention_bias) apart from o's (attention_out_bias).
    "seed_oss": (tf.SeedOssConfig(**dict(BASE, head_dim=16), attention_out_bias=True,
                                  pad_token_id=0, bos_token_id=1, eos_token_id=2), 0),
    # ERNIE 4.5 MoE: softmax router whose choice adds a correction bias (moe_statics), top-k
    # renormalised, two shared experts, MoE from moe_layer_start_index on; ERNIE's attention.
    "ernie4_5_moe": (
        tf.Ernie4_5_MoeConfig(
            **dict(BASE, head_dim=16),
            moe_intermediate_size=32,
            moe_num_experts=8,
            moe_k=2,
            moe_num_shared_experts=2,
            moe_layer_start_index=1,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
        10,
    ),
    # EXAONE 4.0: OLMo 2's post-norms with per-head q/k norms; hybrid attention: an 8-token
    # window with RoPE on sliding layers, global layers (every 2nd here) without RoPE.
    "exaone4": (tf.Exaone4Config(**dict(BASE, head_dim=16), sliding_window=8,
                                 sliding_window_pattern=2, pad_token_id=0, eos_token_id=2), 0),
    # InternLM3: a Llama whose biases are spelt qkv_bias / bias (on here).
    "internlm3": (tf.InternLM3Config(**dict(BASE, head_dim=16), qkv_bias=True, bias=True,
                                     pad_token_id=0, eos_token_id=2), 0),
    # GLM-4 (0414, dense): q/k/v biases (attention_bias's default), RoPE on interleaved pairs of
    # the first half of each head, norms on the attention and MLP outputs too, gate/up fused.
    "glm4": (tf.Glm4Config(**dict(BASE, head_dim=16), eos_token_id=2, pad_token_id=0), 0),
    # GLM-4.5 / 4.6 (glm4_moe): DeepSeek-V3's MoE (sigmoid router with correction bias, grouped
    # top-2-sum group scores, a shared expert, a dense first layer, scaled weights) behind
    # grouped-query attention with q/k/v biases (none on o), per-head q/k norms and RoPE on the
    # first half of each head's dims (partial_rotary_factor left at its 0.5 default).
    "glm4_moe": (
        tf.Glm4MoeConfig(
            **dict(BASE, head_dim=16),
            **DEEPSEEK_MOE,
            norm_topk_prob=True,
            attention_bias=True,
            use_qk_norm=True,
            eos_token_id=2,
        ),
        7,
    ),
    # GLM-4.7-Flash (glm4_moe_lite): DeepSeek-V3's MLA and MoE with GLM's defaults; dense and
    # MoE layers named per layer (mlp_layer_types: dense, then sparse by default).
    "glm4_moe_lite": (
        tf.Glm4MoeLiteConfig(
            **{k: v for k, v in DEEPSEEK.items()
               if k not in ("first_k_dense_replace", "rope_parameters")},
            eos_token_id=2,
        ),
        1,
    ),
    # dots.llm1 (dots1): Qwen3's attention (per-head q/k norms) over DeepSeek-V3's MoE, its
    # defaults otherwise (no renormalised top-k); a 16-token window on the layers from
    # max_window_layers on (the last one here).
    "dots1": (
        tf.Dots1Config(
            **dict(BASE, head_dim=16),
            **DEEPSEEK_MOE,
            sliding_window=16,
            max_window_layers=2,
            eos_token_id=2,
        ),
        0,
    ),
    # MiniMax-M2: Mixtral's experts chosen by sigmoid scores plus a correction bias, renormalised;
    # q/k norms over the whole projections; RoPE on half of each head (rotary_dim).
    "minimax_m2": (
        tf.MiniMaxM2Config(
            **dict(BASE, head_dim=16),
            num_local_experts=8,
            num_experts_per_tok=2,
            rotary_dim=8,
            eos_token_id=2,
        ),
        4,
    ),
    # OLMoE: pre-norm Llama attention with q/k norms over the whole projections (64 and 32
    # wide: GQA), a MoE FFN on every layer: softmax router, top-2 of 8, no renormalisation.
    "olmoe": (
        tf.OlmoeConfig(
            **dict(BASE, intermediate_size=32),
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=False,
            eos_token_id=2,
        ),
        0,
    ),
    # Granite 3.x MoE: Granite's multipliers (tied head), experts fused as input_linear
    # [E, 2F, D] (gate rows first) and output_linear; softmax over the top-2 router logits (a
    # renormalised top-k).
    "granitemoe": (
        tf.GraniteMoeConfig(
            **dict(BASE, intermediate_size=32),
            num_local_experts=8,
            num_experts_per_tok=2,
            tie_word_embeddings=True,
            embedding_multiplier=12.0,
            residual_multiplier=0.22,
            attention_multiplier=0.125,
            logits_scaling=4.0,
        ),
        1,
    ),
    # Granite MoE Shared: Granite MoE plus a shared MLP (shared_mlp.input_linear fuses its gate
    # and up) added to the routed output before the residual multiplier.
    "granitemoeshared": (
        tf.GraniteMoeSharedConfig(
            **dict(BASE, intermediate_size=32),
            num_local_experts=8,
            num_experts_per_tok=2,
            shared_intermediate_size=48,
            tie_word_embeddings=False,
            embedding_multiplier=6.0,
            residual_multiplier=0.5,
            attention_multiplier=0.2,
            logits_scaling=2.0,
        ),
        0,
    ),
    "qwen2_moe": (
        tf.Qwen2MoeConfig(
            **BASE,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            norm_topk_prob=False,
        ),
        1,
    ),
}
