"""Blockwise prefill attention against the dense path: random pages and whole tiny models."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import golden, tiny
from xds_jax.kernels import cpu_attention
from xds_jax.model import attention_blocks, reference, stages
from xds_jax.model.attention import (
    _prefill_attention,
    as_bits,
    attention_mask,
    kv_storage_dtype,
    paged_kv_blocks,
    read_pages,
)
from xds_jax.model.attention_blocks import blockwise_attention

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}


@dataclasses.dataclass(frozen=True)
class WindowConfig:
    """The two fields ``attention_mask`` reads, for a layer with or without a window."""

    sliding_window: int | None

    def is_local_layer(self, layer):
        return self.sliding_window is not None


def random_case(seed, b, s, k, g, dh, page_size, pages_per_row, dtype):
    """Queries, shuffled KV pages of ``b`` rows and their block table."""
    rng = np.random.default_rng(seed)
    num_pages = b * pages_per_row + 3
    shape = (num_pages, page_size, k, dh)
    k_pages, v_pages = (as_bits(jnp.asarray(rng.normal(size=shape), dtype)) for _ in range(2))
    assert k_pages.dtype == kv_storage_dtype(dtype)
    table = rng.permutation(num_pages)[: b * pages_per_row].reshape(b, pages_per_row)
    q = jnp.asarray(rng.normal(size=(b, s, k, g, dh)), dtype)
    return q, k_pages, v_pages, jnp.asarray(table, jnp.int32)


def dense(q, k_pages, v_pages, table, positions, scale, cap, window, dtype):
    keys, vals = read_pages(k_pages, table, dtype), read_pages(v_pages, table, dtype)
    mask = attention_mask(WindowConfig(window), positions, keys.shape[1], 0)
    return _prefill_attention(q, keys, vals, mask, scale, cap)


def blockwise(q, k_pages, v_pages, table, positions, scale, cap, window, dtype, q_block,
              k_block):
    num_keys = table.shape[1] * k_pages.shape[1]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(attention_blocks, "K_BLOCK", k_block)
        load_kv, tk = paged_kv_blocks(k_pages, v_pages, table, dtype)
    return blockwise_attention(q, load_kv, num_keys, tk, positions, scale, cap, window, q_block)


def chunk_positions(starts, lengths, s):
    """Row ``b`` holds tokens ``starts[b] ..`` of a chunk ``lengths[b]`` long; -1 after."""
    pos = np.full((len(starts), s), -1, np.int32)
    for row, (start, n) in enumerate(zip(starts, lengths, strict=True)):
        pos[row, :n] = np.arange(start, start + n)
    return jnp.asarray(pos)


CASES = {
    # name: (b, s, k, g, page_size, pages_per_row, starts, lengths, cap, window, q_block, k_block)
    "whole_prompt": (1, 64, 2, 1, 64, 1, [0], [64], None, None, 16, 16),
    "mid_sequence_gqa": (2, 24, 2, 3, 8, 12, [40, 7], [24, 24], None, None, 16, 16),
    "padding_and_padding_row": (3, 40, 1, 4, 4, 24, [0, 50, 0], [33, 40, 0], None, None, 16, 8),
    "ragged_blocks": (2, 37, 2, 2, 4, 23, [0, 55], [37, 20], None, None, 10, 12),
    "sliding_window": (2, 48, 2, 2, 8, 16, [60, 0], [48, 30], None, 20, 16, 16),
    "softcap_window": (2, 33, 1, 2, 4, 20, [47, 3], [33, 9], 2.0, 8, 11, 16),
    "one_query_block": (1, 20, 2, 2, 16, 4, [30], [20], 5.0, None, 32, 32),
    "page_over_block": (1, 48, 2, 2, 48, 1, [0], [48], None, 12, 16, 16),
}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_blockwise_matches_dense(case, dtype):
    b, s, k, g, page_size, pages, starts, lengths, cap, window, q_block, k_block = case
    q, k_pages, v_pages, table = random_case(0, b, s, k, g, 16, page_size, pages, dtype)
    positions = chunk_positions(starts, lengths, s)
    args = (q, k_pages, v_pages, table, positions, 0.3, cap, window, dtype)
    want = np.asarray(dense(*args))
    got = np.asarray(jax.jit(blockwise, static_argnums=(5, 6, 7, 8, 9, 10))(
        *args, q_block, k_block))
    assert got.shape == want.shape == (b, s, k * g * 16)
    assert np.isfinite(got).all()
    real = np.asarray(positions) >= 0
    tol = TOL[dtype]
    np.testing.assert_allclose(got[real], want[real], atol=tol, rtol=tol)
    np.testing.assert_array_equal(got[~real], 0.0)  # padding: finite and inert


def test_masked_key_blocks_are_not_visited():
    """Causal and window bounds: the first block sees key block 0 only; a window of 8 at
    positions 40.. starts at block 2 (keys 33..)."""
    pos = jnp.arange(16)[None]
    assert [int(x) for x in attention_blocks.visible_key_blocks(pos, 16, 4, None)] == [0, 1]
    pos = jnp.arange(40, 56)[None]
    assert [int(x) for x in attention_blocks.visible_key_blocks(pos, 16, 4, 8)] == [2, 4]
    pad = jnp.full((2, 16), -1)
    first, last = attention_blocks.visible_key_blocks(pad, 16, 4, 8)
    assert int(last) == 0 and int(first) >= int(last)


def whole_model_logits(m, tokens, forced):
    """Every position's logits from fresh traces (nothing cached across the forcing: the
    layers' own functions, ``reference._attention``, keep their traces too)."""

    def logits(params, tokens_S):
        t = tokens_S.shape[0]
        caches = reference.new_caches(m.cfg, 4, t // 4, jnp.float32)
        table = jnp.arange(4, dtype=jnp.int32)[None]
        x, _ = reference.forward(params, m.cfg, tokens_S[None], jnp.arange(t)[None], caches,
                                 table)
        return stages.head(params, m.cfg, x[0])

    with pytest.MonkeyPatch.context() as mp:
        # the XLA paths (the CPU prefill kernel, which would take both, has its own tests)
        mp.setattr(cpu_attention, "prefill_applies", lambda *a: False)
        if forced:
            mp.setattr(attention_blocks, "BLOCKWISE_MIN_SCORES", 0)
            mp.setattr(attention_blocks, "Q_BLOCK", 8)
            mp.setattr(attention_blocks, "K_BLOCK", 8)
        jax.clear_caches()
        jitted = jax.jit(logits)
        text = str(jitted.lower(m.params, tokens).as_text())
        out = np.asarray(jitted(m.params, tokens))
    jax.clear_caches()
    assert ("while" in text) == forced
    return out


@pytest.mark.parametrize("name", ["llama", "gemma2", "deepseek_v3"])
def test_whole_model_blockwise_matches_golden(name):
    """Llama (GQA), Gemma 2 (softcap, window of 8 crossed) and DeepSeek V3 (MLA): the
    23-token golden prompt padded to 24, in blocks of 8 over 4 pages of 6."""
    m, g = tiny(name), golden(name)
    prompt = g["prompt_2"]
    tokens = jnp.asarray(np.concatenate([prompt, [0]]), jnp.int32)
    dense_logits = whole_model_logits(m, tokens, forced=False)
    blocked = whole_model_logits(m, tokens, forced=True)
    n = len(prompt)
    np.testing.assert_allclose(blocked[:n], dense_logits[:n], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(blocked[:n], g["logits_2"], atol=1e-4, rtol=1e-4)
