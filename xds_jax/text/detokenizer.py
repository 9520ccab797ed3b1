"""Streaming detokenization: turn generated ids into text deltas as they arrive.

Decoding one token at a time is wrong: a character may span several byte tokens, and
SentencePiece decoders change a token's text by its position. Like vLLM, `IncrementalDetokenizer`
decodes a short window `ids[prefix_offset:]` and emits what it adds over `ids[prefix_offset:
read_offset]`. It holds text back while the window ends in U+FFFD (an unfinished UTF-8 character),
so a delta never carries half a character; `finish` releases what is held at the end but an
unfinished last character, as vLLM's text never ends in one (output cut by `max_tokens` in the
middle of an emoji ends before it, not in U+FFFD).

SentencePiece byte fallback needs one more rule: its decoder turns a whole run of `<0xXX>` tokens
into U+FFFDs when the run is not valid UTF-8, so a later stray byte can spoil characters already
complete. Text is held back while the window ends in such a run, until another token closes it.

Unlike vLLM the window starts at the first output id rather than inside the prompt, so the deltas
add up to `tokenizer.decode(output_ids)` less a trailing U+FFFD (vLLM keeps a SentencePiece
leading space that `decode` strips).
"""

from collections.abc import Sequence

from xds_jax.text.tokenizer import Tokenizer

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Text of one sequence's generated ids, delta by delta.

    Attributes:
        text: All text emitted so far.
        output_ids: All ids added so far.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        """Start with no output.

        Args:
            tokenizer: The model's tokenizer.
            skip_special_tokens: Leave special tokens out of the text, as `decode` does.
        """
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self.output_ids: list[int] = []
        self.text = ""
        self._prefix_offset = 0
        self._read_offset = 0

    def add(self, token_ids: Sequence[int]) -> str:
        """Append generated ids and return the text they complete (possibly "")."""
        self.output_ids.extend(token_ids)
        return self._advance(final=False)

    def finish(self) -> str:
        """Return the text still held back once output ends, less an unfinished last character
        (trailing U+FFFD: its bytes never came)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        ids = self.output_ids
        if self._read_offset == len(ids):
            return ""
        prefix_text = self._decode(ids[self._prefix_offset : self._read_offset])
        window_text = self._decode(ids[self._prefix_offset :])
        if len(window_text) <= len(prefix_text) and not final:
            return ""
        if not final and (window_text.endswith(REPLACEMENT_CHAR) or self._in_byte_run()):
            return ""
        delta = window_text[len(prefix_text) :]
        if final:
            delta = delta.rstrip(REPLACEMENT_CHAR)
        self._prefix_offset, self._read_offset = self._read_offset, len(ids)
        self.text += delta
        return delta

    def _in_byte_run(self) -> bool:
        """Whether the last token that shows in the text is a byte-fallback token."""
        for token_id in reversed(self.output_ids[self._read_offset :]):
            if not (self._skip_special_tokens and self._tokenizer.is_special(token_id)):
                return token_id in self._tokenizer.byte_fallback_ids
        return False

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)
