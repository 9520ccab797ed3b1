"""Beam search as vLLM runs it: rounds of one-token requests over the live beams.

Each round every live beam of a prompt is submitted as a prompt of its own (the prompt and the
beam's tokens so far: the prefix cache serves all but its last page) for one token with the
``2 * beam_width`` most likely next tokens (``SamplingParams(max_tokens=1, logprobs=...)``).
Every (beam, next token) pair is a candidate: one ending in an end-of-sequence token is
finished and kept aside (unless ``ignore_eos``), the others are ranked by score and the best
``beam_width`` live on. After ``max_tokens`` rounds (or once no beam lives) the finished and
the live beams are ranked together and the best ``beam_width`` are the answer, best first.

A beam's score is vLLM's: its cumulative log-probability over ``len ** length_penalty``, where
``len`` counts the prompt and the generated tokens but not a final end-of-sequence token (so
``length_penalty`` > 1 favours longer beams, < 1 shorter ones). The log-probabilities are the
model's raw ones; ``temperature`` only picks the one extra sampled candidate each beam adds
(at 0 the argmax, already among the top ones), as in vLLM.

``LLM.beam_search`` drives the rounds over the whole engine (every layout), the server's
``use_beam_search`` over the asyncio engine (``serving.core.async_engine``).
"""

from __future__ import annotations

import dataclasses
import math

from xds_jax.errors import SamplingParamsError
from xds_jax.outputs import CompletionOutput, Logprob
from xds_jax.sampling.params import MAX_LOGPROBS, SamplingParams
from xds_jax.sequence import salt_bytes

MAX_BEAM_WIDTH = MAX_LOGPROBS // 2  # each round asks for 2 x beam_width log-probabilities


@dataclasses.dataclass(frozen=True)
class BeamSearchParams:
    """vLLM's ``BeamSearchParams``: ``beam_width`` beams (and answers), ``max_tokens`` rounds."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # alternatives reported per position (the server's logprobs)
    prompt_logprobs: int | None = None  # the prompt scored too (the server's echo, vLLM's)
    skip_special_tokens: bool = True  # in the answers' text

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> SamplingParamsError:
            return SamplingParamsError(f"{field} {why}, got {getattr(self, field)!r}")

        if not _is_int(self.beam_width) or not 1 <= self.beam_width <= MAX_BEAM_WIDTH:
            raise bad("beam_width", f"must be an integer in 1..{MAX_BEAM_WIDTH}")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise bad("max_tokens", "must be a positive integer")
        for name in ("temperature", "length_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or \
                    not math.isfinite(value):
                raise bad(name, "must be a finite number")
        if self.temperature < 0:
            raise bad("temperature", "must be non-negative")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 0 <= value <= MAX_LOGPROBS):
                raise bad(name, f"must be in 0..{MAX_LOGPROBS}")

    def round_params(self) -> SamplingParams:
        """One round's request: one token and the top ``2 * beam_width`` alternatives."""
        return SamplingParams(max_tokens=1, logprobs=2 * self.beam_width,
                              temperature=self.temperature, ignore_eos=True,
                              skip_special_tokens=False)


@dataclasses.dataclass
class Beam:
    """A generated continuation: its tokens, their log-probabilities (each step's top
    alternatives), their sum, and whether an end-of-sequence token ended it."""

    tokens: list[int]
    logprobs: list[dict[int, Logprob]]
    cum_logprob: float = 0.0
    finished: bool = False

    def score(self, prompt_len: int, length_penalty: float) -> float:
        length = prompt_len + len(self.tokens) - self.finished
        return self.cum_logprob / (max(length, 1) ** length_penalty)


