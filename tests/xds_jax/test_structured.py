"""Structured outputs: the grammar's mask, the sampler's ban, and whole requests on a random
tiny model (only the constraint can make its output valid) in every engine that samples."""

import json
import pickle
import re

import numpy as np
import pytest

from serving.core import spec_decode
from tests.helpers import GOLDEN
from tests.mtp_checkpoint import make_mimic_checkpoint
from xds_jax import LLM, SamplingParams
from xds_jax.errors import SamplingParamsError
from xds_jax.sampling.sampler import SamplerFlags, make_batch, sample
from xds_jax.sampling.structured import GrammarState, StructuredOutputs
from xds_jax.sequence import Sequence
from xds_jax.text.byte_tokenizer import byte_tokenizer

# Bounded everywhere: a random model would write digits or characters until max_tokens.
SCHEMA = {"type": "object",
          "properties": {"count": {"type": "integer", "minimum": -5, "maximum": 999},
                         "ok": {"type": "boolean"}, "kind": {"enum": ["red", "green"]},
                         "name": {"type": "string", "maxLength": 6},
                         "tags": {"type": "array", "items": {"enum": [1, 2, 3]},
                                  "maxItems": 3}},
          "required": ["count", "ok", "kind", "name"], "additionalProperties": False}


def with_bytes(llm: LLM) -> LLM:
    """The tiny golden model speaks bytes: one token per UTF-8 byte."""
    llm.tokenizer = byte_tokenizer(llm.cfg)
    return llm


@pytest.fixture(scope="module")
def tiny_llm():
    return with_bytes(LLM(str(GOLDEN / "llama"), dtype="float32", use_param_cache=False,
                          max_num_seqs=8))


def assert_schema(text: str) -> None:
    value = json.loads(text)
    assert set(value) >= {"count", "ok", "kind", "name"}
    assert set(value) <= set(SCHEMA["properties"])
    assert type(value["count"]) is int and -5 <= value["count"] <= 999
    assert isinstance(value["ok"], bool) and value["kind"] in ("red", "green")
    assert isinstance(value["name"], str) and len(value["name"]) <= 6
    assert all(t in (1, 2, 3) for t in value.get("tags", [])) and len(value.get("tags", [])) <= 3
    return True


def test_exactly_one_constraint_and_clear_errors():
    assert SamplingParams(structured_outputs={"regex": "a+"}).structured_outputs == \
        StructuredOutputs(regex="a+")
    for bad, match in (({}, "exactly one"), ({"regex": "a", "choice": ["b"]}, "exactly one"),
                       ({"choice": []}, "choice"), ({"json": 3}, "json"),
                       ({"regex": "a", "x": 1}, "unknown fields"), ("a+", "object")):
        with pytest.raises(SamplingParamsError, match=match):
            SamplingParams(structured_outputs=bad)


def test_mask_follows_the_grammar():
    tok = byte_tokenizer(LLM(str(GOLDEN / "llama"), dtype="float32",
                             use_param_cache=False).cfg)
    ids = {c: tok.encode(c, add_special_tokens=False)[0] for c in "abc"}
    state = GrammarState(StructuredOutputs(regex="ab?c"), tok)
    vocab = tok.vocab_size + 7  # the model's rows past the tokenizer are never allowed
    mask = state.allowed(vocab)
    assert mask.shape == (vocab,) and np.flatnonzero(mask).tolist() == [ids["a"]]
    state.consume(ids["a"])
    assert sorted(np.flatnonzero(state.allowed(vocab))) == sorted([ids["b"], ids["c"]])
    state.consume(ids["c"])
    assert state.stopped and state.error is None


def test_sampler_draws_only_allowed_ids_and_grammar_beats_min_tokens():
    vocab = 16
    logits = np.zeros((2, vocab), np.float32)
    logits[:, 3] = 50.0  # the model's favourite, which the grammar forbids
    allowed = np.zeros((2, vocab), bool)
    allowed[0, [5, 9]] = True
    allowed[1, [2]] = True  # only EOS (id 2) left, which min_tokens bans: the grammar wins
    params = [SamplingParams(temperature=1.0, seed=1)] * 2
    flags = SamplerFlags(random=True)
    for seed in range(20):
        batch = make_batch(params, [seed] * 2, [0, 0], [[]] * 2, [[]] * 2, [[], [2]], vocab,
                           flags, list(allowed))
        tokens = np.asarray(sample(logits, batch, flags)[0])
        assert tokens[0] in (5, 9) and tokens[1] == 2


# A random model fills JSON's optional whitespace forever: its JSON runs without it.
@pytest.mark.parametrize("so, check", [
    ({"json": SCHEMA, "disable_any_whitespace": True}, assert_schema),
    ({"regex": "[0-9]{3}-[0-9]{4}"}, lambda t: re.fullmatch("[0-9]{3}-[0-9]{4}", t)),
    ({"choice": ["alpha", "beta", "gamma"]}, lambda t: t in ("alpha", "beta", "gamma")),
    ({"grammar": 'root ::= "x" ("y" | "z")+ "."'}, lambda t: re.fullmatch(r"x[yz]+\.", t)),
])
def test_random_model_output_matches_constraint(tiny_llm, so, check):
    params = [SamplingParams(temperature=t, seed=s, n=n, max_tokens=120, structured_outputs=so)
              for t, s, n in ((0, None, 1), (1.0, 3, 2), (0.8, 7, 1))]
    outs = tiny_llm.generate([{"prompt_token_ids": [5, 6, 7, 8]}] * 3, params)
    texts = [o.text for r in outs for o in r.outputs]
    assert len(texts) == 4
    for r in outs:
        for o in r.outputs:
            assert o.finish_reason == "stop", (so, o.text)
            assert check(o.text), (so, o.text)
    assert tiny_llm.engine.stats()["kv_usage"] == 0


