"""Host-side state of one generated sequence: tokens, text, logprobs and when to stop.

Shared by the single-device loop and the FlowServe engine, so both stop, detokenize and report
in exactly the same way. No JAX here.
"""

from __future__ import annotations

import itertools
import time

import numpy as np

from xds_jax.errors import SamplingParamsError
from xds_jax.outputs import CompletionOutput, Logprob
from xds_jax.sampling.params import SamplingParams, device_seed
from xds_jax.text.detokenizer import IncrementalDetokenizer
from xds_jax.text.stop_strings import first_stop, held_back_length

_ids = itertools.count()


def salt_bytes(cache_salt: str | None) -> bytes:
    """vLLM's ``cache_salt`` (None, or a non-empty string) as the block manager's salt."""
    if cache_salt is None:
        return b""
    if not isinstance(cache_salt, str) or not cache_salt:
        raise SamplingParamsError(f"cache_salt must be a non-empty string, got {cache_salt!r}")
    return cache_salt.encode("utf-8", "surrogatepass")


class Sequence:
    """One sample of one request: prompt ids in, output ids and text out."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, *, index: int = 0,
                 seed: int | None = None, tokenizer=None, eos_token_ids=(),
                 max_model_len: int | None = None, priority: int = 0,
                 cache_salt: str | None = None):
        self.seq_id = next(_ids)
        self.index = index
        self.fork_of: Sequence | None = None  # an n > 1 request's first sample, for the others
        self.priority = priority  # the priority scheduling policy's order: lower first
        self.cache_salt = cache_salt
        self.salt = salt_bytes(cache_salt)  # KV blocks shared only with the same salt
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.seed = device_seed(params.request_seed() if seed is None else seed)
        self.output_ids: list[int] = []
        self.logprobs: list[dict[int, Logprob]] | None = [] if params.logprobs is not None else None
        self.cumulative_logprob = 0.0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.error: str | None = None  # why the engine failed it (finish reason "abort")
        self.failure: Exception | None = None  # the exception behind ``error``
        self.first_token_time: float | None = None  # time.monotonic() of the first output
        self.num_cached_tokens: int | None = None  # prompt tokens found in the prefix cache
        self.first_scheduled_time: float | None = None  # its first admission to a step
        self.last_token_time: float | None = None
        self._tokenizer = tokenizer
        self._bad_words: list[list[int]] | None = None
        self._allowed_only = None  # allowed_token_ids as a [V] mask (allowed_mask)
        self._detok = (IncrementalDetokenizer(tokenizer, params.skip_special_tokens)
                       if tokenizer is not None and params.detokenize else None)
        self._grammar = None  # its GrammarState, built at the first mask (structured outputs)
        self._eos = frozenset(() if params.ignore_eos else eos_token_ids)
        # min_tokens bans EOS even under ignore_eos, as vLLM's min-tokens processor does
        self._ban_early = frozenset(eos_token_ids) | frozenset(params.stop_token_ids)
        self._stop_ids = frozenset(params.stop_token_ids)
        self._text_cut: int | None = None
        self._sent = 0
        self._checked = 0
        limit = params.max_tokens
        if max_model_len is not None:
            room = max_model_len - len(self.prompt_ids)
            limit = room if limit is None else min(limit, room)
        self.max_tokens = limit
        if limit == 0:  # nothing to generate: the request only scores its prompt
            self.finish_reason = "length"

    # -- what the sampler needs -------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def ids_between(self, start: int, stop: int) -> list[int]:
        """``all_ids[start:stop]`` without building ``all_ids`` (a step reads a token or a
        chunk of a long sequence)."""
        n = len(self.prompt_ids)
        if stop <= n:
            return self.prompt_ids[start:stop]
        if start >= n:
            return self.output_ids[start - n:stop - n]
        return self.prompt_ids[start:] + self.output_ids[:stop - n]

    def token_view(self, pad: int = 0) -> TokenView:
        """Its tokens to slice without building ``all_ids`` (the block manager reads a count,
        or a new block's tokens to hash), followed by ``pad`` placeholder ids (-1)."""
        return TokenView(self, pad)

    def banned_ids(self, in_flight: int = 0) -> list[int]:
        """Ids that may not be sampled yet: EOS (with ``ignore_eos`` too, as vLLM) and stop
        ids before ``min_tokens`` (``in_flight``: sampled tokens not appended yet, which
        count)."""
        if len(self.output_ids) + in_flight >= self.params.min_tokens:
            return []
        return sorted(self._ban_early)

    def allowed_mask(self, vocab_size: int):
        """``[vocab_size]`` bool numpy mask of the ids it may draw next (``params.masked``):
        its grammar's (``structured_outputs``), within ``allowed_token_ids``, and not the last
        token of a ``bad_words`` entry whose other tokens the output ends with (vLLM)."""
        p = self.params
        mask = (self._grammar_state().allowed(vocab_size) if p.structured_outputs is not None
                else np.ones(vocab_size, bool))
        if p.allowed_token_ids is not None:
            if self._allowed_only is None or self._allowed_only.shape[0] != vocab_size:
                self._allowed_only = np.zeros(vocab_size, bool)  # built once, read each step
                self._allowed_only[[t for t in p.allowed_token_ids if t < vocab_size]] = True
            mask &= self._allowed_only
        out = self.output_ids
        for word in self._bad_word_ids():
            ends_with = len(word) == 1 or out[max(0, len(out) - len(word) + 1):] == word[:-1]
            if ends_with and word[-1] < vocab_size:
                mask[word[-1]] = False
        return mask

    def _bad_word_ids(self) -> list[list[int]]:
        """``bad_words`` as token ids, each word alone and after a space where that is a
        different first token of the same length (as vLLM tokenizes them)."""
        if self._bad_words is None:
            self._bad_words = bad_word_ids(self.params.bad_words, self._tokenizer)
        return self._bad_words

    def _grammar_state(self):
        if self._grammar is None:
            from xds_jax.sampling.structured import GrammarState

            self._grammar = GrammarState(self.params.structured_outputs, self._tokenizer)
            for token in self.output_ids:  # a sequence that resumes elsewhere
                self._grammar.consume(token)
        return self._grammar

    def __getstate__(self) -> dict:
        """Pickled without its grammar state (a native matcher): rebuilt from the outputs."""
        return self.__dict__ | {"_grammar": None}

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    # -- advancing ----------------------------------------------------------------------------
    def append(self, token: int, logprob: float | None = None, rank: int | None = None,
               top: list[tuple[int, float]] | None = None) -> None:
        """Record a sampled token and decide whether the sequence is finished."""
        self.output_ids.append(token)
        self.last_token_time = time.monotonic()
        if self.first_token_time is None:
            self.first_token_time = self.last_token_time
        if logprob is not None:
            self.cumulative_logprob += logprob
        if self.logprobs is not None:
            # a batch returns its widest request's top-N: keep this request's own
            top = top[:self.params.logprobs]
            entry = {tid: Logprob(lp, r + 1, self._piece(tid)) for r, (tid, lp) in enumerate(top)}
            if token not in entry:
                entry[token] = Logprob(logprob, rank, self._piece(token))
            self.logprobs.append(entry)
        if token in self._eos or token in self._stop_ids:
            if len(self.output_ids) > self.params.min_tokens or token in self._stop_ids:
                self.finish_reason = "stop"
                self.stop_reason = token if token in self._stop_ids else None
                self._cut_stop_token()
                return
        if self._check_stop_strings():
            return
        if self.params.structured_outputs is not None and self._grammar_done(token):
            return
        if self.max_tokens is not None and len(self.output_ids) >= self.max_tokens:
            self.finish_reason = "length"

    def _grammar_done(self, token: int) -> bool:
        """Advance the grammar over ``token``; True when the sequence ends there: the grammar
        is complete (only EOS could follow) or refused the token (it was drawn unmasked)."""
        if self._grammar is None:
            grammar = self._grammar_state()  # built over the outputs, this token included
        else:
            grammar = self._grammar
            grammar.consume(token)
        if grammar.error is not None:
            text = f"structured_outputs: {grammar.error}"
            if self.params.allowed_token_ids is not None:
                text = ("allowed_token_ids: no allowed id is one the output's grammar accepts "
                        f"next ({text})")
            self.fail(SamplingParamsError(text), text)
        elif grammar.stopped:
            self.finish_reason = "stop"
        return self.finished

    def _cut_stop_token(self) -> None:
        """The text ends before the EOS or stop id that ended the sequence unless
        ``include_stop_str_in_output`` (vLLM: its text, ``</s>`` with special tokens kept, or
        a plain token given as a stop id, is not part of the reply). The id stays an output."""
        if self._detok is None or self.params.include_stop_str_in_output:
            return
        seen = len(self._detok.output_ids)
        if seen < len(self.output_ids) - 1:
            self._detok.add(self.output_ids[seen:-1])
        self._text_cut = len(self._detok.text)

    def abort(self) -> None:
        if not self.finished:
            self.finish_reason = "abort"

    def fail(self, error: Exception, text: str | None = None) -> None:
        """End failed (finish reason "abort"): ``error`` is kept as ``failure``, ``text`` (by
        default ``failure_text``) as ``error``; a first failure is kept."""
        if self.error is None:
            self.error = text or failure_text(error)
            self.failure = error
        self.abort()

    def _check_stop_strings(self) -> bool:
        stops = self.params.stop
        if not stops or self._detok is None:
            return False
        text = self._decoded_text()
        # A new match must end in the text added since the last check.
        start = max(0, self._checked - max(len(s) for s in stops) + 1)
        self._checked = len(text)
        if len(self.output_ids) <= self.params.min_tokens:
            return False  # as EOS, and as vLLM: only past min_tokens, in the text added since
        match = first_stop(text, stops, search_from=start)
        if match is None:
            return False
        self._text_cut = match.end if self.params.include_stop_str_in_output else match.start
        self.finish_reason = "stop"
        self.stop_reason = match.stop
        return True

    def _decoded_text(self) -> str:
        """The detokenizer's text after it takes the output ids it has not seen, in one go:
        without stop strings nothing reads the text between steps unless asked (a stream, the
        end), so appending a token does not decode it."""
        seen = len(self._detok.output_ids)
        if seen < len(self.output_ids):
            self._detok.add(self.output_ids[seen:])
        return self._detok.text

    def _piece(self, token: int) -> str | None:
        if self._tokenizer is None or not self.params.detokenize:
            return None
        return self._tokenizer.decode([token], False)

    # -- reporting ----------------------------------------------------------------------------
    @property
    def text(self) -> str:
        if self._detok is None:
            return ""
        text = self._decoded_text()
        if self.finished:
            text += self._detok.finish()
        return text if self._text_cut is None else text[: self._text_cut]

    def new_text(self) -> str:
        """Text not yet handed out, holding back a tail that may still become a stop string."""
        text = self.text
        end = len(text) if self.finished else len(text) - held_back_length(text, self.params.stop)
        delta = text[self._sent:end] if end > self._sent else ""
        self._sent = max(self._sent, end)
        return delta

    def output(self) -> CompletionOutput:
        return CompletionOutput(
            index=self.index,
            text=self.text,
            token_ids=list(self.output_ids),
            cumulative_logprob=self.cumulative_logprob if self.logprobs is not None else None,
            logprobs=self.logprobs,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
        )


def bad_word_ids(words: list[str], tokenizer) -> list[list[int]]:
    """vLLM's tokenization of ``bad_words``: each word's ids without special tokens, and again
    with a leading space when that starts with another token and has as many tokens."""
    if words and tokenizer is None:
        raise SamplingParamsError("bad_words need a tokenizer; this model has none")
    out: list[list[int]] = []
    for word in words:
        plain = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        out.append(plain)
        if spaced and spaced[0] != plain[0] and len(spaced) == len(plain):
            out.append(spaced)
    return out


def failure_text(error: Exception) -> str:
    """How a failure reads in ``RequestOutput.error``: its class and message."""
    return f"{type(error).__name__}: {error}"


def samples_outcome(seqs: list[Sequence]) -> dict:
    """The ``RequestOutput`` fields a request's samples give together: the first failed
    one's ``error`` and ``failure``, and the prompt tokens the prefix cache held at the first
    admission (``num_cached_tokens``)."""
    failed = next((s for s in seqs if s.error), None)
    return {"error": failed and failed.error, "failure": failed and failed.failure,
            "num_cached_tokens": next((s.num_cached_tokens for s in seqs
                                       if s.num_cached_tokens is not None), None)}


class TokenView:
    """A sequence's tokens then ``pad`` placeholders (-1: tokens sampled but not appended
    yet), read in place: ``len`` and contiguous slices (``Sequence.token_view``)."""

    __slots__ = ("_seq", "_pad")

    def __init__(self, seq: Sequence, pad: int = 0):
        self._seq, self._pad = seq, pad

    def __len__(self) -> int:
        return self._seq.num_tokens + self._pad

    def __getitem__(self, key: slice) -> list[int]:
        if not isinstance(key, slice):
            raise TypeError("a TokenView is read by slices")
        start, stop, step = key.indices(len(self))
        if step != 1:
            raise ValueError("a TokenView is read by contiguous slices")
        n = self._seq.num_tokens
        known = self._seq.ids_between(start, min(stop, n)) if start < n else []
        return known + [-1] * max(0, stop - max(start, n))
