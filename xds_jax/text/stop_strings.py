"""Stop strings: where to cut generated text, and what to hold back while streaming.

Generation stops as soon as any stop string has appeared, so the match that ends first wins
(ties go to the longer one, which starts earlier). The text is cut before the match, or after it
when the stop string is kept (vLLM's `include_stop_str_in_output`). Checking after every delta
with `search_from` set past the text already checked finds the same match as checking the whole
text once.

While streaming without keeping stop strings, a tail of the text that is the beginning of a stop
string may still become one, so it is held back (`held_back_length`) until it cannot.
"""

from collections.abc import Sequence
from typing import NamedTuple


class StopStringError(ValueError):
    """A stop string is unusable (empty)."""


class StopMatch(NamedTuple):
    """A stop string found in text: `text[start:end] == stop`."""

    start: int
    end: int
    stop: str


def first_stop(text: str, stops: Sequence[str], search_from: int = 0) -> StopMatch | None:
    """The stop string occurrence that completes first in `text`.

    Args:
        text: Generated text.
        stops: Stop strings; none may be empty.
        search_from: Ignore occurrences that start before this character index.

    Raises:
        StopStringError: A stop string is empty.
    """
    best = None
    for stop in stops:
        if not stop:
            raise StopStringError("stop strings must not be empty")
        start = text.find(stop, search_from)
        if start >= 0 and (best is None or (start + len(stop), start) < (best.end, best.start)):
            best = StopMatch(start, start + len(stop), stop)
    return best


def find_stop(
    text: str, stops: Sequence[str], include_stop: bool, search_from: int = 0
) -> int | None:
    """Length to cut `text` to for its first stop string, or None when none occurs.

    Args:
        text: Generated text.
        stops: Stop strings; none may be empty.
        include_stop: Keep the stop string (cut after it) instead of cutting before it.
        search_from: Ignore occurrences that start before this character index.

    Raises:
        StopStringError: A stop string is empty.
    """
    match = first_stop(text, stops, search_from)
    if match is None:
        return None
    return match.end if include_stop else match.start


def held_back_length(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of some stop string.

    Those characters cannot be streamed yet when stop strings are cut from the output: the next
    tokens may complete a stop string. With `include_stop_str_in_output` nothing needs holding.
    """
    longest = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:length]):
                longest = length
                break
    return longest
