"""A byte-level tokenizer for models that come without one (a bare ``config.json`` with
random weights, used to simulate deployments): every UTF-8 byte is one token.

The model's BOS and EOS ids keep their roles; the 256 bytes take the lowest other ids and
the remaining ids decode as ``<tok_N>``, so any vocabulary of at least 256 + specials works
and text goes in and out of ``xds generate`` and the server unchanged (random weights still
produce random text).
"""

from __future__ import annotations

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors

from xds_jax.model.config import ModelConfig
from xds_jax.text.tokenizer import Tokenizer


def byte_tokenizer(cfg: ModelConfig) -> Tokenizer | None:
    """A byte tokenizer over ``cfg``'s vocabulary; None if it has fewer than 256 free ids."""
    eos = cfg.eos_token_ids[0] if cfg.eos_token_ids else None
    specials = {i: name for i, name in ((cfg.bos_token_id, "<s>"), (eos, "</s>"))
                if i is not None and 0 <= i < cfg.vocab_size}
    free = [i for i in range(cfg.vocab_size) if i not in specials]
    if len(free) < 256:
        return None
    alphabet = [_BYTE_CHARS[b] for b in range(256)]
    vocab = dict(zip(alphabet, free, strict=False)) | {name: i for i, name in specials.items()}
    # The rest of the vocabulary decodes to a visible name; encoding never produces it.
    vocab |= {f"<tok_{i}>": i for i in free[256:]}
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([specials[i] for i in sorted(specials)])
    bos = cfg.bos_token_id if cfg.bos_token_id in specials else None
    if bos is not None:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", bos)])
    return Tokenizer(backend, bos_token_id=bos, eos_token_id=eos if eos in specials else None,
                     pad_token_id=None, add_bos_token=bos is not None, chat_template=None)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte (what ``ByteLevel`` emits)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


_BYTE_CHARS = _bytes_to_unicode()
