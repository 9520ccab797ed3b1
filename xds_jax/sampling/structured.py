"""Structured outputs: a JSON schema, a regex, a list of choices or a grammar constrains each
sampled token (vLLM's ``StructuredOutputsParams``, with llguidance as the grammar engine, one
of vLLM's backends).

``StructuredOutputs`` says what the output must match; ``check`` compiles it against a tokenizer
when a request arrives (an invalid schema, regex or grammar is a ``SamplingParamsError`` naming
the field); each ``Sequence`` keeps a ``GrammarState`` that gives the ids allowed next
(``allowed``, a ``[V]`` mask the sampler bans the rest of) and consumes each appended token.
Once the grammar is complete only EOS is allowed; the sequence ends there (``stopped``).
"""

from __future__ import annotations

import dataclasses
import json
import re
import weakref
from typing import Any

import numpy as np

from xds_jax.errors import SamplingParamsError
from xds_jax.sampling.schema_closing import closed_objects

FIELD = "structured_outputs"


@dataclasses.dataclass(frozen=True)
class StructuredOutputs:
    """Exactly one constraint: ``json`` (a JSON schema, dict or JSON text), ``json_object``
    (any JSON object), ``regex``, ``choice`` (one of these strings) or ``grammar`` (a Lark
    grammar as llguidance reads it, or GBNF/EBNF as llama.cpp and XGrammar write it).
    ``disable_any_whitespace``: JSON without whitespace between tokens; ``whitespace_pattern``:
    a regex the whitespace between JSON tokens matches instead.

    A schema's objects that list ``properties`` and say nothing of other properties
    (``additionalProperties``, ``patternProperties``, ``unevaluatedProperties``) take no others
    where nothing else may add keys to them (``schema_closing``), as vLLM's default JSON
    backend (XGrammar's strict mode) reads them: a model that may add keys writes some (a
    small one, on and on). ``disable_additional_properties`` closes the object schemas
    without ``properties`` too (vLLM's option of that name).
    ``disable_fallback`` is accepted as vLLM's clients send it: one grammar engine, nothing to
    fall back to."""

    json: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    disable_fallback: bool = False
    whitespace_pattern: str | None = None

    def __post_init__(self) -> None:
        given = [name for name in ("json", "regex", "choice", "grammar")
                 if getattr(self, name) is not None] + (["json_object"] if self.json_object else [])
        if len(given) != 1:
            raise SamplingParamsError(
                f"{FIELD} needs exactly one of json, json_object, regex, choice or grammar, "
                f"got {given or 'none'}")
        if self.json is not None and not isinstance(self.json, dict | str):
            raise SamplingParamsError(f"{FIELD}.json must be a JSON schema (an object or its "
                                      f"JSON text), got {type(self.json).__name__}")
        if self.regex is not None and not isinstance(self.regex, str):
            raise SamplingParamsError(f"{FIELD}.regex must be a string")
        if self.whitespace_pattern is not None and not isinstance(self.whitespace_pattern, str):
            raise SamplingParamsError(f"{FIELD}.whitespace_pattern must be a string")
        for flag in ("disable_any_whitespace", "disable_additional_properties",
                     "disable_fallback"):
            if not isinstance(getattr(self, flag), bool):
                raise SamplingParamsError(f"{FIELD}.{flag} must be true or false")
        if self.grammar is not None and not (isinstance(self.grammar, str) and self.grammar):
            raise SamplingParamsError(f"{FIELD}.grammar must be a non-empty string")
        if self.choice is not None and not (
                isinstance(self.choice, list | tuple) and self.choice
                and all(isinstance(c, str) for c in self.choice)):
            raise SamplingParamsError(f"{FIELD}.choice must be a non-empty list of strings")

    def __getstate__(self) -> dict:
        """Pickled without the compiled check ``check`` caches on it (a native object)."""
        return {k: v for k, v in self.__dict__.items() if k != "_checked"}

    @classmethod
    def coerce(cls, value: Any) -> StructuredOutputs | None:
        """``value`` as given to ``SamplingParams``: None, an instance or a dict of fields."""
        if value is None or isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise SamplingParamsError(f"{FIELD} must be an object with one of json, "
                                      f"json_object, regex, choice or grammar, got "
                                      f"{type(value).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise SamplingParamsError(f"{FIELD}: unknown fields {unknown}; it takes "
                                      f"{sorted(known)}")
        return cls(**{k: v for k, v in value.items() if v is not None})

    def grammar_text(self) -> str:
        """The constraint as an llguidance grammar."""
        import llguidance

        matcher = llguidance.LLMatcher
        if self.json is not None or self.json_object:
            schema = self.json if self.json is not None else {"type": "object"}
            try:
                schema = json.loads(schema) if isinstance(schema, str) else schema
            except json.JSONDecodeError as error:
                raise SamplingParamsError(f"{FIELD}.json is not valid JSON: {error}") from None
            if not isinstance(schema, dict):
                raise SamplingParamsError(f"{FIELD}.json must be a JSON schema object")
            # lenient: keywords llguidance does not implement (formats, say) constrain nothing
            options = {"whitespace_flexible": not self.disable_any_whitespace,
                       "coerce_one_of": True, "lenient": True}
            if self.whitespace_pattern is not None:
                options["whitespace_pattern"] = self.whitespace_pattern
            if self.json is not None:
                schema = closed_objects(schema, self.disable_additional_properties)
            try:
                return matcher.grammar_from_json_schema(schema, overrides=options)
            except ValueError as error:
                raise SamplingParamsError(f"{FIELD}.json: {error}") from None
        if self.regex is not None:
            return matcher.grammar_from_regex(self.regex)
        if self.choice is not None:
            return matcher.grammar_from_regex("|".join(re.escape(c) for c in self.choice))
        return matcher.grammar_from_lark(_as_lark(self.grammar))