class BeamSearch:
    """One prompt's beams through the rounds: ``live`` to extend, ``advance`` with each live
    beam's next-token log-probabilities, then ``best``."""

    def __init__(self, prompt_ids: list[int], params: BeamSearchParams, eos_ids):
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.eos_ids = frozenset(eos_ids or ())
        self.live = [Beam([], [])]
        self.finished: list[Beam] = []
        self.rounds = 0

    @property
    def done(self) -> bool:
        return not self.live or self.rounds >= self.params.max_tokens

    def round_prompts(self) -> list[list[int]]:
        """The token prompts of this round: the prompt and each live beam's tokens."""
        return [self.prompt_ids + beam.tokens for beam in self.live]

    def _key(self, beam: Beam) -> float:
        return beam.score(len(self.prompt_ids), self.params.length_penalty)

    def advance(self, next_logprobs: list[dict[int, Logprob]]) -> None:
        """Extend the live beams by their candidates (``next_logprobs[i]``: live beam ``i``'s
        next tokens); keep the best ``beam_width`` that did not end."""
        candidates = []
        for beam, options in zip(self.live, next_logprobs, strict=True):
            for token, lp in options.items():
                ended = token in self.eos_ids and not self.params.ignore_eos
                new = Beam(beam.tokens + [token], beam.logprobs + [options],
                           beam.cum_logprob + lp.logprob, ended)
                (self.finished if ended else candidates).append(new)
        candidates.sort(key=self._key, reverse=True)
        self.live = candidates[:self.params.beam_width]
        self.rounds += 1

    def best(self) -> list[Beam]:
        """The best ``beam_width`` beams, finished or not, best first."""
        return sorted(self.finished + self.live, key=self._key,
                      reverse=True)[:self.params.beam_width]

    def outputs(self, tokenizer, logprobs: int | None = None) -> list[CompletionOutput]:
        """The best beams as completions, best first: finish reason ``stop`` for an
        end-of-sequence token (its text left out unless ``include_stop_str_in_output``),
        ``length`` otherwise; with ``logprobs`` each position's chosen token and top
        ``logprobs`` alternatives."""
        out = []
        for i, beam in enumerate(self.best()):
            shown = beam.tokens
            if beam.finished and not self.params.include_stop_str_in_output:
                shown = beam.tokens[:-1]
            text = tokenizer.decode(shown, skip_special_tokens=self.params.skip_special_tokens) \
                if tokenizer else ""
            kept = None if logprobs is None else [
                top_logprobs(options, token, logprobs)
                for token, options in zip(beam.tokens, beam.logprobs, strict=True)]
            out.append(CompletionOutput(i, text, list(beam.tokens), beam.cum_logprob, kept,
                                        "stop" if beam.finished else "length"))
        return out


def top_logprobs(options: dict[int, Logprob], chosen: int, k: int) -> dict[int, Logprob]:
    """The chosen token's entry and the ``k`` best alternatives of one position."""
    ranked = sorted(options.items(), key=lambda item: -item[1].logprob)[:k]
    return {chosen: options[chosen], **dict(ranked)}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass
class BeamSearchSequence:
    """One answer of ``LLM.beam_search``, as vLLM's: ``tokens`` holds the prompt and the
    generated tokens, ``text`` their decoded text (special tokens skipped), ``logprobs`` each
    generated position's alternatives."""

    tokens: list[int]
    logprobs: list[dict[int, Logprob]]
    cum_logprob: float
    text: str | None
    finish_reason: str
    stop_reason: int | None = None


@dataclasses.dataclass
class BeamSearchOutput:
    """The best ``beam_width`` sequences of one prompt, best first."""

    sequences: list[BeamSearchSequence]


def run_beam_search(llm, prompts, params: BeamSearchParams) -> list[BeamSearchOutput]:
    """``LLM.beam_search``: the rounds of every prompt's live beams, batched together through
    ``llm.generate`` (any engine layout), each round of a prompt under its ``cache_salt``."""
    if isinstance(prompts, str | dict):
        prompts = [prompts]
    if params.prompt_logprobs is not None:
        raise SamplingParamsError("prompt_logprobs is the server's (echo); offline, score a "
                                  "prompt with LLM.generate(SamplingParams(prompt_logprobs=k))")
    eos = llm.eos_token_ids
    searches, salted = [], []  # salted: (search, its rounds' prompt dict fields)
    for prompt in prompts:
        _, ids = llm.prompt_ids_of(prompt)
        llm.check_prompt(ids, SamplingParams(max_tokens=params.max_tokens))
        searches.append(BeamSearch(ids, params, eos))
        salt = prompt.get("cache_salt") if isinstance(prompt, dict) else None
        salt_bytes(salt)  # a bad one fails here, before any round
        salted.append((searches[-1], {} if salt is None else {"cache_salt": salt}))
    each_round = params.round_params()
    while live := [(s, fields) for s, fields in salted if not s.done]:
        batch = [{"prompt_token_ids": p} | fields for s, fields in live for p in s.round_prompts()]
        results = iter(llm.generate(batch, each_round))
        for s, _ in live:
            s.advance([next_logprobs(next(results)) for _ in s.live])
    tok = llm.tokenizer
    return [BeamSearchOutput([
        BeamSearchSequence(s.prompt_ids + c.token_ids, c.logprobs, c.cumulative_logprob,
                           tok.decode(s.prompt_ids + c.token_ids,
                                      skip_special_tokens=params.skip_special_tokens)
                           if tok is not None else None,
                           c.finish_reason, c.token_ids[-1] if c.finish_reason == "stop" else None)
        for c in s.outputs(None, MAX_LOGPROBS)]) for s in searches]


def next_logprobs(out) -> dict[int, Logprob]:
    """A one-token round request's next-token alternatives (an engine failure raises)."""
    if out.error is not None:
        raise RuntimeError(f"a beam search round failed: {out.error}")
    c = out.outputs[0]
    if c.finish_reason == "abort" or not c.logprobs:
        raise RuntimeError("a beam search round was aborted")
    return c.logprobs[0]