@pytest.mark.slow
def test_smollm2_chat_json_schema():
    """SmolLM2-135M rambles in free JSON (it does without a constraint too); a closed schema
    makes it answer in the shape asked."""
    try:
        llm = LLM("smollm2", dtype="bfloat16", max_num_seqs=2)
    except FileNotFoundError as error:
        pytest.skip(str(error))
    chat = [[{"role": "user", "content": "Give Paris's name and population as JSON."}]]
    # bounded: on AVX2-only CPUs (no AVX-512) the bfloat16 numbers differ a little, and there
    # the model wrote population digits until max_tokens cut the JSON
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                               "population": {"type": "integer", "minimum": 0,
                                                              "maximum": 99999999}},
              "required": ["city", "population"], "additionalProperties": False}
    out = llm.chat(chat, SamplingParams(temperature=0, max_tokens=100,
                                        structured_outputs={"json": schema}))[0].outputs[0]
    value = json.loads(out.text)
    assert isinstance(value["city"], str) and type(value["population"]) is int
    assert out.finish_reason == "stop"


def test_reference_engine_and_stop_strings_keep_the_constraint():
    llm = with_bytes(LLM(str(GOLDEN / "llama"), dtype="float32", use_param_cache=False,
                         engine="reference"))
    out = llm.generate([{"prompt_token_ids": [9, 9, 4]}],
                       SamplingParams(temperature=0, max_tokens=150,
                                      structured_outputs={"json": SCHEMA,
                                                          "disable_any_whitespace": True})
                       )[0].outputs[0]
    assert_schema(out.text)
    out = llm.generate([{"prompt_token_ids": [9, 9, 4]}], SamplingParams(
        temperature=0, max_tokens=40, stop=["-"],
        structured_outputs={"regex": "[0-9]{3}-[0-9]{4}"}))[0].outputs[0]
    assert re.fullmatch("[0-9]{3}", out.text) and out.stop_reason == "-"


def test_invalid_constraints_fail_before_running(tiny_llm):
    for so, match in (({"json": {"type": "nonsense"}}, "structured_outputs.json"),
                      ({"regex": "(("}, "structured_outputs.regex"),
                      ({"grammar": "root ::= ("}, "structured_outputs.grammar")):
        with pytest.raises(SamplingParamsError, match=match):
            tiny_llm.generate(["hi"], SamplingParams(max_tokens=4, structured_outputs=so))
    assert tiny_llm.engine.stats()["num_running"] == 0


def test_sequence_pickles_and_rebuilds_its_grammar(tiny_llm):
    params = SamplingParams(temperature=0, structured_outputs={"regex": "ab?c"})
    seq = Sequence([5, 6], params, tokenizer=tiny_llm.tokenizer)
    a = tiny_llm.tokenizer.encode("a", add_special_tokens=False)[0]
    seq.allowed_mask(300)
    seq.append(a)
    moved = pickle.loads(pickle.dumps(seq))
    assert (moved.allowed_mask(300) == seq.allowed_mask(300)).all()
    c = tiny_llm.tokenizer.encode("c", add_special_tokens=False)[0]
    moved.append(c)
    assert moved.finish_reason == "stop" and moved.output_ids == [a, c]


def test_speculative_engine_decodes_constrained_rows_one_token_a_step(tmp_path, monkeypatch):
    monkeypatch.setattr(spec_decode, "DISABLE_BY_BATCH_SIZE", 64)
    llm = with_bytes(LLM(str(make_mimic_checkpoint(tmp_path)), dtype="float32",
                         use_param_cache=False, max_num_seqs=4,
                         speculative_config={"method": "mtp", "num_speculative_tokens": 2}))
    outs = llm.generate([{"prompt_token_ids": [5, 6, 7]}] * 2, [
        SamplingParams(temperature=0, max_tokens=150, structured_outputs={
            "json": SCHEMA, "disable_any_whitespace": True}),
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)])
    assert_schema(outs[0].outputs[0].text)
    assert len(outs[1].outputs[0].token_ids) == 20


@pytest.mark.parametrize("layout", [
    "configs/deployments/cpu8-pd.yaml",
    pytest.param("configs/deployments/cpu16-ma.yaml", marks=pytest.mark.mesh16)])
def test_disaggregated_layouts_keep_the_constraint(layout):
    """PD: the prefill group draws the first token under the mask and the sequence carries its
    grammar to the decode group; MA: the attention ranks sample under it. Greedy output equals
    the colocated engine's."""
    model = str(GOLDEN / "deepseek_v3")
    params = [SamplingParams(temperature=0, max_tokens=150, structured_outputs={
        "json": SCHEMA, "disable_any_whitespace": True}),
        SamplingParams(temperature=0.9, seed=5, max_tokens=40,
                       structured_outputs={"regex": "[0-9]{3}-[0-9]{4}"})]
    prompts = [{"prompt_token_ids": [5, 6, 7]}, {"prompt_token_ids": [8, 9]}]
    alone = with_bytes(LLM(model, dtype="float32", use_param_cache=False))
    llm = with_bytes(LLM(model, dtype="float32", use_param_cache=False, deployment=layout))
    ref, got = alone.generate(prompts, params), llm.generate(prompts, params)
    assert_schema(got[0].outputs[0].text)
    assert re.fullmatch("[0-9]{3}-[0-9]{4}", got[1].outputs[0].text)
    assert [r.outputs[0].token_ids for r in got] == [r.outputs[0].token_ids for r in ref]
