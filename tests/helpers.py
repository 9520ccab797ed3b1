"""Shared test helpers: golden model paths and loading."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

GOLDEN = Path(__file__).parent / "golden"
TINY_MODELS = ["llama", "phi3", "granite", "granite_bias", "gemma", "gemma2", "gemma3_text",
               "smollm3", "olmo2", "olmo3", "qwen2", "qwen3", "qwen3_moe", "qwen2_moe", "mixtral",
               "olmoe",
               "granitemoe", "granitemoeshared", "deepseek_v2", "deepseek_v3",
               "deepseek_v3_noqlora", "glm4", "glm4_moe",
               "ernie4_5", "dots1", "seed_oss", "ernie4_5_moe", "exaone4", "glm4_moe_lite",
               "minimax_m2", "internlm3"]


@functools.cache
def tiny(name: str):
    """A tiny golden model loaded in float32 (cached per test session)."""
    from xds_jax.loading.loader import load_model

    return load_model(GOLDEN / name, dtype="float32", use_cache=False)


def golden(name: str) -> dict:
    with np.load(GOLDEN / name / "golden.npz") as g:
        return {k: g[k] for k in g.files}


def assert_same_greedy(got: list, want: list, logprob_tol: float) -> None:
    """Two ``LLM.generate`` results (``logprobs`` on): the same tokens, each chosen token's
    logprob within ``logprob_tol``."""
    import pytest

    for a, b in zip(got, want, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, strict=True):
            tok = next(iter(la))
            assert la[tok].logprob == pytest.approx(lb[tok].logprob, abs=logprob_tol)


def assert_greedy_agrees(got: list, want: list, logprob_tol: float) -> None:
    """As ``assert_same_greedy``, where the two runs' arithmetic differs (another matmul
    kernel): a step where they pick different tokens passes only as a near-tie in both runs
    (each token among the other's top ``logprobs``, within ``logprob_tol`` of it), and the
    comparison of that output stops there (the two continue from different tokens)."""
    import pytest

    for a, b in zip(got, want, strict=True):
        steps = zip(a.outputs[0].token_ids, b.outputs[0].token_ids, a.outputs[0].logprobs,
                    b.outputs[0].logprobs, strict=True)
        for i, (x, y, la, lb) in enumerate(steps):
            if x != y:
                assert y in la and x in lb, f"step {i}: {x} against {y}, not a near-tie"
                assert la[x].logprob - la[y].logprob <= logprob_tol, (i, la)
                assert lb[y].logprob - lb[x].logprob <= logprob_tol, (i, lb)
                break
            assert la[x].logprob == pytest.approx(lb[y].logprob, abs=logprob_tol)


def spy(monkeypatch, module, name: str) -> list:
    """Wrap ``module.name`` so each call records ``(first argument's shape, result)`` and
    still returns its result; the records, in call order."""
    calls, real = [], getattr(module, name)

    def recorded(*args):
        result = real(*args)
        calls.append((args[0].shape, result))
        return result

    monkeypatch.setattr(module, name, recorded)
    return calls


def generate_with_and_without(model: str, dtype: str, prompts: list, params,
                              turn_off) -> tuple[list, list]:
    """``LLM(model, dtype=dtype).generate(prompts, params)`` as things are, then after
    ``turn_off()`` (a test's monkeypatch taking a kernel out), each from fresh traces."""
    import jax

    from xds_jax import LLM

    outputs = []
    for step in (lambda: None, turn_off):
        step()
        jax.clear_caches()
        outputs.append(LLM(model, dtype=dtype).generate(prompts, params))
    jax.clear_caches()
    return outputs[0], outputs[1]


def attention_layer_with_and_without(dtype, x_shape: tuple, positions: list, tables: list,
                                     num_pages: int, seed: int, turn_off) -> list:
    """A tiny Llama's first attention layer (``gqa_attention``) on random rows ``x_shape``
    over random pages of 4 tokens: ``(output, cache, lowered text)`` as things are, then
    after ``turn_off()`` (a test's monkeypatch taking a kernel out), each from fresh traces."""
    import jax
    import jax.numpy as jnp

    import xds_jax.model.attention as att

    m = tiny("llama")
    cfg, layer = m.cfg, jax.tree.map(lambda w: w.astype(dtype), m.params["layers"][0]["attn"])
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal(x_shape[:2] + (cfg.hidden_size,)), dtype)
    positions, tables = jnp.asarray(positions), jnp.asarray(tables, jnp.int32)
    cache = att.new_layer_cache(cfg, num_pages, 4, dtype)
    filled = jax.tree.map(lambda c: jnp.asarray(rng.standard_normal(c.shape), dtype), cache)
    cache = jax.tree.map(att.as_bits, filled)
    runs = []
    for step in (lambda: None, turn_off):
        step()
        jax.clear_caches()
        f = jax.jit(lambda x, c: att.gqa_attention(layer, cfg, x, positions, c, tables))
        runs.append((*f(x, cache), f.lower(x, cache).as_text()))
    jax.clear_caches()
    return runs


def assert_same_attention(got: tuple, want: tuple, positions: list, dtype) -> None:
    """Two ``attention_layer_with_and_without`` runs: outputs within ``dtype``'s rounding at
    every real token (position >= 0), caches bit for bit."""
    import jax
    import jax.numpy as jnp

    real = np.asarray(positions) >= 0
    tol = 2e-2 if dtype == jnp.bfloat16 else 1e-5
    np.testing.assert_allclose(np.asarray(got[0], np.float32)[real],
                               np.asarray(want[0], np.float32)[real], rtol=tol, atol=tol)
    for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1]), strict=True):
        assert (np.asarray(a) == np.asarray(b)).all()
