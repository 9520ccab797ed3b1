"""Attention over a paged KV cache: grouped-query attention and DeepSeek MLA.

The cache of one layer is a dict of page arrays ``[P, Pg, KVH, Dc]`` (P pages of Pg tokens).
A sequence owns the pages listed in its row of the block table ``[B, N]``; token ``t`` of
sequence ``b`` lives at page ``block_table[b, t // Pg]``, offset ``t % Pg``. Query tokens with
a negative position are padding: they write nothing and their outputs are ignored.

Shape legend: B sequences, S query tokens each, L = N * Pg key slots, H query heads,
K kv heads, G = H / K, Dh head dim, C latent dims (MLA), R rotary dims.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xds_jax.kernels import cpu_attention
from xds_jax.model import attention_blocks
from xds_jax.model.attention_blocks import (
    LoadKV,
    blockwise_attention,
    key_block_size,
    use_blockwise,
)
from xds_jax.model.config import ModelConfig
from xds_jax.model.fused import split_kv, split_qkv
from xds_jax.model.layers import (
    apply_rope,
    attention_scale,
    project,
    rms_norm,
    rope_cos_sin,
    weight_f32,
)
from xds_jax.model.out_major import has_weight

_MASKED = -1e30


def as_bits(a: jax.Array) -> jax.Array:
    """A bfloat16 array viewed as ``uint16`` (others unchanged).

    XLA:CPU upcasts a gather or scatter on bfloat16 to float32 (converting the whole operand);
    on integers it moves the bytes. A bitcast of a whole array is a copy there, so bfloat16 KV
    pages are *stored* as ``uint16`` (``kv_storage_dtype``) and only new or gathered rows are
    bitcast.
    """
    return jax.lax.bitcast_convert_type(a, jnp.uint16) if a.dtype == jnp.bfloat16 else a


def from_bits(a: jax.Array, dtype) -> jax.Array:
    """Undo ``as_bits``: ``uint16`` bits back to ``dtype`` (bfloat16)."""
    return a if a.dtype == dtype else jax.lax.bitcast_convert_type(a, dtype)


def kv_storage_dtype(dtype) -> jnp.dtype:
    """The dtype KV pages are stored in for values of ``dtype``: bfloat16 as its bits."""
    return jnp.dtype(jnp.uint16) if jnp.dtype(dtype) == jnp.bfloat16 else jnp.dtype(dtype)


def kv_value_dtype(storage_dtype) -> jnp.dtype:
    """The dtype of the values held in pages stored as ``storage_dtype``."""
    storage = jnp.dtype(storage_dtype)
    return jnp.dtype(jnp.bfloat16) if storage == jnp.uint16 else storage


def write_pages(pages: jax.Array, new_BSKD: jax.Array, positions_BS: jax.Array,
                block_tables_BN: jax.Array) -> jax.Array:
    """Store new keys/values at their positions; padding tokens (position < 0) are dropped.

    One new token (a one-row decode) is scattered with a second, always-dropped slot: XLA
    rewrites a one-index scatter into a bounds-checked update of the flattened pool, which
    XLA:CPU then copied whole, every layer, every step (SmolLM2 at one row: 690 ms a step
    instead of 48). ``maximum`` keeps the extra index from being folded away as a constant.
    """
    num_pages, page_size = pages.shape[:2]
    block = jnp.take_along_axis(block_tables_BN, jnp.maximum(positions_BS, 0) // page_size, axis=1)
    slots = block * page_size + positions_BS % page_size
    slots = jnp.where(positions_BS >= 0, slots, num_pages * page_size)  # out of range: dropped
    flat = pages.reshape((num_pages * page_size,) + pages.shape[2:])
    new = new_BSKD.reshape((-1,) + new_BSKD.shape[2:]).astype(kv_value_dtype(pages.dtype))
    slots, new = slots.reshape(-1), as_bits(new)
    if slots.shape[0] == 1:  # see above
        slots = jnp.concatenate([slots, jnp.maximum(slots, num_pages * page_size)])
        new = jnp.concatenate([new, new])
    flat = flat.at[slots].set(new, mode="drop")
    return flat.reshape(pages.shape)


def read_pages(pages: jax.Array, block_tables_BN: jax.Array, dtype=jnp.float32) -> jax.Array:
    """Gather each sequence's pages into ``[B, L, K, D]`` in token order, as ``dtype``.

    Block ids are always valid pool indices, so the gather clips instead of bounds-filling,
    which XLA:CPU runs about three times faster.
    """
    got = jnp.take(pages, block_tables_BN, axis=0, mode="clip")
    got = from_bits(got, kv_value_dtype(pages.dtype))
    b, n, pg = got.shape[:3]
    return got.reshape((b, n * pg) + got.shape[3:]).astype(dtype)


def paged_kv_blocks(k_pages: jax.Array, v_pages: jax.Array | None, block_tables_BN: jax.Array,
                    dtype, value_dims: int | None = None) -> tuple[LoadKV, int]:
    """A key-block reader for ``blockwise_attention`` and its block size ``Tk``.

    Blocks of whole pages are gathered from their block-table columns inside the loop, so
    only visited blocks are read; where a page is larger than a block (the prompt scorer's
    single page) all pages are gathered once and sliced. ``v_pages`` None: the values are
    the keys' first ``value_dims`` dims (MLA's latent).
    """
    page_size = k_pages.shape[1]
    num_keys = block_tables_BN.shape[1] * page_size
    tk = key_block_size(num_keys, page_size)

    def values(keys, cols):
        if v_pages is None:
            return keys[..., :value_dims]
        return read_pages(v_pages, cols, dtype)

    if tk:
        def load(start):
            cols = jax.lax.dynamic_slice_in_dim(block_tables_BN, start // page_size,
                                                tk // page_size, axis=1)
            keys = read_pages(k_pages, cols, dtype)
            return keys, values(keys, cols)
        return load, tk
    tk = min(attention_blocks.K_BLOCK, num_keys)
    keys_BLKD = read_pages(k_pages, block_tables_BN, dtype)
    vals_BLKE = values(keys_BLKD, block_tables_BN)
    return (lambda start: (jax.lax.dynamic_slice_in_dim(keys_BLKD, start, tk, axis=1),
                           jax.lax.dynamic_slice_in_dim(vals_BLKE, start, tk, axis=1))), tk


def _window(cfg: ModelConfig, layer: int | None) -> int | None:
    return cfg.sliding_window if cfg.is_local_layer(layer) else None


def attention_mask(cfg: ModelConfig, positions_BS: jax.Array, num_keys: int,
                   layer: int | None = None) -> jax.Array:
    """``[B, S, L]`` True where query may attend: causal, within the sliding window where
    layer ``layer`` has one (``ModelConfig.is_local_layer``)."""
    return causal_mask(positions_BS, num_keys, _window(cfg, layer))


def causal_mask(positions_BS: jax.Array, num_keys: int, window: int | None) -> jax.Array:
    """``[B, S, L]`` True where key slot ``l`` is at most the query's position and, with a
    ``window``, within it."""
    k_pos = jnp.arange(num_keys)[None, None, :]
    q_pos = positions_BS[:, :, None]
    mask = k_pos <= q_pos
    if window:
        mask &= k_pos > q_pos - window
    return mask


def _softmax(scores: jax.Array, mask: jax.Array, cap: float | None = None) -> jax.Array:
    """Masked softmax; ``cap``: Gemma 2's soft-capping ``cap * tanh(scores / cap)`` first."""
    if cap is not None:
        scores = cap * jnp.tanh(scores / cap)
    scores = jnp.where(mask, scores, _MASKED)
    return jax.nn.softmax(scores, axis=-1)


