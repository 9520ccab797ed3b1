"""Embeddings (``LLM.embed``, ``xds_jax/model/pooling.py``) against transformers'
``last_hidden_state`` on the same tiny weights (the golden file), pooled by hand; the pooling a
model directory's sentence-transformers files name."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.helpers import GOLDEN, golden
from xds_jax import LLM
from xds_jax.errors import ConfigError, PromptTooLongError
from xds_jax.model.pooling import model_pooling

GOLD = golden("qwen3")  # transformers' hidden states on 3 prompts (tests/golden/README.md)
PROMPTS = [GOLD[f"prompt_{i}"].tolist() for i in range(3)]


@pytest.fixture(scope="module")
def llm():
    return LLM(str(GOLDEN / "qwen3"), dtype="float32", max_num_seqs=4, use_param_cache=False)


@pytest.fixture(scope="module")
def hidden():
    """transformers' ``last_hidden_state`` (after the final norm) of each prompt."""
    return [GOLD[f"hidden_{i}"][-1] for i in range(3)]


@pytest.mark.parametrize("pooling", ["last", "mean", "cls"])
def test_embeddings_are_transformers_hidden_states_pooled(llm, hidden, pooling):
    out = llm.embed([{"prompt_token_ids": p} for p in PROMPTS], pooling=pooling)
    raw = llm.embed([{"prompt_token_ids": p} for p in PROMPTS], pooling=pooling, normalize=False)
    for h, normed, plain in zip(hidden, out, raw, strict=True):
        want = {"last": h[-1], "mean": h.mean(axis=0), "cls": h[0]}[pooling]
        np.testing.assert_allclose(plain.outputs.embedding, want, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(normed.outputs.embedding, want / np.linalg.norm(want),
                                   rtol=1e-4, atol=1e-5)


def test_defaults_bad_pooling_and_long_prompts(llm):
    assert llm.pooling == ("last", True)  # no sentence-transformers files: vLLM's default
    one = llm.embed({"prompt_token_ids": PROMPTS[0]})[0]
    assert len(one.outputs.embedding) == llm.cfg.hidden_size
    assert one.prompt_token_ids == PROMPTS[0]
    assert np.linalg.norm(one.outputs.embedding) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ConfigError, match="pooling"):
        llm.embed({"prompt_token_ids": PROMPTS[0]}, pooling="max")
    with pytest.raises(PromptTooLongError):
        llm.embed({"prompt_token_ids": [1] * (llm.max_model_len + 1)})
    cut = llm.embed({"prompt_token_ids": [3] * 10 + PROMPTS[2]},
                    truncate_prompt_tokens=len(PROMPTS[2]))[0]
    whole = llm.embed({"prompt_token_ids": PROMPTS[2]})[0]
    assert cut.prompt_token_ids == PROMPTS[2]
    np.testing.assert_allclose(cut.outputs.embedding, whole.outputs.embedding, atol=1e-6)


def test_sentence_transformers_files_name_the_pooling(tmp_path):
    assert model_pooling(tmp_path) == ("last", True)
    assert model_pooling(tmp_path / "model.gguf") == ("last", True)
    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling",
         "type": "sentence_transformers.models.Pooling"}]))
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 64, "pooling_mode_cls_token": False,
         "pooling_mode_mean_tokens": True, "pooling_mode_lasttoken": False}))
    assert model_pooling(tmp_path) == ("mean", False)  # no Normalize module
    modules = json.loads((tmp_path / "modules.json").read_text())
    modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                    "type": "sentence_transformers.models.Normalize"})
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"pooling_mode_lasttoken": True}))
    assert model_pooling(tmp_path) == ("last", True)


def test_score_is_the_cosine_similarity_of_the_embeddings(llm):
    a, b, c = ({"prompt_token_ids": p} for p in PROMPTS)
    e = [np.array(o.outputs.embedding) for o in llm.embed([a, b, c], normalize=False)]
    cos = [float(e[0] @ v / np.linalg.norm(e[0]) / np.linalg.norm(v)) for v in e[1:]]
    one_to_many = llm.score(a, [b, c])
    assert [o.outputs.score for o in one_to_many] == pytest.approx(cos, rel=1e-5)
    assert one_to_many[0].prompt_token_ids == PROMPTS[0] + PROMPTS[1]
    pairwise = llm.score([a, b], [b, c])
    assert pairwise[0].outputs.score == pytest.approx(cos[0], rel=1e-5)
    for data_1, data_2 in (([a, b], [a, b, c]), ([a, b], [c]), ([], [a, b]), (a, [])):
        with pytest.raises(ValueError, match="data_1"):  # vLLM's 1:1, 1:N or N:N only
            llm.score(data_1, data_2)