def _as_lark(grammar: str) -> str:
    """GBNF/EBNF (``root ::= ...``, as llama.cpp and XGrammar write it) as Lark; Lark as is."""
    if "::=" not in grammar:
        return grammar
    from llguidance.gbnf_to_lark import gbnf_to_lark

    try:
        return gbnf_to_lark(grammar)
    except Exception as error:  # the converter raises its own types, all of them bad input
        raise SamplingParamsError(f"{FIELD}.grammar: {error}") from None


# -- compiling against a tokenizer ----------------------------------------------------------
_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def grammar_tokenizer(tokenizer) -> Any:
    """The llguidance view of an ``xds_jax.text.tokenizer.Tokenizer`` (built once, ~0.2 s)."""
    found = _TOKENIZERS.get(tokenizer)
    if found is None:
        import llguidance

        eos = sorted(tokenizer.eos_token_ids) or None
        found = llguidance.LLTokenizer(tokenizer.backend_json(), eos_token=eos)
        _TOKENIZERS[tokenizer] = found
    return found


def check(spec: StructuredOutputs, tokenizer) -> str:
    """Compile ``spec`` for ``tokenizer``; the grammar text, or a ``SamplingParamsError`` that
    says what is wrong with it."""
    if tokenizer is None:
        raise SamplingParamsError(f"{FIELD} needs the model's tokenizer; this model has none "
                                  "(token-id prompts only)")
    import llguidance

    lltok = grammar_tokenizer(tokenizer)
    checked = spec.__dict__.get("_checked")  # the n sequences of a request share one check
    if checked is not None and checked[0] is lltok:
        return checked[1]
    text = spec.grammar_text()
    error = llguidance.LLMatcher.validate_grammar(text, lltok)
    if error:
        field = next(n for n in ("json", "regex", "choice", "grammar", "json_object")
                     if getattr(spec, n))
        raise SamplingParamsError(f"{FIELD}.{field}: {short_error(error)}")
    object.__setattr__(spec, "_checked", (lltok, text))
    return text


def short_error(error: str, limit: int = 300) -> str:
    """llguidance's error without the parser state and grammar it dumps after it."""
    text = error.split("<state>")[0].split("<grammar>")[0].strip()
    return text if len(text) <= limit else text[:limit] + "..."


class GrammarState:
    """One sequence's place in its grammar: the ids allowed next and the tokens consumed."""

    def __init__(self, spec: StructuredOutputs, tokenizer):
        import llguidance

        self._lltok = grammar_tokenizer(tokenizer)
        self._matcher = llguidance.LLMatcher(self._lltok, check(spec, tokenizer))

    def allowed(self, vocab_size: int) -> np.ndarray:
        """``[vocab_size]`` bool: the ids the grammar accepts next (ids past the tokenizer's
        vocabulary never)."""
        words = (self._lltok.vocab_size + 31) // 32
        bits = np.zeros(words, np.int32)
        self._matcher.unsafe_compute_mask_ptr(bits.ctypes.data, bits.nbytes)
        mask = np.unpackbits(bits.view(np.uint8), bitorder="little").astype(bool)
        out = np.zeros(vocab_size, bool)
        n = min(vocab_size, self._lltok.vocab_size)
        out[:n] = mask[:n]
        return out

    def consume(self, token: int) -> None:
        """Advance over a sampled token (one the mask allowed)."""
        self._matcher.consume_token(token)

    @property
    def stopped(self) -> bool:
        """The grammar is complete: nothing but EOS may follow."""
        return self._matcher.is_stopped()

    @property
    def error(self) -> str | None:
        return short_error(self._matcher.get_error()) if self._matcher.is_error() else None