def _prefill_attention(q_BSKGD: jax.Array, keys_BLKD: jax.Array, vals_BLKD: jax.Array,
                       mask_BSL: jax.Array, scale: float, cap: float | None = None
                       ) -> jax.Array:
    """Per-kv-head attention, ``[B, S, H * Dh]`` float32.

    The queries of a kv head are one ``[G * S, Dh]`` matrix, so the scores come out as
    ``[B, K, G * S, L]`` in the order the mask, the softmax and the value product read them;
    a ``bskgd,blkd->bkgsl`` einsum left XLA:CPU scores as ``[K, S, G * L]`` (keys broadcast
    G times) and two transposing copies of the ``S x L`` scores a layer.
    """
    b, s, k, g, dh = q_BSKGD.shape
    q_BKMD = q_BSKGD.transpose(0, 2, 3, 1, 4).reshape(b, k, g * s, dh)
    scores = jnp.einsum("bkmd,blkd->bkml", q_BKMD, keys_BLKD,
                        preferred_element_type=jnp.float32) * scale
    probs = _softmax(scores.reshape(b, k, g, s, -1), mask_BSL[:, None, None], cap)
    out = jnp.einsum("bkml,blkd->bkmd", probs.reshape(b, k, g * s, -1).astype(vals_BLKD.dtype),
                     vals_BLKD, preferred_element_type=jnp.float32)
    return out.reshape(b, k, g, s, dh).transpose(0, 3, 1, 2, 4).reshape(b, s, k * g * dh)


