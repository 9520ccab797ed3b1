"""Build a `tokenizers.Tokenizer` from the vocabulary a GGUF file stores in its metadata.

A GGUF carries no `tokenizer.json`: it stores llama.cpp's view of the vocabulary (tokens, merges
or scores, token types) plus the name of the pre-tokenizer (`tokenizer.ggml.pre`). These builders
rebuild the pipeline llama.cpp runs for each `tokenizer.ggml.model`:

- `"gpt2"`: byte-level BPE. Tokens are already spelled in the GPT-2 byte alphabet; the text is
  split by llama.cpp's regexes for the named pre-tokenizer, applied one after another.
- `"llama"`: SentencePiece BPE. Merges are derived from the token scores, spaces become `▁`,
  unknown bytes fall back to `<0xXX>` tokens, and, as in llama.cpp, the text's start and every
  run of text after a control or user-defined token get a leading space when
  `tokenizer.ggml.add_space_prefix` is set (the default).

Control and user-defined tokens are matched whole in the text, before any splitting.
"""

from collections.abc import Mapping, Sequence
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, processors
from tokenizers import pre_tokenizers as pre

# llama.cpp's `llama_token_type`.
TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED = 2, 3, 4

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
_CASED_WORD = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+{suffix}"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*{suffix}"
)
_GPT4O = _CASED_WORD.replace("{suffix}", r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?") + (
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN = _CASED_WORD.replace("{suffix}", "") + (
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_LLAMA3_NAMES = ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0")
_LLAMA3_NAMES += ("lfm2", "dbrx", "smaug-bpe")
_GPT2_NAMES = ("gpt-2", "phi-2", "mpt", "olmo", "jais", "trillion", "roberta-bpe", "gigachat")
_GPT2_NAMES += ("jina-es", "jina-de", "jina-v1-en", "jina-v2-es", "jina-v2-de", "jina-v2-code")

# Regexes per `tokenizer.ggml.pre`, as llama.cpp's `llm_tokenizer_bpe` applies them: each one
# splits the pieces the previous one left, keeping matches and gaps alike.
_PRE_TOKENIZER_GROUPS: list[tuple[tuple[str, ...], tuple[str, ...]]] = [
    (("default",), (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")),
    (_GPT2_NAMES, (_GPT2,)),
    (
        ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
        (r"\p{N}", _GPT2),
    ),
    (("falcon",), (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]")),
    (_LLAMA3_NAMES, (_LLAMA3,)),
    (("qwen2", "deepseek-r1-qwen", "stablelm2", "hunyuan", "megrez"), (_QWEN2,)),
    (("gpt-4o", "llama4"), (_GPT4O,)),
    (("tekken",), (_TEKKEN,)),
    (("bloom", "poro-chat", "gpt3-finnish"), (r" ?[^(\s|.,!?…。，、।۔،)]+",)),
]
PRE_TOKENIZER_SPLITS: dict[str, tuple[str, ...]] = {
    name: splits for names, splits in _PRE_TOKENIZER_GROUPS for name in names
}
# Vocabularies whose whole pre-token is looked up before any merge (llama.cpp's `ignore_merges`).
_IGNORE_MERGES = frozenset((*_LLAMA3_NAMES, "tekken"))


def byte_level_backend(fields: Mapping[str, Any], pre_tokenizer: str) -> Tokenizer:
    """A byte-level BPE tokenizer (`tokenizer.ggml.model == "gpt2"`).

    Args:
        fields: GGUF metadata, as `read_gguf_metadata` returns it.
        pre_tokenizer: A key of `PRE_TOKENIZER_SPLITS`.
    """
    tokens = fields["tokenizer.ggml.tokens"]
    token_types = _token_types(fields, len(tokens))
    respell = pre.ByteLevel(add_prefix_space=False, use_regex=False)
    alphabet = frozenset(pre.ByteLevel.alphabet())
    vocab = {}
    for token_id, (token, token_type) in enumerate(zip(tokens, token_types, strict=True)):
        if token_type == 1 and not alphabet.issuperset(token):
            # A plain token must be spelled in the byte alphabet for BPE to ever produce it.
            token = "".join(piece for piece, _ in respell.pre_tokenize_str(token))
        vocab.setdefault(token, token_id)
    merges = [tuple(merge.split(" ", 1)) for merge in fields["tokenizer.ggml.merges"]]
    backend = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, ignore_merges=pre_tokenizer in _IGNORE_MERGES)
    )
    splits = [
        pre.Split(Regex(pattern), "isolated") for pattern in PRE_TOKENIZER_SPLITS[pre_tokenizer]
    ]
    backend.pre_tokenizer = pre.Sequence([*splits, respell])
    backend.decoder = decoders.ByteLevel()
    _add_special_tokens(backend, tokens, token_types)
    return backend


def sentencepiece_backend(fields: Mapping[str, Any]) -> Tokenizer:
    """A SentencePiece BPE tokenizer (`tokenizer.ggml.model == "llama"`).

    Args:
        fields: GGUF metadata, as `read_gguf_metadata` returns it.
    """
    tokens = fields["tokenizer.ggml.tokens"]
    token_types = _token_types(fields, len(tokens))
    scores = fields.get("tokenizer.ggml.scores")
    if scores is None:
        scores = [-float(token_id) for token_id in range(len(tokens))]
    vocab = {}
    for token_id, token in enumerate(tokens):
        vocab.setdefault(token, token_id)
    unk_id = fields.get("tokenizer.ggml.unknown_token_id", 0)
    backend = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=_merges_from_scores(vocab, tokens, scores),
            unk_token=tokens[unk_id] if unk_id < len(tokens) else None,
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    escape = normalizers.Replace(" ", "\u2581")
    add_space_prefix = fields.get("tokenizer.ggml.add_space_prefix", True)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), escape])
        steps.append(decoders.Strip(" ", 1, 0))
    else:
        backend.normalizer = escape
    backend.decoder = decoders.Sequence(steps)
    _add_special_tokens(backend, tokens, token_types)
    return backend


