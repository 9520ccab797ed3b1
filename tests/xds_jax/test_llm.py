"""The library API end to end: the embedded SmolLM2 against transformers, and bad input."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from tests.helpers import GOLDEN
from xds_jax import LLM, SamplingParams
from xds_jax.errors import (
    ConfigError,
    ModelNotFoundError,
    PromptTooLongError,
    SamplingParamsError,
    UnsupportedModelError,
    WeightLoadError,
)
from xds_jax.llm import InvalidPromptError
from xds_jax.loading.loader import load_model

SMOL = json.loads((GOLDEN / "smollm2.json").read_text())


@pytest.fixture(scope="module")
def smollm2():
    return LLM("smollm2", dtype="float32")


def test_chat_answers_paris_with_transformers_tokens(smollm2):
    case = next(c for c in SMOL["prompts"] if c["chat"] and len(c["messages"]) == 1)
    out = smollm2.chat(case["messages"], SamplingParams(temperature=0, max_tokens=32))[0]
    assert "Paris" in out.outputs[0].text
    assert out.prompt_token_ids == case["prompt_token_ids"]
    assert out.outputs[0].token_ids == case["greedy_token_ids"]
    assert out.outputs[0].finish_reason == case["finish_reason"] == "stop"


def test_greedy_tokens_match_transformers_for_every_golden_prompt(smollm2):
    cases = [c for c in SMOL["prompts"] if not c["chat"]]
    params = [SamplingParams(temperature=0, max_tokens=len(c["greedy_token_ids"])) for c in cases]
    outs = smollm2.generate([c["text"] for c in cases], params)
    for case, out in zip(cases, outs, strict=True):
        assert out.prompt_token_ids == case["prompt_token_ids"]
        assert out.outputs[0].token_ids == case["greedy_token_ids"]
        assert out.outputs[0].text == case["greedy_text"]


def test_token_prompts_logprobs_and_seeds(smollm2):
    params = SamplingParams(max_tokens=8, logprobs=5, seed=0, temperature=0.8)
    a = smollm2.generate([{"prompt_token_ids": [1, 2, 3]}], params)[0].outputs[0]
    b = smollm2.generate([{"prompt_token_ids": [1, 2, 3]}], params)[0].outputs[0]
    assert a.token_ids == b.token_ids and len(a.token_ids) == 8
    assert len(a.logprobs) == 8
    for token, entry in zip(a.token_ids, a.logprobs, strict=True):
        assert token in entry and len(entry) >= 5
        assert all(lp.logprob <= 0 for lp in entry.values())
    assert a.cumulative_logprob == pytest.approx(
        sum(e[t].logprob for t, e in zip(a.token_ids, a.logprobs, strict=True)), rel=1e-5)


def test_stop_string_cuts_text(smollm2):
    out = smollm2.generate("The capital of France is",
                           SamplingParams(temperature=0, max_tokens=20, stop=["\n"]))[0]
    assert out.outputs[0].text == " Paris."
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == "\n"
    kept = smollm2.generate("The capital of France is", SamplingParams(
        temperature=0, max_tokens=20, stop=["Paris"], include_stop_str_in_output=True))[0]
    assert kept.outputs[0].text == " Paris"


def test_detokenize_false_gives_token_ids_only(smollm2):
    """vLLM's ``detokenize=False``: the same tokens, no text, logprobs without decoded tokens;
    stop strings (matched in the text) are refused with it."""
    want = smollm2.generate("The capital of France is",
                            SamplingParams(temperature=0, max_tokens=6, logprobs=2))[0]
    got = smollm2.generate("The capital of France is", SamplingParams(
        temperature=0, max_tokens=6, logprobs=2, detokenize=False))[0]
    assert got.outputs[0].token_ids == want.outputs[0].token_ids
    assert want.outputs[0].text and got.outputs[0].text == ""
    assert all(lp.decoded_token is None for e in got.outputs[0].logprobs for lp in e.values())
    with pytest.raises(SamplingParamsError, match="detokenize=True"):
        SamplingParams(stop=["."], detokenize=False)
    with pytest.raises(SamplingParamsError, match="detokenize"):
        SamplingParams(detokenize="no")


def test_n_samples_per_prompt(smollm2):
    out = smollm2.generate("Once upon a time", SamplingParams(n=3, seed=5, max_tokens=6))[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    m = out.metrics  # vLLM's stamps: the first token between arrival and the end
    assert m.arrival_time <= m.first_scheduled_time < m.first_token_time < m.last_token_time \
        <= m.finished_time


def test_bad_prompts(smollm2):
    with pytest.raises(PromptTooLongError, match="maximum context length is 8192"):
        smollm2.generate({"prompt_token_ids": [5] * 8192}, SamplingParams(max_tokens=4))
    with pytest.raises(InvalidPromptError, match="empty"):
        smollm2.generate({"prompt_token_ids": []})
    with pytest.raises(InvalidPromptError, match="outside the vocabulary"):
        smollm2.generate({"prompt_token_ids": [1, 10**9]})
    with pytest.raises(InvalidPromptError, match="str or dict"):
        smollm2.generate([3.5])
    for bad in (5, None, 3.5):  # not even a list
        with pytest.raises(InvalidPromptError, match="a str, a dict or a list of them"):
            smollm2.generate(bad)
    # vLLM's lora_request: None is accepted, an adapter named as unsupported
    assert smollm2.generate("hi", SamplingParams(max_tokens=1), lora_request=None)
    with pytest.raises(ConfigError, match="lora_request: LoRA adapters are not supported"):
        smollm2.generate("hi", SamplingParams(max_tokens=1), lora_request=object())
    with pytest.raises(ConfigError, match="lora_request"):
        smollm2.chat([{"role": "user", "content": "hi"}], lora_request=object())
    for params in ({"max_tokens": 2}, 7, [SamplingParams(), {"max_tokens": 2}]):
        with pytest.raises(SamplingParamsError,
                           match="sampling_params must be (a )?SamplingParams"):
            smollm2.generate(["hi", "there"], params)


@pytest.mark.parametrize("spelling", ["auto", -1])
def test_max_model_len_auto_is_the_longest_context_the_kv_pool_holds(spelling):
    """vLLM's ``max_model_len="auto"`` (or -1): whole blocks of a KV pool of kv_cache_bytes,
    at most the model's; a prompt past it is refused with the length it got; a budget larger
    than the model's context gives the model's."""
    llm = LLM(str(GOLDEN / "llama"), dtype="float32", max_model_len=spelling,
              kv_cache_bytes=100_000, max_num_seqs=4)
    per_block = llm.cfg.kv_bytes_per_token(4) * 16
    assert llm.max_model_len == 100_000 // per_block * 16 < llm.cfg.max_position_embeddings
    assert llm.engine.groups[0].config.num_blocks * 16 >= llm.max_model_len
    with pytest.raises(PromptTooLongError, match=f"length is {llm.max_model_len} tokens"):
        llm.generate({"prompt_token_ids": [5] * (llm.max_model_len + 1)})
    roomy = LLM(str(GOLDEN / "llama"), dtype="float32", max_model_len="auto")  # 1 GiB
    assert roomy.max_model_len == roomy.cfg.max_position_embeddings
    with pytest.raises(ConfigError, match="or 'auto'"):
        LLM(str(GOLDEN / "llama"), max_model_len=roomy.max_model_len + 1)


def test_a_prompt_filling_the_context_can_be_scored_truncated_but_not_continued():
    """max_tokens=0 only scores the prompt (vLLM: a prompt may be max_model_len long)."""
    llm = LLM(str(GOLDEN / "llama"), dtype="float32", max_model_len=64)
    ids = [int(t) for t in np.random.default_rng(0).integers(0, 320, 64)]
    scored = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=0,
                                                                     prompt_logprobs=1))[0]
    shorter = llm.generate({"prompt_token_ids": ids[:63]},
                           SamplingParams(max_tokens=0, prompt_logprobs=1))[0]
    assert scored.outputs[0].token_ids == [] and len(scored.prompt_logprobs) == 64
    for a, b, t in zip(scored.prompt_logprobs[1:63], shorter.prompt_logprobs[1:], ids[1:63],
                       strict=True):
        assert abs(a[t].logprob - b[t].logprob) < 1e-4
    for max_tokens in (1, 4):  # the prompt fills the context: named so, not max_tokens
        with pytest.raises(PromptTooLongError, match="prompt has 64 tokens .the context holds "
                           "the prompt and at least one new token"):
            llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=max_tokens))
    # as vLLM's offline API: an output asked past the context stops there
    capped = llm.generate({"prompt_token_ids": ids[:60]},
                          SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]
    assert len(capped.outputs[0].token_ids) == 4 and capped.outputs[0].finish_reason == "length"
    both = llm.generate({"prompt_token_ids": ids[:60]}, SamplingParams(max_tokens=10,
                                                                        min_tokens=8))[0]
    assert len(both.outputs[0].token_ids) == 4
    # vLLM's truncate_prompt_tokens keeps the last k tokens (-1: the context length).
    greedy = dict(temperature=0, max_tokens=4, ignore_eos=True)
    cut = llm.generate({"prompt_token_ids": ids}, SamplingParams(truncate_prompt_tokens=8,
                                                                  **greedy))[0]
    assert cut.prompt_token_ids == ids[-8:]
    plain = llm.generate({"prompt_token_ids": ids[-8:]}, SamplingParams(**greedy))[0]
    assert cut.outputs[0].token_ids == plain.outputs[0].token_ids
    whole = llm.generate({"prompt_token_ids": ids + ids[:6]},
                         SamplingParams(truncate_prompt_tokens=-1, max_tokens=0))[0]
    assert whole.prompt_token_ids == (ids + ids[:6])[-64:]
    # -1 keeps a token's room to generate (it kept all 64 tokens and then refused them); the
    # output stops where the context ends, and a prompt that fits is not cut
    room = llm.generate({"prompt_token_ids": ids + ids[:6]},
                        SamplingParams(truncate_prompt_tokens=-1, **greedy))[0]
    assert room.prompt_token_ids == (ids + ids[:6])[-63:] and len(room.outputs[0].token_ids) == 1
    fits = llm.generate({"prompt_token_ids": ids[:40]}, SamplingParams(
        truncate_prompt_tokens=-1, max_tokens=100, min_tokens=50, ignore_eos=True))[0]
    assert fits.prompt_token_ids == ids[:40] and len(fits.outputs[0].token_ids) == 24
    with pytest.raises(SamplingParamsError, match="stop strings need a tokenizer"):
        llm.generate({"prompt_token_ids": ids[:8]}, SamplingParams(stop=["a"]))
    with pytest.raises(SamplingParamsError, match="must be -1 or in 1..64"):
        llm.generate({"prompt_token_ids": ids}, SamplingParams(truncate_prompt_tokens=65))
    with pytest.raises(SamplingParamsError, match="truncate_prompt_tokens must be -1"):
        SamplingParams(truncate_prompt_tokens=0)


def test_missing_model_path():
    with pytest.raises(ModelNotFoundError, match="neither a registered name nor a path"):
        LLM("/no/such/model")


def test_unsupported_model_type(tmp_path):
    cfg = json.loads((GOLDEN / "llama" / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, model_type="bert")))
    with pytest.raises(UnsupportedModelError, match="model_type 'bert' is not supported"):
        load_model(tmp_path)


def _copy_llama(tmp_path, edit):
    shutil.copy(GOLDEN / "llama" / "config.json", tmp_path / "config.json")
    tensors = load_file(str(GOLDEN / "llama" / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(tmp_path / "model.safetensors"))


def test_checkpoint_missing_a_tensor(tmp_path):
    _copy_llama(tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(WeightLoadError, match="model.layers.1.mlp.up_proj.weight"):
        load_model(tmp_path, use_cache=False)


def test_checkpoint_with_a_misshaped_tensor(tmp_path):
    def shrink(t):
        t["model.layers.0.self_attn.k_proj.weight"] = np.zeros((3, 3), np.float32)

    _copy_llama(tmp_path, shrink)
    with pytest.raises(WeightLoadError, match=r"k_proj.weight.*\(3, 3\)"):
        load_model(tmp_path, use_cache=False)


def test_param_cache_restores_identical_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("XDS_CACHE_DIR", str(tmp_path / "cache"))
    first = load_model(GOLDEN / "qwen3_moe", dtype="float32")
    assert any((tmp_path / "cache" / "params").iterdir())
    second = load_model(GOLDEN / "qwen3_moe", dtype="float32")
    leaves = zip(jax_leaves(first.params), jax_leaves(second.params), strict=True)
    for a, b in leaves:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_param_cache_keeps_the_most_recently_used_entries_within_its_limit(tmp_path,
                                                                          monkeypatch):
    # an entry whose sources changed is never restored again: the cache must not only grow
    import os
    import time

    from xds_jax.loading import param_cache

    monkeypatch.setenv("XDS_CACHE_DIR", str(tmp_path / "cache"))
    root = param_cache.cache_root()
    for name, size, age in (("old", 300, 30), ("mid", 300, 20), ("new", 300, 10)):
        (root / name).mkdir(parents=True)
        (root / name / "blob").write_bytes(b"x" * size)
        os.utime(root / name, (time.time() - age, time.time() - age))
    monkeypatch.setenv("XDS_PARAM_CACHE_GIB", str(700 / (1 << 30)))
    assert param_cache.prune() == [root / "old"]
    monkeypatch.setenv("XDS_PARAM_CACHE_GIB", str(1 / (1 << 30)))
    assert param_cache.prune(keep=root / "new") == [root / "mid"]  # the one just written stays
    assert sorted(p.name for p in root.iterdir()) == ["new"]
    # a real load writes an entry and prunes around it
    monkeypatch.setenv("XDS_PARAM_CACHE_GIB", "32")
    load_model(GOLDEN / "llama", dtype="float32")
    assert len(list(root.iterdir())) == 2


def jax_leaves(tree):
    import jax

    return jax.tree_util.tree_leaves(tree)


@pytest.mark.parametrize("options, named", [
    ({"max_model_len": "128"}, "max_model_len must be a positive integer"),
    ({"max_model_len": True}, "max_model_len must be a positive integer"),
    ({"max_model_len": 64.5}, "max_model_len must be a positive integer"),
    ({"deployment": 123}, "deployment must be a deployment file's path"),
    ({"enable_prefix_caching": "no"}, "enable_prefix_caching must be true or false"),
    ({"async_scheduling": 1}, "async_scheduling must be true, false or None"),
    ({"bogus": 1}, "unexpected keyword argument 'bogus'; the options are EngineConfig's"),
    ({"faults": 5}, "faults must be fault specs"),
    ({"num_dp_groups": 3, "deployment": "configs/deployments/cpu8-pd.yaml"},
     "the deployment sets its DP groups"),
    ({"speculative_config": {1: 2, "a": 3}}, "an option has the wrong type"),
    # vLLM's spellings say what to use here
    ({"gpu_memory_utilization": 0.9}, "sized by kv_cache_bytes"),
    ({"tensor_parallel_size": 2}, "decode DP groups run with TP=1"),
])
def test_an_option_of_the_wrong_type_is_named_before_loading(options, named):
    with pytest.raises(ConfigError) as error:
        LLM("nowhere/not-a-model", **options)  # refused before the model is looked up
    assert named in str(error.value)


def test_an_n_request_prefills_its_prompt_once():
    """The samples of an n > 1 request after the first wait for its prompt's KV and find its
    full blocks in the prefix cache (they were prefilled side by side, n times the work and
    twice the first token's wait at n=2); each samples as its own seeded request does."""
    llm = LLM(str(GOLDEN / "llama"), dtype="float32", max_num_batched_tokens=64,
              max_model_len=256)
    prompt = {"prompt_token_ids": np.random.default_rng(0).integers(3, 300, 200).tolist()}
    out = llm.generate(prompt, SamplingParams(n=3, max_tokens=6, temperature=0.8, seed=5))[0]
    group = llm.engine.groups[0]
    assert group.prefill_tokens == 200 + 2 * (200 - 192)  # the tail of a partial block
    alone = [llm.generate(prompt, SamplingParams(max_tokens=6, temperature=0.8, seed=5 + i))
             [0].outputs[0].token_ids for i in range(3)]
    assert [c.token_ids for c in out.outputs] == alone
