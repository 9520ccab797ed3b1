"""Every architecture against Hugging Face transformers on the same tiny random weights.

Golden files come from tests/golden/make_golden.py (transformers 5, float32, eager attention).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import GOLDEN, TINY_MODELS, golden, tiny
from xds_jax.generate import LocalGenerator
from xds_jax.model import stages
from xds_jax.model.layers import rms_norm
from xds_jax.model.reference import (
    _reference_hidden_states,
    _reference_logits,
    reference_hidden_states,
    reference_length,
    reference_logits,
)
from xds_jax.sampling.params import SamplingParams
from xds_jax.sequence import Sequence

TOL = 1e-4


@pytest.mark.parametrize("name", TINY_MODELS)
def test_logits_and_every_layer_match_transformers(name):
    m, g = tiny(name), golden(name)
    for i in range(3):
        tokens = jnp.asarray(g[f"prompt_{i}"])
        hidden = np.array(reference_hidden_states(m.params, m.cfg, tokens))
        want = g[f"hidden_{i}"]
        # transformers' last hidden state is taken after the final norm.
        hidden[-1] = np.asarray(rms_norm(jnp.asarray(hidden[-1]), m.params["final_norm"],
                                         m.cfg.rms_norm_eps))
        np.testing.assert_allclose(hidden, want, atol=TOL, rtol=TOL)
        logits = reference_logits(m.params, m.cfg, tokens)
        np.testing.assert_allclose(np.asarray(logits), g[f"logits_{i}"], atol=TOL, rtol=TOL)


def test_reference_lengths_are_bucketed_within_the_model_s_positions():
    assert [reference_length(t, 4096) for t in (1, 16, 17, 33, 512, 513)] == [
        16, 16, 32, 64, 512, 1024]
    assert reference_length(40, 48) == 48  # not past the model's positions...
    assert reference_length(60, 48) == 60  # ...unless the sequence itself is


@pytest.mark.parametrize("name", ["gemma2", "qwen3_moe"])  # sliding window, softcaps; MoE
def test_the_padded_reference_equals_the_exact_length_program(name):
    """Padding hides behind the causal mask: the padded references equal programs compiled
    for the prompt's own length."""
    m, g = tiny(name), golden(name)
    tokens = np.asarray(g["prompt_1"])
    t = len(tokens)
    assert reference_length(t, m.cfg.max_position_embeddings) > t
    np.testing.assert_allclose(np.asarray(reference_logits(m.params, m.cfg, tokens)),
                               np.asarray(_reference_logits(m.params, m.cfg, tokens)),
                               atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(reference_hidden_states(m.params, m.cfg, tokens)),
                               np.asarray(_reference_hidden_states(m.params, m.cfg, tokens)),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_greedy_generation_matches_transformers(name):
    m, g = tiny(name), golden(name)
    seqs = [Sequence(g[f"prompt_{i}"].tolist(), SamplingParams(temperature=0, max_tokens=16))
            for i in range(3)]
    LocalGenerator(m.params, m.cfg).run(seqs)
    for i, s in enumerate(seqs):
        assert s.output_ids == g[f"greedy_{i}"].tolist(), f"prompt {i}"
        assert s.finish_reason == "length"


@pytest.mark.parametrize("name", ["llama", "qwen3_moe", "granitemoeshared", "deepseek_v3"])
def test_separately_jitted_stages_match_transformers(name):
    """Chain the stages as a distributed runner does: one jitted program per stage."""
    m, g = tiny(name), golden(name)
    cfg, params = m.cfg, m.params
    embed = jax.jit(stages.embed)
    attention = jax.jit(stages.attention, static_argnums=1)
    ffn = jax.jit(stages.ffn, static_argnums=1)
    gate = jax.jit(stages.moe_gate, static_argnums=1)
    shared = jax.jit(stages.moe_shared, static_argnums=1)
    experts = jax.jit(stages.moe_experts)
    head = jax.jit(stages.head, static_argnums=1)
    tokens = jnp.asarray(g["prompt_2"])
    t = tokens.shape[0]
    from xds_jax.model.attention import new_layer_cache

    x = embed(params, tokens[None])
    positions, table = jnp.arange(t)[None], jnp.zeros((1, 1), jnp.int32)
    for i, layer in enumerate(params["layers"]):
        x, _ = attention(layer, cfg, x, positions, new_layer_cache(cfg, 1, t, jnp.float32), table)
        if not cfg.is_moe_layer(i):
            x = ffn(layer, cfg, x)
            continue
        h, ids, w, _ = gate(layer, cfg, x[0])
        # Every expert sees every token (capacity T); combine picks each token's top-k.
        e = cfg.moe.num_experts
        y_ETD = experts(layer["moe"]["experts"], jnp.broadcast_to(h, (e,) + h.shape))
        picked = jnp.take_along_axis(y_ETD.transpose(1, 0, 2), ids[:, :, None], axis=1)
        routed = jnp.einsum("tkd,tk->td", picked, w)
        x = stages.moe_combine(x[0], routed, shared(layer, cfg, h))[None]
    logits = head(params, cfg, x[0])
    np.testing.assert_allclose(np.asarray(logits), g["logits_2"], atol=TOL, rtol=TOL)


def test_group_limited_routing_ranks_groups_by_best_or_top_two():
    """Hand-worked: group 0 holds the single best expert, group 1 the best pair. DeepSeek-V2
    (best expert) keeps group 0; DeepSeek-V3 (top-two sum) keeps group 1."""
    import dataclasses

    from xds_jax.model.config import MoEConfig
    from xds_jax.model.moe import route

    # Softmax over logits log(p) gives back p: group 0 = experts 0-1, group 1 = experts 2-3.
    probs = np.array([[0.40, 0.02, 0.30, 0.28]], np.float32)
    p = {"router": jnp.eye(4, dtype=jnp.float32)}
    moe = MoEConfig(num_experts=4, num_experts_per_tok=1, moe_intermediate_size=8,
                    norm_topk_prob=False, n_group=2, topk_group=1, group_score="max")
    ids, w, _ = route(p, moe, jnp.log(jnp.asarray(probs)))
    assert ids.tolist() == [[0]] and np.allclose(w, [[0.40]])
    ids, w, _ = route(p, dataclasses.replace(moe, group_score="top2_sum"), jnp.log(probs))
    assert ids.tolist() == [[2]] and np.allclose(w, [[0.30]])


@pytest.mark.parametrize("name", ["gemma3_mm", "mistral3_mm", "qwen2_5_vl_mm", "qwen3_vl_mm",
                                  "qwen3_vl_moe_mm"])
def test_image_text_checkpoint_serves_its_language_model(name):
    """An image-text Gemma 3, Mistral 3, Qwen2.5-VL or Qwen3-VL checkpoint (language model
    under ``model.language_model.``, or ``model.`` as transformers saves Qwen2.5-VL, a vision
    tower beside it; Qwen's multimodal RoPE sections set) against transformers'
    ``*ForConditionalGeneration`` on text: logits, and greedy tokens through the engine (image
    token ids excluded on both sides)."""
    from xds_jax import LLM

    m, g = tiny(name), golden(name)
    for i in range(3):
        logits = reference_logits(m.params, m.cfg, jnp.asarray(g[f"prompt_{i}"]))
        np.testing.assert_allclose(np.asarray(logits), g[f"logits_{i}"], atol=TOL, rtol=TOL)
    llm = LLM(str(GOLDEN / name), dtype="float32")
    outs = llm.generate([{"prompt_token_ids": g[f"prompt_{i}"].tolist()} for i in range(3)],
                        SamplingParams(temperature=0, max_tokens=16, ignore_eos=True,
                                       allowed_token_ids=list(range(300))))
    for i, out in enumerate(outs):
        assert out.outputs[0].token_ids == g[f"greedy_{i}"].tolist(), f"prompt {i}"


def test_mistral3_as_released_reads_its_own_untied_head(tmp_path):
    """Mistral Small 3.x as released: no top-level ``tie_word_embeddings``, the text config
    untied and the head stored as ``language_model.lm_head.weight`` (here the embedding's
    values, so transformers' tied logits still hold)."""
    import json

    from safetensors.numpy import load_file, save_file

    from xds_jax.loading.loader import load_model

    src = GOLDEN / "mistral3_mm"
    config = json.loads((src / "config.json").read_text())
    del config["tie_word_embeddings"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    tensors = load_file(src / "model.safetensors")
    tensors["language_model.lm_head.weight"] = tensors["language_model.model.embed_tokens.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    m, g = load_model(tmp_path, dtype="float32", use_cache=False), golden("mistral3_mm")
    assert not m.cfg.tie_word_embeddings and "lm_head" in m.params
    logits = reference_logits(m.params, m.cfg, jnp.asarray(g["prompt_2"]))
    np.testing.assert_allclose(np.asarray(logits), g["logits_2"], atol=TOL, rtol=TOL)


def test_granite_moe_in_memory_names_load_like_checkpoint_ones(tmp_path):
    """transformers 5 renames Granite MoE's ``input_linear`` / ``output_linear`` /
    ``router.layer`` to ``experts.gate_up_proj`` / ``experts.down_proj`` / ``router`` in
    memory; a checkpoint under those names loads to the same model."""
    import shutil

    from safetensors.numpy import load_file, save_file

    from xds_jax.loading.loader import load_model

    src = GOLDEN / "granitemoeshared"
    shutil.copy(src / "config.json", tmp_path / "config.json")
    renames = {"input_linear.weight": "experts.gate_up_proj",
               "output_linear.weight": "experts.down_proj", "router.layer.weight": "router.weight"}
    tensors = {}
    for name, w in load_file(str(src / "model.safetensors")).items():
        for old, new in renames.items():
            if ".block_sparse_moe." in name and name.endswith(old):
                name = name.removesuffix(old) + new
        tensors[name] = w
    assert "model.layers.0.block_sparse_moe.experts.gate_up_proj" in tensors
    save_file(tensors, str(tmp_path / "model.safetensors"))
    m, g = load_model(tmp_path, dtype="float32", use_cache=False), golden("granitemoeshared")
    logits = reference_logits(m.params, m.cfg, jnp.asarray(g["prompt_2"]))
    np.testing.assert_allclose(np.asarray(logits), g["logits_2"], atol=TOL, rtol=TOL)


def test_qwen3_vl_moe_as_released_reads_its_transposed_experts(tmp_path):
    """Qwen3-VL-MoE's released checkpoints keep the fused experts transposed from transformers
    5's layout (``gate_up_proj [E, D, 2F]``, ``down_proj [E, F, D]``; transformers transposes
    them on load): read either way, the same model."""
    import shutil

    from safetensors.numpy import load_file, save_file

    from xds_jax.loading.loader import load_model

    src = GOLDEN / "qwen3_vl_moe_mm"
    shutil.copy(src / "config.json", tmp_path / "config.json")
    tensors = load_file(str(src / "model.safetensors"))
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        tensors[name] = np.ascontiguousarray(np.swapaxes(tensors[name], 1, 2))
    assert tensors["model.language_model.layers.0.mlp.experts.gate_up_proj"].shape == (8, 64, 48)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    m, g = load_model(tmp_path, dtype="float32", use_cache=False), golden("qwen3_vl_moe_mm")
    logits = reference_logits(m.params, m.cfg, jnp.asarray(g["prompt_2"]))
    np.testing.assert_allclose(np.asarray(logits), g["logits_2"], atol=TOL, rtol=TOL)
