"""vLLM's ``allowed_token_ids`` and ``bad_words`` against a step-by-step reference.

The reference greedy loop runs ``xds_jax.model.reference`` logits over the whole sequence each
step and takes the argmax over what the rule leaves: only the allowed ids; not a bad word's
last token when the output ends with the word's other tokens.
"""

import numpy as np
import pytest

from tests.helpers import GOLDEN
from xds_jax import LLM, SamplingParams
from xds_jax.errors import SamplingParamsError
from xds_jax.model.reference import reference_logits
from xds_jax.sequence import Sequence, bad_word_ids
from xds_jax.text.byte_tokenizer import byte_tokenizer

PROMPT = [40, 41, 3, 3, 90, 12, 200, 7]


@pytest.fixture(scope="module")
def llm():
    llm = LLM(str(GOLDEN / "llama"), dtype="float32")
    llm.tokenizer = byte_tokenizer(llm.cfg)
    return llm


def reference_greedy(llm, prompt, steps, allowed=None, bad=()):
    out = []
    for _ in range(steps):
        logits = np.asarray(reference_logits(llm.params, llm.cfg, np.asarray(prompt + out)))[-1]
        if allowed is not None:
            keep = np.full(logits.shape, -np.inf)
            keep[allowed] = 0
            logits = logits + keep
        for word in bad:
            if len(word) == 1 or out[len(out) - len(word) + 1:] == word[:-1]:
                logits[word[-1]] = -np.inf
        out.append(int(np.argmax(logits)))
    return out


def generate(llm, **params):
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, **params)
    return llm.generate({"prompt_token_ids": PROMPT}, sp)[0].outputs[0].token_ids


def test_allowed_token_ids_greedy_equals_the_restricted_argmax(llm):
    allowed = [5, 17, 64, 90, 200]
    got = generate(llm, allowed_token_ids=allowed)
    assert got == reference_greedy(llm, PROMPT, 12, allowed=allowed)
    assert got != generate(llm)  # the restriction changed the output
    sampled = llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(
        temperature=1.5, seed=3, max_tokens=24, ignore_eos=True, allowed_token_ids=allowed))
    assert set(sampled[0].outputs[0].token_ids) <= set(allowed)


def test_bad_words_ban_the_word_s_last_token_after_its_first(llm):
    letters = llm.tokenizer.encode("abcdefghijklmnopqrstuvwxyz", add_special_tokens=False)
    free = generate(llm, allowed_token_ids=letters)  # text, so that words can name it
    # A two-letter word the output contains: its second letter is banned right after its
    # first, which stays allowed.
    word = llm.tokenizer.decode(free[2:4])
    ids = bad_word_ids([word], llm.tokenizer)
    assert ids == [free[2:4]]
    got = generate(llm, allowed_token_ids=letters, bad_words=[word])
    assert got == reference_greedy(llm, PROMPT, 12, allowed=letters, bad=ids)
    assert got[:3] == free[:3] and got[3] != free[3]
    assert all(got[i:i + 2] != free[2:4] for i in range(len(got) - 1))


def test_bad_word_tokenization_adds_the_spaced_form_when_it_is_another_token():
    class Words:  # a word-level tokenizer: " cat" is one token of its own
        vocab = {"cat": [7], " cat": [8], "big cat": [3, 8], " big cat": [9, 8]}

        def encode(self, text, add_special_tokens=True):
            return self.vocab[text]

    assert bad_word_ids(["cat", " big cat"], Words()) == [[7], [8], [3, 8], [9, 8]]
    seq = Sequence([1], SamplingParams(bad_words=["big cat"]), tokenizer=Words())
    assert seq.allowed_mask(10).all()  # no output yet: only one-token words are banned
    seq.output_ids = [3]
    assert not seq.allowed_mask(10)[8] and seq.allowed_mask(10).sum() == 9


def test_bad_inputs_are_named(llm):
    with pytest.raises(SamplingParamsError, match="allowed_token_ids must be a non-empty"):
        SamplingParams(allowed_token_ids=[])
    with pytest.raises(SamplingParamsError, match=r"allowed_token_ids \[999\] are outside"):
        generate(llm, allowed_token_ids=[3, 999])
    with pytest.raises(SamplingParamsError, match="bad_words must be non-blank"):
        SamplingParams(bad_words=["ok", " "])
    plain = LLM(str(GOLDEN / "llama"), dtype="float32")  # no tokenizer
    with pytest.raises(SamplingParamsError, match="bad_words need a tokenizer"):
        plain.generate({"prompt_token_ids": PROMPT}, SamplingParams(bad_words=["x"]))
