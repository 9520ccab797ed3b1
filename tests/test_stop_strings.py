"""Stop strings: cut positions, the first-to-complete rule, and streaming with held-back text."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xds_jax.text.stop_strings import (
    StopMatch,
    StopStringError,
    find_stop,
    first_stop,
    held_back_length,
)


@pytest.mark.parametrize(
    "text, stops, excluded, included",
    [
        ("Hello world", ["wor"], 6, 9),
        ("Hello world", ["xyz", "o"], 4, 5),
        ("Hello world", ["xyz"], None, None),
        ("", ["a"], None, None),
        ("Hello world", [], None, None),
        ("world", ["world"], 0, 5),
        # "bc" is complete before "abcd" is, so generation would have stopped there.
        ("xabcd", ["abcd", "bc"], 2, 4),
        # Both end together: the longer one, starting earlier, wins.
        ("abcd", ["cd", "bcd"], 1, 4),
        ("a\nUser: b\nUser: c", ["\nUser:"], 1, 7),
    ],
)
def test_find_stop(text, stops, excluded, included):
    assert find_stop(text, stops, include_stop=False) == excluded
    assert find_stop(text, stops, include_stop=True) == included


def test_first_stop_names_the_match_and_honours_search_from():
    assert first_stop("x STOP y STOP", ["STOP", "y"]) == StopMatch(2, 6, "STOP")
    assert first_stop("x STOP y STOP", ["STOP", "y"], search_from=3) == StopMatch(7, 8, "y")
    assert find_stop("x STOP y STOP", ["STOP"], False, search_from=3) == 9


def test_empty_stop_string_raises():
    with pytest.raises(StopStringError, match="must not be empty"):
        find_stop("text", ["ok", ""], include_stop=False)


@pytest.mark.parametrize(
    "text, stops, held",
    [
        ("Hello ST", ["STOP"], 2),
        ("Hello", ["STOP"], 0),
        ("abcab", ["abcabd"], 5),
        ("xS", ["STOP", "SX"], 1),
        ("aaa", ["aaaa", "ab"], 3),
        ("", ["STOP"], 0),
        ("Hello", [], 0),
    ],
)
def test_held_back_length(text, stops, held):
    assert held_back_length(text, stops) == held


def _stream(chunks: list[str], stops: list[str], include_stop: bool) -> tuple[list[str], str]:
    """Stream chunks as an engine does: check new text only, hold back a possible stop start."""
    text, sent, checked, pieces = "", 0, 0, []
    longest = max(map(len, stops))
    for chunk in chunks:
        text += chunk
        cut = find_stop(text, stops, include_stop, search_from=max(checked - longest + 1, 0))
        checked = len(text)
        if cut is not None:
            pieces.append(text[sent:cut])
            return pieces, text[:cut]
        end = len(text) if include_stop else len(text) - held_back_length(text, stops)
        assert end >= sent
        pieces.append(text[sent:end])
        sent = end
    pieces.append(text[sent:])  # generation ended without a stop: release what was held
    return pieces, text


@settings(max_examples=500, deadline=None)
@given(
    text=st.text(alphabet="ab c", max_size=30),
    stops=st.lists(st.text(alphabet="ab c", min_size=1, max_size=4), min_size=1, max_size=3),
    cuts=st.lists(st.integers(0, 30), max_size=10),
    include_stop=st.booleans(),
)
def test_streaming_matches_whole_text(text, stops, cuts, include_stop):
    bounds = sorted({0, len(text), *(cut for cut in cuts if cut <= len(text))})
    chunks = [text[start:end] for start, end in zip(bounds, bounds[1:], strict=False)]
    pieces, final = _stream(chunks, stops, include_stop)
    cut = find_stop(text, stops, include_stop)
    expected = text if cut is None else text[:cut]
    assert final == expected and "".join(pieces) == expected
    streamed = ""
    for piece in pieces:
        streamed += piece
        assert expected.startswith(streamed)
    if not include_stop:
        assert all(stop not in expected for stop in stops)
