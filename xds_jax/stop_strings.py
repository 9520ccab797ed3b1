"""Stop strings: cut generated text at the first stop string, also while streaming.

Generation stops as soon as any stop string has appeared, so the match that ends first wins
(ties go to the longer one, which starts earlier); the text is cut before it, or after it when
the stop string is kept (vLLM's `include_stop_str_in_output`). Feeding text in any chunking gives
the same cut as `find_stop` on the whole text.
"""

from collections.abc import Sequence


class StopStringError(ValueError):
    """A stop string is unusable (empty)."""


def find_stop(
    text: str, stops: Sequence[str], include_stop: bool, search_from: int = 0
) -> int | None:
    """Where to cut `text` for the first stop string in it.

    Args:
        text: Generated text.
        stops: Stop strings; none may be empty.
        include_stop: Cut after the stop string instead of before it.
        search_from: Ignore matches that start before this character index.

    Returns:
        The length of the text to keep, or None when no stop string occurs.

    Raises:
        StopStringError: A stop string is empty.
    """
    best: tuple[int, int] | None = None  # (end, start) of the match that completes first
    for stop in stops:
        if not stop:
            raise StopStringError("stop strings must not be empty")
        start = text.find(stop, search_from)
        if start >= 0 and (best is None or (start + len(stop), start) < best):
            best = (start + len(stop), start)
    if best is None:
        return None
    return best[0] if include_stop else best[1]


def held_back_length(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of some stop string.

    While streaming, those characters may still turn into a stop string, so they cannot be sent.
    """
    longest = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:length]):
                longest = length
                break
    return longest


class StopStringStream:
    """Applies stop strings to streamed text deltas.

    Attributes:
        text: Text seen so far, cut at the stop string once one matched.
        stopped: Whether a stop string has matched.
    """

    def __init__(self, stops: Sequence[str], include_stop: bool) -> None:
        """Watch for `stops`; keep the matched stop string in the text if `include_stop`.

        Raises:
            StopStringError: A stop string is empty.
        """
        if any(not stop for stop in stops):
            raise StopStringError("stop strings must not be empty")
        self._stops = tuple(stops)
        self._include_stop = include_stop
        self._longest = max((len(stop) for stop in stops), default=0)
        self._sent = 0
        self.text = ""
        self.stopped = False

    def add(self, delta: str) -> str:
        """Take the next text delta; return the text that is now safe to send.

        Once a stop string matched, the text is cut there and later deltas are ignored.
        Without `include_stop`, a tail that could still grow into a stop string is held back.
        """
        if self.stopped:
            return ""
        searched = len(self.text)
        self.text += delta
        # A match must end inside `delta`; earlier ones were found by earlier calls.
        cut = find_stop(
            self.text,
            self._stops,
            self._include_stop,
            search_from=max(searched - self._longest + 1, 0),
        )
        if cut is not None:
            self.stopped = True
            self.text = self.text[:cut]
            return self._send(len(self.text))
        held = 0 if self._include_stop else held_back_length(self.text, self._stops)
        return self._send(len(self.text) - held)

    def finish(self) -> str:
        """Release the held-back tail when generation ends without a stop string."""
        return self._send(len(self.text))

    def _send(self, end: int) -> str:
        chunk = self.text[self._sent : end] if end > self._sent else ""
        self._sent = max(self._sent, end)
        return chunk