def _decode_attention(q_BSKGD: jax.Array, keys_BLKD: jax.Array, vals_BLKD: jax.Array,
                      mask_BSL: jax.Array, scale: float, cap: float | None = None) -> jax.Array:
    """One query token per row, contracting the gathered pages as laid out, ``[B, 1, H * Dh]``.

    Per-kv-head dots (batch dims ``b, k``) made XLA:CPU copy the keys and values transposed to
    ``[B, K, Dh, L]`` first, fused with the page gather at a few GB/s (a fifth of a batch-32
    step). Here every query head is contracted with all heads' keys, ``[B, L, K * Dh]`` as
    gathered, through a query that is zero outside its own head's block; the value product
    gives every head's mix and each query head keeps its own block: K times the multiply-adds
    of a small product, no copy. The zeros add exact zeros: the same sums up to their order.
    """
    b, s, k, g, dh = q_BSKGD.shape
    own = jnp.eye(k, dtype=q_BSKGD.dtype)[:, None, :, None]  # [K, 1, K, 1]: head k's block
    q_BHE = (q_BSKGD[:, 0, :, :, None, :] * own).reshape(b, k * g, k * dh)
    keys_BLE = keys_BLKD.reshape(b, -1, k * dh)
    scores = jnp.einsum("bhe,ble->bhl", q_BHE, keys_BLE,
                        preferred_element_type=jnp.float32) * scale
    probs = _softmax(scores, mask_BSL, cap)  # [B, H, L]; the mask [B, 1, L] broadcasts
    mix = jnp.einsum("bhl,ble->bhe", probs.astype(vals_BLKD.dtype),
                     vals_BLKD.reshape(b, -1, k * dh), preferred_element_type=jnp.float32)
    out = (mix.reshape(b, k, g, k, dh) * own.astype(jnp.float32)).sum(axis=3)
    return out.reshape(b, 1, k * g * dh)


def _paged_decode_reference(q_BKGD: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                            block_tables_BN: jax.Array, mask_BL: jax.Array, *, scale: float,
                            cap: float) -> jax.Array:
    """``_decode_attention`` over the pages themselves, float32 ``[B, K, G, D]`` (``cap`` 0:
    none): what the CPU kernel computes, and its lowering everywhere else."""
    dtype = q_BKGD.dtype
    keys_BLKD = read_pages(k_pages, block_tables_BN, dtype)
    vals_BLKD = read_pages(v_pages, block_tables_BN, dtype)
    out = _decode_attention(q_BKGD[:, None], keys_BLKD, vals_BLKD, mask_BL[:, None], scale,
                            cap or None)
    return out.reshape(q_BKGD.shape)


_paged_decode = cpu_attention.paged_decode_primitive(_paged_decode_reference)


def _paged_prefill_reference(q_BSKGD: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                             block_tables_BN: jax.Array, positions_BS: jax.Array, *,
                             scale: float, cap: float, window: float) -> jax.Array:
    """``_prefill_attention`` over the pages, float32 ``[B, S, H * D]`` (``cap``, ``window``
    0: none), blockwise where the dense scores would be large (``use_blockwise``): what the
    CPU prefill kernel computes, and its lowering everywhere else."""
    dtype = q_BSKGD.dtype
    b, s, k, g, _ = q_BSKGD.shape
    num_keys = block_tables_BN.shape[1] * k_pages.shape[1]
    if use_blockwise(k * g, s, num_keys):
        load_kv, tk = paged_kv_blocks(k_pages, v_pages, block_tables_BN, dtype)
        return blockwise_attention(q_BSKGD, load_kv, num_keys, tk, positions_BS, scale,
                                   cap or None, int(window) or None)
    keys_BLKD = read_pages(k_pages, block_tables_BN, dtype)
    vals_BLKD = read_pages(v_pages, block_tables_BN, dtype)
    mask_BSL = causal_mask(positions_BS, keys_BLKD.shape[1], int(window) or None)
    return _prefill_attention(q_BSKGD, keys_BLKD, vals_BLKD, mask_BSL, scale, cap or None)


_paged_prefill = cpu_attention.paged_prefill_primitive(_paged_prefill_reference)