def _merges_from_scores(
    vocab: Mapping[str, int], tokens: Sequence[str], scores: Sequence[float]
) -> list[tuple[str, str]]:
    """Every split of a token into two tokens, best merged score first.

    SentencePiece merges the adjacent pair whose union scores highest, so ranking the pairs by
    the score of the token they form gives BPE the same order.
    """
    ranked = []
    for token, score in zip(tokens, scores, strict=True):
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                ranked.append((-float(score), vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _token_types(fields: Mapping[str, Any], count: int) -> list[int]:
    """Per-token llama.cpp types; every token is plain (1) when the file lists none."""
    token_types = fields.get("tokenizer.ggml.token_type")
    return [1] * count if token_types is None else [int(kind) for kind in token_types]


def _add_special_tokens(
    backend: Tokenizer, tokens: Sequence[str], token_types: Sequence[int]
) -> None:
    """Match control and user-defined tokens whole in text, as llama.cpp does.

    Control (and unknown) tokens are special: `decode(skip_special_tokens=True)` drops them.
    User-defined tokens, like `<think>`, stay in decoded text.
    """
    added = [
        AddedToken(token, special=kind != TOKEN_USER_DEFINED, normalized=False)
        for token, kind in zip(tokens, token_types, strict=True)
        if kind in (TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED)
    ]
    backend.add_special_tokens([token for token in added if token.special])
    backend.add_tokens([token for token in added if not token.special])


def set_special_token_template(
    backend: Tokenizer, bos: tuple[str, int] | None, eos: tuple[str, int] | None
) -> None:
    """Make `encode(..., add_special_tokens=True)` wrap text in the given BOS and EOS tokens.

    Args:
        backend: The tokenizer to change in place.
        bos: `(token, id)` to put before the text, or None.
        eos: `(token, id)` to put after the text, or None.
    """
    specials = dict(token for token in (bos, eos) if token is not None)
    if not specials:
        backend.post_processor = None
        return
    single = " ".join([*([bos[0]] if bos else []), "$A", *([eos[0]] if eos else [])])
    pair = f"{single} {single.replace('$A', '$B:1')}"
    backend.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=list(specials.items())
    )
