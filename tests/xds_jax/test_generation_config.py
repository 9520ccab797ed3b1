"""A model's sampling defaults from its generation_config.json (vLLM's --generation-config)."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.helpers import GOLDEN
from xds_jax import LLM, SamplingParams
from xds_jax.errors import ConfigError
from xds_jax.loading.generation_config import sampling_defaults
from xds_jax.loading.loader import load_config
from xds_jax.text.byte_tokenizer import byte_tokenizer

QWEN3 = {"bos_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643],
         "pad_token_id": 151643, "temperature": 0.6, "top_k": 20, "top_p": 0.95,
         "transformers_version": "4.51.0"}


def model_dir(tmp_path, generation: dict | None, name: str = "model"):
    """A copy of the tiny golden Llama, with ``generation`` as its generation_config.json."""
    folder = tmp_path / name
    shutil.copytree(GOLDEN / "llama", folder)
    if generation is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation))
    return folder


def test_a_checkpoints_recommended_sampling_becomes_the_default(tmp_path):
    folder = model_dir(tmp_path, QWEN3)
    assert sampling_defaults("auto", folder) == {"temperature": 0.6, "top_p": 0.95, "top_k": 20}
    assert sampling_defaults("vllm", folder) == {}  # the engine's own defaults
    assert sampling_defaults("auto", model_dir(tmp_path, None, "bare")) == {}


def test_transformers_defaults_in_the_file_change_nothing_and_nulls_are_skipped(tmp_path):
    # vLLM reads the file's differences from GenerationConfig(): an explicit top_k 50 is
    # transformers' default and is not applied
    folder = model_dir(tmp_path, {"temperature": 1.0, "top_k": 50, "top_p": 1.0,
                                  "repetition_penalty": 1.05, "min_p": None,
                                  "max_new_tokens": 2048, "num_beams": 1})
    assert sampling_defaults("auto", folder) == {"repetition_penalty": 1.05, "max_tokens": 2048}


def test_a_directory_source_and_overrides_on_top(tmp_path):
    other = model_dir(tmp_path, {"temperature": 0.3, "top_p": 0.8}, "other")
    folder = model_dir(tmp_path, QWEN3)
    assert sampling_defaults(str(other), folder) == {"temperature": 0.3, "top_p": 0.8}
    got = sampling_defaults("auto", folder, '{"temperature": 0.1, "max_new_tokens": 7}')
    assert got == {"temperature": 0.1, "top_p": 0.95, "top_k": 20, "max_tokens": 7}
    assert sampling_defaults("vllm", folder, {"top_k": 5}) == {"top_k": 5}


@pytest.mark.parametrize("source, generation, overrides, message", [
    ("nowhere", None, None, "holds no generation_config.json"),
    ("", None, None, "generation_config must be"),
    ("auto", None, {"temprature": 0.5}, "unknown field(s) temprature"),
    ("auto", None, "{not json", "override_generation_config is not JSON"),
    ("auto", None, [1], "must be a JSON object"),
    ("auto", None, {"top_k": 2.5}, "top_k must be an integer"),
    ("auto", None, {"max_new_tokens": 0}, "max_new_tokens must be at least 1"),
    ("auto", {"temperature": "hot"}, None, "temperature must be a number"),
    ("auto", {"top_p": 1.5}, None, "top_p"),
    ("auto", {"temperature": True}, None, "temperature must be a number"),
])
def test_bad_sources_and_values_are_named(tmp_path, source, generation, overrides, message):
    folder = model_dir(tmp_path, generation)
    with pytest.raises(ConfigError, match="generation_config|override_generation_config") as e:
        sampling_defaults(source, folder, overrides)
    assert message in str(e.value)


def test_an_unreadable_file_is_named(tmp_path):
    folder = model_dir(tmp_path, None)
    (folder / "generation_config.json").write_text("{oops")
    with pytest.raises(ConfigError, match="generation_config.json: cannot read it as JSON"):
        sampling_defaults("auto", folder)


def test_llm_generate_without_params_uses_the_models_defaults(tmp_path):
    folder = model_dir(tmp_path, {"temperature": 0.0, "max_new_tokens": 5})
    llm = LLM(str(folder), dtype="float32", max_num_seqs=2, kv_cache_bytes=4 << 20)
    assert llm.get_default_sampling_params() == SamplingParams(temperature=0.0, max_tokens=5)
    prompt = {"prompt_token_ids": [5, 9, 200, 31, 7]}
    got = llm.generate(prompt)[0].outputs[0]
    want = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=5))[0].outputs[0]
    assert got.token_ids == want.token_ids and len(got.token_ids) == 5
    # explicit SamplingParams are taken as given
    longer = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8))[0].outputs[0]
    assert longer.token_ids[:5] == want.token_ids and len(longer.token_ids) == 8


def test_llm_refuses_a_bad_override_before_loading(tmp_path):
    with pytest.raises(ConfigError, match="unknown field"):
        LLM(str(model_dir(tmp_path, None)), override_generation_config={"temp": 1})
    engine_default = LLM(str(model_dir(tmp_path, QWEN3, "q")), generation_config="vllm",
                         dtype="float32", kv_cache_bytes=4 << 20)
    assert engine_default.get_default_sampling_params() == SamplingParams()


def test_a_default_max_new_tokens_past_the_context_stops_at_the_context(tmp_path):
    # as the server caps it (and vLLM stops there), not a PromptTooLongError
    folder = model_dir(tmp_path, {"temperature": 0.0, "max_new_tokens": 100})
    llm = LLM(str(folder), dtype="float32", max_model_len=24, kv_cache_bytes=4 << 20)
    out = llm.generate({"prompt_token_ids": [5, 9, 200, 31]})[0].outputs[0]
    assert len(out.token_ids) == 20 and out.finish_reason == "length"


def _stops_at_a_listed_eos(folder, config_eos: bool):
    """Greedy decoding from the directory stops at the first token that an ``eos_token_id``
    list names (in generation_config.json, or in config.json with ``config_eos``)."""
    prompt, kv = {"prompt_token_ids": [5, 9, 200, 31, 7]}, 4 << 20
    free = LLM(str(folder), dtype="float32", kv_cache_bytes=kv).generate(
        prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0].outputs[0]
    stop_at = next(i for i, t in enumerate(free.token_ids) if i >= 3 and t != 2)
    eos = [2, free.token_ids[stop_at]]
    if config_eos:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(dict(config, eos_token_id=eos)))
    else:
        (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    llm = LLM(str(folder), dtype="float32", kv_cache_bytes=kv)
    assert eos[1] in llm.eos_token_ids
    got = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12))[0].outputs[0]
    first = next(i for i, t in enumerate(free.token_ids) if t in eos)
    assert got.finish_reason == "stop" and got.token_ids == free.token_ids[:first + 1]


def test_a_generation_config_eos_list_ends_outputs_without_a_tokenizer(tmp_path):
    """Token ids only (no tokenizer.json): generation_config.json's list was ignored."""
    _stops_at_a_listed_eos(model_dir(tmp_path, None), config_eos=False)


