"""vLLM-compatible ``SamplingParams``: the same field names, defaults and meaning."""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import logging
import math
import random

from xds_jax.errors import SamplingParamsError
from xds_jax.sampling.structured import StructuredOutputs

log = logging.getLogger(__name__)

MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for a logit_bias value; larger ones are clipped to it
MAX_N = 128  # samples per request: each is a running sequence holding its own KV
MIN_TEMPERATURE = 0.01  # a positive temperature below it is raised to it (vLLM's _MAX_TEMP)
SEED_SPACE = 1 << 32  # the device draws from 32-bit seeds


def logprobs_width(n: int) -> int:
    """How many top log-probabilities a program computes for requests asking up to ``n``:
    the next power of two, at most ``MAX_LOGPROBS`` (0 stays 0), so requests' varied counts
    share 7 programs instead of 21; each request keeps its own top ``n``
    (``Sequence.append``, the prompt scorer)."""
    return 0 if n <= 0 else min(1 << (n - 1).bit_length(), max(n, MAX_LOGPROBS))


def logprobs_program_width(params) -> int:
    """How many top log-probabilities a decode or verify program computes for a batch of
    ``params`` (None rows skipped): ``MAX_LOGPROBS`` where any row asks for some, else 0. One
    width for every count: each row keeps its own top n on the host, a top-20 costs what a
    top-2 does beside the log-softmax, and each width was a program per batch size, each
    taking its memory mappings."""
    return MAX_LOGPROBS if any(p.logprobs for p in params if p is not None) else 0