def _qk_norm(x_BSHD: jax.Array, weight: jax.Array, cfg: ModelConfig) -> jax.Array:
    """RMSNorm of queries or keys over each head (``qk_norm_scope`` "head") or over all heads
    of a token at once ("whole", OLMo 2's norm of the whole projection)."""
    if cfg.qk_norm_scope == "head":
        return rms_norm(x_BSHD, weight, cfg.rms_norm_eps)
    b, s = x_BSHD.shape[:2]
    return rms_norm(x_BSHD.reshape(b, s, -1), weight, cfg.rms_norm_eps).reshape(x_BSHD.shape)


def gqa_attention(p: dict, cfg: ModelConfig, x_BSD: jax.Array, positions_BS: jax.Array,
                  cache: dict, block_tables_BN: jax.Array, layer: int | None = None
                  ) -> tuple[jax.Array, dict]:
    """Grouped-query attention (Llama, Qwen, Mixtral, Gemma). Returns output ``[B, S, D]`` and
    cache; ``layer`` picks a local layer's window and RoPE base (``is_local_layer``) and
    whether it rotates at all (``uses_rope``)."""
    b, s, _ = x_BSD.shape
    h, k, dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    if has_weight(p, "qkv"):  # Q with K/V, where a layer stays on one device: one matmul
        q, kk, v = split_qkv(project(p, "qkv", x_BSD), cfg)
    elif has_weight(p, "kv"):  # fused at load time (xds_jax.model.fused)
        q = project(p, "q", x_BSD).reshape(b, s, h, dh)
        kk, v = split_kv(project(p, "kv", x_BSD), cfg)
    else:
        q = project(p, "q", x_BSD).reshape(b, s, h, dh)
        kk = project(p, "k", x_BSD).reshape(b, s, k, dh)
        v = project(p, "v", x_BSD).reshape(b, s, k, dh)
    if cfg.qk_norm:
        q, kk = _qk_norm(q, p["q_norm"], cfg), _qk_norm(kk, p["k_norm"], cfg)
    if cfg.uses_rope(layer):
        cos, sin = rope_cos_sin(cfg, positions_BS, local=cfg.is_local_layer(layer))
        q = apply_rope(q, cos, sin, cfg.rope.interleaved)
        kk = apply_rope(kk, cos, sin, cfg.rope.interleaved)
    cache = {
        "k": write_pages(cache["k"], kk, positions_BS, block_tables_BN),
        "v": write_pages(cache["v"], v, positions_BS, block_tables_BN),
    }
    # Both attention matmuls take the KV dtype and accumulate in float32, as Hugging Face's
    # eager attention does (bf16 prefill 1.9x faster on XLA:CPU); softmax is float32.
    kv_dtype = kv_value_dtype(cache["k"].dtype)
    q_BSKGD = q.reshape(b, s, k, h // k, dh).astype(kv_dtype)
    scale, num_keys = attention_scale(cfg), block_tables_BN.shape[1] * cache["k"].shape[1]
    q_RKGD = q_BSKGD.reshape(b * s, k, h // k, dh)  # one row per query token
    if s <= cpu_attention.MAX_TOKENS and cpu_attention.applies(q_RKGD, cache["k"]):
        # xds-jax's CPU kernel: each query token (a decode step's, a speculative verify
        # pass's k + 1, a short chunk's) is a row with its sequence's pages and its own mask,
        # computed the same way whatever the step: verify rows round as the plain steps do
        mask_RL = attention_mask(cfg, positions_BS, num_keys, layer).reshape(b * s, -1)
        tables_RN = jnp.repeat(block_tables_BN, s, axis=0) if s > 1 else block_tables_BN
        out = _paged_decode.bind(q_RKGD, cache["k"], cache["v"], tables_RN, mask_RL,
                                 scale=scale, cap=cfg.attn_softcap or 0.0)
        return project(p, "o", out.reshape(b, s, h * dh)), cache
    if s > 1:
        # a prefill chunk: xds-jax's CPU prefill kernel (any prompt length: blocks of query
        # tokens against the keys each sees) where it runs, else its reference, XLA's
        # blockwise (long prompts: bounded memory, masked blocks skipped) or dense attention
        kernel = cpu_attention.prefill_applies(q_BSKGD, cache["k"])
        attend = _paged_prefill.bind if kernel else _paged_prefill_reference
        out = attend(q_BSKGD, cache["k"], cache["v"], block_tables_BN,
                     positions_BS.astype(jnp.int32), scale=scale, cap=cfg.attn_softcap or 0.0,
                     window=float(_window(cfg, layer) or 0))
        return project(p, "o", out), cache
    keys_BLKD = read_pages(cache["k"], block_tables_BN, kv_dtype)
    vals_BLKD = read_pages(cache["v"], block_tables_BN, kv_dtype)
    mask_BSL = attention_mask(cfg, positions_BS, num_keys, layer)
    out = _decode_attention(q_BSKGD, keys_BLKD, vals_BLKD, mask_BSL, scale, cfg.attn_softcap)
    return project(p, "o", out), cache


def mla_attention(p: dict, cfg: ModelConfig, x_BSD: jax.Array, positions_BS: jax.Array,
                  cache: dict, block_tables_BN: jax.Array, layer: int | None = None
                  ) -> tuple[jax.Array, dict]:
    """DeepSeek multi-head latent attention in absorbed form.

    The cache holds the normalised latent ``c_kv [C]`` and the rotated shared key ``[R]`` per
    token; the up-projection ``kv_b`` is folded into the query (keys) and the output (values),
    which is the same product as expanding K and V, with less memory traffic.
    """
    m = cfg.mla
    b, s, _ = x_BSD.shape
    h, nope, r, c = cfg.num_heads, m.qk_nope_head_dim, m.qk_rope_head_dim, m.kv_lora_rank
    if m.q_lora_rank is None:
        q = project(p, "q", x_BSD)
    else:
        q = project(p, "q_b", rms_norm(project(p, "q_a", x_BSD), p["q_a_norm"], cfg.rms_norm_eps))
    q = q.reshape(b, s, h, m.qk_head_dim)
    q_nope, q_rope = q[..., :nope], q[..., nope:]
    kv = project(p, "kv_a", x_BSD)
    c_kv = rms_norm(kv[..., :c], p["kv_a_norm"], cfg.rms_norm_eps)
    k_rope = kv[..., c:].reshape(b, s, 1, r)
    cos, sin = rope_cos_sin(cfg, positions_BS)
    q_rope = apply_rope(q_rope, cos, sin, cfg.rope.interleaved)
    k_rope = apply_rope(k_rope, cos, sin, cfg.rope.interleaved)
    latent = jnp.concatenate([c_kv[:, :, None, :], k_rope], axis=-1)
    cache = {"c": write_pages(cache["c"], latent, positions_BS, block_tables_BN)}
    kv_b = weight_f32(p, "kv_b").reshape(c, h, nope + m.v_head_dim)
    w_uk, w_uv = kv_b[..., :nope], kv_b[..., nope:]
    q_lat = jnp.einsum("bshn,chn->bshc", q_nope.astype(jnp.float32), w_uk)
    scale, num_keys = attention_scale(cfg), block_tables_BN.shape[1] * cache["c"].shape[1]
    if use_blockwise(h, s, num_keys):
        # The latent's keys [C + R] are the whole cached row and its values its first C dims:
        # one kv head that all H query heads share.
        q_BS1HF = jnp.concatenate([q_lat, q_rope.astype(jnp.float32)], axis=-1)[:, :, None]
        load_kv, tk = paged_kv_blocks(cache["c"], None, block_tables_BN, jnp.float32, c)
        o_lat = blockwise_attention(q_BS1HF, load_kv, num_keys, tk, positions_BS, scale,
                                    window=_window(cfg, layer)).reshape(b, s, h, c)
    else:
        cached = read_pages(cache["c"], block_tables_BN)[:, :, 0, :]
        c_BLC, kr_BLR = cached[..., :c], cached[..., c:]
        scores = jnp.einsum("bshc,blc->bhsl", q_lat, c_BLC)
        scores += jnp.einsum("bshr,blr->bhsl", q_rope.astype(jnp.float32), kr_BLR)
        mask = attention_mask(cfg, positions_BS, c_BLC.shape[1], layer)[:, None]
        probs = _softmax(scores * scale, mask)
        o_lat = jnp.einsum("bhsl,blc->bshc", probs, c_BLC)
    out = jnp.einsum("bshc,chv->bshv", o_lat, w_uv).reshape(b, s, h * m.v_head_dim)
    return project(p, "o", out), cache


def new_layer_cache(cfg: ModelConfig, num_pages: int, page_size: int, dtype) -> dict:
    """Zeroed pages for one layer, holding values of ``dtype`` (stored as ``kv_storage_dtype``)."""
    heads, dims = cfg.kv_cache_dims()
    shape = (num_pages, page_size, heads, dims)
    dtype = kv_storage_dtype(dtype)
    if cfg.mla is not None:
        return {"c": jnp.zeros(shape, dtype)}
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