def test_a_config_eos_list_ends_outputs_beside_a_tokenizer(tmp_path):
    """With a tokenizer and no generation_config.json, config.json's eos_token_id list was
    ignored (only the tokenizer's EOS ended an output); vLLM reads it as the generation config."""
    folder = model_dir(tmp_path, None)
    byte_tokenizer(load_config(folder))._backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    _stops_at_a_listed_eos(folder, config_eos=True)


def test_a_generation_config_directory_s_eos_ends_outputs(tmp_path):
    """``generation_config=DIR`` (``--generation-config DIR``): the file's eos_token_id ends
    outputs too, as vLLM reads stop tokens from the generation config it is given (only the
    model directory's file was read); the model directory's own stay."""
    folder, kv = model_dir(tmp_path, None), 4 << 20
    prompt = {"prompt_token_ids": [5, 9, 200, 31, 7]}
    free = LLM(str(folder), dtype="float32", kv_cache_bytes=kv).generate(
        prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0].outputs[0]
    stop_at = next(i for i, t in enumerate(free.token_ids) if i >= 3 and t != 2)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "generation_config.json").write_text(
        json.dumps({"eos_token_id": free.token_ids[stop_at], "temperature": 0.0}))
    llm = LLM(str(folder), dtype="float32", kv_cache_bytes=kv, generation_config=str(elsewhere))
    assert free.token_ids[stop_at] in llm.eos_token_ids and 2 in llm.eos_token_ids
    got = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12))[0].outputs[0]
    first = next(i for i, t in enumerate(free.token_ids) if t in llm.eos_token_ids)
    assert got.finish_reason == "stop" and got.token_ids == free.token_ids[:first + 1]
    (elsewhere / "generation_config.json").write_text(json.dumps({"eos_token_id": "two"}))
    with pytest.raises(ConfigError, match="eos_token_id must be a token id"):
        LLM(str(folder), dtype="float32", kv_cache_bytes=kv, generation_config=str(elsewhere))