def device_seed(seed: int) -> int:
    """Any integer as a 32-bit device seed: 0 .. 2**32 - 1 map to themselves, every other
    integer (negative, or 64-bit and beyond, as clients send) to a fixed hash of it."""
    if 0 <= seed < SEED_SPACE:
        return seed
    raw = seed.to_bytes((seed.bit_length() + 8) // 8, "little", signed=True)
    return int.from_bytes(hashlib.blake2b(raw, digest_size=4).digest(), "little")


def output_room(max_tokens: int | None) -> int:
    """Context a request's output takes: ``max_tokens``, one where None (at least one token
    is made), none for 0 (prompt scoring)."""
    return 1 if max_tokens is None else max(max_tokens, 0)


class RequestOutputKind(enum.Enum):
    """What each output a streaming caller gets holds (vLLM's): all the text and tokens so
    far, only what is new since the last one, or nothing until the finished output."""

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclasses.dataclass
class SamplingParams:
    """How to pick each output token and when to stop.

    ``temperature=0`` is greedy. ``top_k`` of 0 or -1 and ``top_p=1`` disable those filters.
    ``seed`` makes a request reproducible whatever else is in its batch. ``logprobs=n`` returns
    the ``n`` most likely tokens (raw model log-probabilities) plus the sampled one per step;
    ``prompt_logprobs=n`` does the same for every prompt token after the first (vLLM's field).
    ``max_tokens=0`` generates nothing: the request only scores its prompt. ``logit_bias``
    maps token ids to a value added to their logits before sampling (penalties, filters and
    greedy picks see it; reported logprobs stay the model's), clipped to +-100 as OpenAI does.
    ``structured_outputs`` (a ``StructuredOutputs`` or a dict of its fields: ``json`` schema,
    ``json_object``, ``regex``, ``choice`` or ``grammar``) constrains every sampled token to
    what it allows (vLLM's field; ``xds_jax/sampling/structured.py``).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    detokenize: bool = True  # False: token ids only (text "", logprobs' decoded tokens None)
    logit_bias: dict[int, float] | None = None
    structured_outputs: StructuredOutputs | dict | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    truncate_prompt_tokens: int | None = None  # keep the prompt's last k tokens (-1: the context)
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE  # AsyncEngine's streams

    def __post_init__(self) -> None:
        self.structured_outputs = StructuredOutputs.coerce(self.structured_outputs)
        self.stop = _listed(self.stop, "stop", one_string=True)
        self.stop_token_ids = _listed(self.stop_token_ids, "stop_token_ids")
        if self.allowed_token_ids is not None and not isinstance(self.allowed_token_ids, str):
            self.allowed_token_ids = _listed(self.allowed_token_ids, "allowed_token_ids")
        self.bad_words = _listed(self.bad_words, "bad_words", one_string=True)
        if self.top_k == -1:
            self.top_k = 0
        if self.seed == -1 and _is_int(self.seed):  # vLLM: -1 is no seed
            self.seed = None
        self.output_kind = _output_kind(self.output_kind)
        self._validate()
        if 0 < self.temperature < MIN_TEMPERATURE:
            log.warning("temperature %s is below %s, where logits divided by it may overflow; "
                        "%s is used (as vLLM does)", self.temperature, MIN_TEMPERATURE,
                        MIN_TEMPERATURE)
            self.temperature = MIN_TEMPERATURE
        self.logit_bias = {int(t): max(-MAX_LOGIT_BIAS, min(MAX_LOGIT_BIAS, float(v)))
                           for t, v in (self.logit_bias or {}).items()}

    def _validate(self) -> None:
        def bad(field: str, why: str) -> SamplingParamsError:
            return SamplingParamsError(f"{field} {why}, got {getattr(self, field)!r}")

        if not _is_int(self.n) or not 1 <= self.n <= MAX_N:
            raise bad("n", f"must be an integer in 1..{MAX_N}")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty",
                     "frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) \
                    or not math.isfinite(value):
                raise bad(name, "must be a finite number")
        if not self.temperature >= 0:
            raise bad("temperature", "must be >= 0")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise bad("top_k", "must be 0 or -1 (disabled) or a positive integer")
        if not 0 <= self.min_p <= 1:
            raise bad("min_p", "must be in [0, 1]")
        if not self.repetition_penalty > 0:
            raise bad("repetition_penalty", "must be > 0")
        if not -2 <= self.frequency_penalty <= 2:
            raise bad("frequency_penalty", "must be in [-2, 2]")
        if not -2 <= self.presence_penalty <= 2:
            raise bad("presence_penalty", "must be in [-2, 2]")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 0):
            raise bad("max_tokens", "must be a non-negative integer (0: score the prompt only)")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise bad("min_tokens", "must be a non-negative integer")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"must not exceed max_tokens ({self.max_tokens})")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 0 <= value <= MAX_LOGPROBS):
                raise bad(name, f"must be in 0..{MAX_LOGPROBS}")
        if self.seed is not None and not _is_int(self.seed):
            raise bad("seed", "must be an integer")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "must be non-empty strings")
        if not isinstance(self.detokenize, bool):
            raise bad("detokenize", "must be true or false")
        if self.stop and not self.detokenize:
            raise bad("stop", "strings are matched in the text: they need detokenize=True")
        if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be non-negative integers")
        allowed = self.allowed_token_ids
        if allowed is not None and not (isinstance(allowed, list) and allowed and all(
                _is_int(t) and t >= 0 for t in allowed)):
            raise bad("allowed_token_ids", "must be a non-empty list of non-negative integers")
        keep = self.truncate_prompt_tokens
        if keep is not None and (not _is_int(keep) or not (keep == -1 or keep >= 1)):
            raise bad("truncate_prompt_tokens", "must be -1 (the context length) or >= 1")
        if not all(isinstance(w, str) and w.strip() for w in self.bad_words):
            raise bad("bad_words", "must be non-blank strings")
        bias = self.logit_bias
        if bias is not None and not (isinstance(bias, dict) and all(
                _is_int(t) and t >= 0 and not isinstance(v, bool) and isinstance(v, int | float)
                and math.isfinite(v) for t, v in bias.items())):
            raise bad("logit_bias", "must map non-negative integer token ids to finite numbers")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        """Some penalty reads the tokens generated so far."""
        return (self.repetition_penalty != 1 or self.frequency_penalty != 0
                or self.presence_penalty != 0)

    @property
    def reads_outputs(self) -> bool:
        """Sampling reads the tokens generated so far (penalties count them, a grammar
        consumed them, a bad word's last token is banned after its first ones): the previous
        token must be appended before the next is drawn."""
        return self.penalized or self.structured_outputs is not None or bool(self.bad_words)

    @property
    def masked(self) -> bool:
        """Some ids may not be drawn next (a grammar, ``allowed_token_ids``, ``bad_words``):
        the row samples through a ``[V]`` mask, never from the step's plain argmax."""
        return (self.structured_outputs is not None or self.allowed_token_ids is not None
                or bool(self.bad_words))

    def request_seed(self) -> int:
        """The seed to use: the user's, or a fresh random one."""
        return self.seed if self.seed is not None else random.getrandbits(31)

    def sample_seeds(self) -> list[int]:
        """32-bit device seeds of the ``n`` samples: seed, seed + 1, ... (each mapped by
        ``device_seed``), so a seeded request is reproducible whatever its seed's size."""
        base = self.request_seed()
        return [device_seed(base + i) for i in range(self.n)]


def _listed(value, field: str, one_string: bool = False) -> list:
    """A list field as a list (None: empty; a lone string, where ``one_string``, one item);
    a value that is no sequence at all is named."""
    if value is None:
        return []
    if one_string and isinstance(value, str):
        return [value]
    try:
        return list(value)
    except TypeError:
        raise SamplingParamsError(f"{field} must be a list, got {value!r}") from None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _output_kind(kind) -> RequestOutputKind:
    """A ``RequestOutputKind``, or its name or value."""
    if isinstance(kind, RequestOutputKind):
        return kind
    for k in RequestOutputKind:
        if kind == k.value and not isinstance(kind, bool) or str(kind).upper() == k.name:
            return k
    raise SamplingParamsError(f"output_kind must be a RequestOutputKind (CUMULATIVE, DELTA or "
                              f"FINAL_ONLY), got {kind!r}")
