"""Text <-> token ids for a model, built from a GGUF file or a Hugging Face model directory.

`Tokenizer` wraps a `tokenizers.Tokenizer` with what an engine needs around it: BOS handling, the
set of ids that end generation, special-token queries and the model's chat template.
"""

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import jinja2
import tokenizers

from xds_jax.loading.gguf_fields import read_gguf_metadata
from xds_jax.text.chat_template import find_message_problem, render_chat_template
from xds_jax.text.gguf_tokenizer import (
    PRE_TOKENIZER_SPLITS,
    byte_level_backend,
    sentencepiece_backend,
    set_special_token_template,
)

log = logging.getLogger(__name__)

# Special tokens that close a turn in the chat formats in use; those a model's chat template
# writes also end generation, as the model emits them when its reply is done.
END_OF_TURN_TOKENS = frozenset(
    "<|im_end|> <|eot_id|> <|eom_id|> <|end|> <end_of_turn> <|endoftext|> <|end_of_text|> </s> "
    "<|return|> <|call|> <|END_OF_TURN_TOKEN|> <｜end▁of▁sentence｜>".split()
)
_HF_FILES = ("tokenizer_config.json", "generation_config.json", "chat_template.json")


class TokenizerError(ValueError):
    """A tokenizer cannot be built, or a request cannot be tokenized."""


def check_unicode(text: str, field: str) -> None:
    """Raise ``TokenizerError`` naming ``field`` if ``text`` holds a lone UTF-16 surrogate."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise TokenizerError(
            f"{field} holds a lone UTF-16 surrogate ({text[error.start]!r} at index "
            f"{error.start}), which is not valid Unicode text") from None


def chat_template_options(add_generation_prompt: bool,
                          extra: Mapping[str, Any] | None) -> tuple[bool, dict[str, Any]]:
    """A request's ``add_generation_prompt`` and ``chat_template_kwargs`` as the arguments of
    ``apply_chat_template``: the kwargs may override ``add_generation_prompt`` (as in vLLM)
    but not replace the conversation."""
    extra = dict(extra or {})
    if "messages" in extra or "conversation" in extra:
        raise TokenizerError("chat_template_kwargs may not set 'messages'; send the "
                             "conversation as the request's messages")
    return bool(extra.pop("add_generation_prompt", add_generation_prompt)), extra


TEXT_PART_FIELDS = {"text": "text", "input_text": "text", "refusal": "refusal"}  # type -> key


def text_parts_joined(message: Mapping[str, Any], index: int) -> dict[str, Any]:
    """A chat message with OpenAI content parts (``[{"type": "text", "text": ...}]``) turned
    into one string, text parts joined by newlines as vLLM does. Text parts are what vLLM
    reads as text: ``text`` and ``input_text`` (``text``), an assistant's ``refusal``
    (``refusal``), a bare string; other part types are refused (text-only models)."""
    message = dict(message)
    content = message.get("content")
    if content is None:  # as vLLM: an assistant turn that only called tools, or left out
        message["content"] = ""
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if isinstance(part, str):
                texts.append(part)
                continue
            kind = part.get("type") if isinstance(part, Mapping) else None
            field = TEXT_PART_FIELDS.get(kind)
            if field is None:
                raise TokenizerError(
                    f"messages[{index}].content[{j}] must be a text part "
                    f"{{'type': 'text', 'text': str}}, got type {kind!r} (text-only model)")
            if not isinstance(part.get(field), str):
                raise TokenizerError(f"messages[{index}].content[{j}] is a {kind} part without "
                                     f"a {field!r} string")
            texts.append(part[field])
        message["content"] = "\n".join(texts)
    if isinstance(message.get("content"), str):
        check_unicode(message["content"], f"messages[{index}].content")
    return message


def open_final_message(text: str, messages: Sequence[Mapping[str, Any]]) -> str:
    """The rendered chat ``text`` cut right after the last message's content, so the reply
    continues it (what transformers and vLLM do for ``continue_final_message``). The content
    is read as the template read it (text parts joined, ``text_parts_joined``)."""
    content = text_parts_joined(messages[-1], len(messages) - 1).get("content")
    content = content.strip() if isinstance(content, str) else ""
    if not content or content not in text:
        raise TokenizerError("continue_final_message: the last message's content must be "
                             "non-empty text that the chat template renders verbatim")
    return text[:text.rindex(content) + len(content)]


class UnsupportedTokenizerError(TokenizerError):
    """The model's tokenizer type (or pre-tokenizer) is not one this engine can build."""


class Tokenizer:
    """A model's tokenizer: encode, decode, special tokens and chat template.

    Attributes:
        bos_token_id: Beginning-of-sequence id, or None.
        eos_token_id: The model's declared end-of-sequence id, or None.
        eos_token_ids: Every id that ends generation: EOS, `extra_eos_token_ids` and the
            end-of-turn tokens (`END_OF_TURN_TOKENS`) that the chat template writes.
        pad_token_id: Padding id, or None.
        add_bos_token: Whether `encode(..., add_special_tokens=True)` prepends BOS.
        chat_template: Jinja source of the chat template, or None.
        vocab_size: Number of ids, added tokens included.
        byte_fallback_ids: Ids of `<0xXX>` byte tokens when the model falls back to bytes.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token_id: int | None,
        eos_token_id: int | None,
        pad_token_id: int | None,
        add_bos_token: bool,
        chat_template: str | None,
        extra_eos_token_ids: Iterable[int] = (),
    ) -> None:
        """Wrap a built backend whose post-processor adds BOS when `add_bos_token` says so.

        Prefer `from_gguf` and `from_hf_dir`; `extra_eos_token_ids` are further ids that end
        generation, such as a generation config's.
        """
        self._backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.add_bos_token = add_bos_token
        self.chat_template = chat_template
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        byte_ids = []
        if getattr(backend.model, "byte_fallback", False):
            byte_ids = [backend.token_to_id(f"<0x{byte:02X}>") for byte in range(256)]
        self.byte_fallback_ids = frozenset(i for i in byte_ids if i is not None)
        special = {i: t.content for i, t in backend.get_added_tokens_decoder().items() if t.special}
        self._special_ids = frozenset(special)
        template = chat_template or ""
        ends = {i for i, text in special.items() if text in END_OF_TURN_TOKENS and text in template}
        self.eos_token_ids = frozenset({*extra_eos_token_ids, *ends, eos_token_id} - {None})

    @classmethod
    def from_gguf(cls, path: str | PathLike[str]) -> "Tokenizer":
        """Build the tokenizer described by a GGUF file's metadata."""
        return cls.from_gguf_fields(read_gguf_metadata(path))

    @classmethod
    def from_gguf_fields(cls, fields: Mapping[str, Any]) -> "Tokenizer":
        """Build the tokenizer described by already-read GGUF metadata.

        Args:
            fields: Metadata as `read_gguf_metadata` or `read_gguf_fields` returns it.

        Raises:
            UnsupportedTokenizerError: `tokenizer.ggml.model` is neither "gpt2" nor "llama", or
                the gpt2 pre-tokenizer `tokenizer.ggml.pre` is unknown.
            TokenizerError: The metadata has no vocabulary, or a special token id is outside it.
        """
        model = fields.get("tokenizer.ggml.model")
        if "tokenizer.ggml.tokens" not in fields:
            raise TokenizerError("GGUF metadata has no tokenizer.ggml.tokens vocabulary")
        tokens = fields["tokenizer.ggml.tokens"]
        bos_id, eos_id, pad_id, eot_id, eom_id = (
            _gguf_token_id(fields, name, len(tokens))
            for name in ("bos", "eos", "padding", "eot", "eom")
        )
        if model == "gpt2":
            pre_tokenizer = fields.get("tokenizer.ggml.pre")
            if pre_tokenizer is None:
                log.warning("GGUF has no tokenizer.ggml.pre; using llama.cpp's default splits")
                pre_tokenizer = "default"
            if pre_tokenizer not in PRE_TOKENIZER_SPLITS:
                raise UnsupportedTokenizerError(
                    f"GGUF tokenizer.ggml.pre {pre_tokenizer!r} is not supported; known: "
                    f"{', '.join(sorted(PRE_TOKENIZER_SPLITS))}"
                )
            backend = byte_level_backend(fields, pre_tokenizer)
        elif model == "llama":
            backend = sentencepiece_backend(fields)
        else:
            raise UnsupportedTokenizerError(
                f"GGUF tokenizer.ggml.model {model!r} is not supported; use 'gpt2' (byte-level "
                "BPE) or 'llama' (SentencePiece)"
            )
        # llama.cpp adds BOS to SentencePiece vocabularies that do not say otherwise.
        add_bos = bool(fields.get("tokenizer.ggml.add_bos_token", model == "llama"))
        add_eos = bool(fields.get("tokenizer.ggml.add_eos_token", False))
        set_special_token_template(
            backend,
            (tokens[bos_id], bos_id) if add_bos and bos_id is not None else None,
            (tokens[eos_id], eos_id) if add_eos and eos_id is not None else None,
        )
        return cls(
            backend,
            bos_token_id=bos_id,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
            add_bos_token=add_bos and bos_id is not None,
            chat_template=fields.get("tokenizer.chat_template"),
            extra_eos_token_ids=[token_id for token_id in (eot_id, eom_id) if token_id is not None],
        )

    @classmethod
    def from_hf_dir(cls, path: str | PathLike[str]) -> "Tokenizer":
        """Build from a Hugging Face model directory.

        Reads `tokenizer.json`, `tokenizer_config.json` (special tokens, `add_bos_token`,
        chat template), `chat_template.jinja` or `chat_template.json` and the EOS ids of
        `generation_config.json`, each when present.

        Raises:
            TokenizerError: The directory has no `tokenizer.json`.
        """
        directory = Path(path)
        if not (directory / "tokenizer.json").is_file():
            raise TokenizerError(f"{directory} has no tokenizer.json")
        backend = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
        config, generation, template_file = (_read_json(directory / name) for name in _HF_FILES)
        bos_id = _token_id(backend, config.get("bos_token"))
        eos_id = _token_id(backend, config.get("eos_token"))
        if "add_bos_token" in config or "add_eos_token" in config:
            # As transformers does, explicit flags replace tokenizer.json's post-processor.
            add_bos = config.get("add_bos_token") and bos_id is not None
            add_eos = config.get("add_eos_token") and eos_id is not None
            set_special_token_template(
                backend,
                (backend.id_to_token(bos_id), bos_id) if add_bos else None,
                (backend.id_to_token(eos_id), eos_id) if add_eos else None,
            )
        jinja_file = directory / "chat_template.jinja"
        if jinja_file.is_file():
            chat_template = jinja_file.read_text(encoding="utf-8")
        else:
            chat_template = template_file.get("chat_template", config.get("chat_template"))
        generation_eos = generation.get("eos_token_id", [])
        if isinstance(generation_eos, int):
            generation_eos = [generation_eos]
        prefix = backend.encode("", add_special_tokens=True).ids
        return cls(
            backend,
            bos_token_id=bos_id,
            eos_token_id=eos_id,
            pad_token_id=_token_id(backend, config.get("pad_token")),
            add_bos_token=bos_id is not None and prefix[:1] == [bos_id],
            chat_template=_default_template(chat_template),
            extra_eos_token_ids=generation_eos,
        )

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`, with BOS (and EOS) as configured if `add_special_tokens`.

        Special-token strings in `text`, like `<|im_start|>`, become their ids either way.

        Raises:
            TokenizerError: `text` holds a lone UTF-16 surrogate (JSON allows `"\\ud800"`,
                UTF-8 has no encoding for it).
        """
        check_unicode(text, "text")
        # encode_batch lets go of the GIL while it works (encode holds it throughout), so a long
        # text tokenized on a worker thread leaves the server's event loop running.
        return self._backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; invalid UTF-8 byte sequences become U+FFFD."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def backend_json(self) -> str:
        """The backend tokenizer serialised as ``tokenizer.json`` (for llguidance)."""
        return self._backend.to_str()

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry of `token_id` (as spelled in the vocabulary), or None."""
        return self._backend.id_to_token(token_id)

    def is_special(self, token_id: int) -> bool:
        """Whether `token_id` is a special (control) token, dropped by `skip_special_tokens`."""
        return token_id in self._special_ids

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str:
        """Render a conversation as the model's prompt text.

        Args:
            messages: Non-empty list of `{"role": str, "content": str | list}` dicts.
            add_generation_prompt: End with the header that opens the assistant's turn.
            chat_template: Jinja source to use instead of the model's own.
            **kwargs: More template variables (`tools`, `documents`, ...); they override the
                special-token variables.

        Raises:
            TokenizerError: The model has no chat template, `messages` is malformed, or the
                template rejects the conversation.
        """
        chat_template = chat_template or self.chat_template
        if chat_template is None:
            raise TokenizerError("this model has no chat template; send a plain prompt instead")
        problem = find_message_problem(messages)
        if problem is not None:
            raise TokenizerError(problem)
        variables = {
            "bos_token": self._token_text(self.bos_token_id),
            "eos_token": self._token_text(self.eos_token_id),
            "pad_token": self._token_text(self.pad_token_id),
            "tools": None,
            "documents": None,
            **kwargs,
        }
        try:
            return render_chat_template(
                chat_template,
                messages=[text_parts_joined(message, i) for i, message in enumerate(messages)],
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except (jinja2.TemplateError, ArithmeticError, LookupError, TypeError, ValueError,
                AttributeError, RecursionError) as error:  # template code on the caller's input
            raise TokenizerError(f"chat template failed: {type(error).__name__}: {error}") \
                from error

    def _token_text(self, token_id: int | None) -> str:
        return "" if token_id is None else self._backend.id_to_token(token_id) or ""


def _gguf_token_id(fields: Mapping[str, Any], name: str, vocab_size: int) -> int | None:
    """`tokenizer.ggml.<name>_token_id`, checked against the vocabulary size."""
    token_id = fields.get(f"tokenizer.ggml.{name}_token_id")
    if token_id is not None and not 0 <= token_id < vocab_size:
        raise TokenizerError(
            f"GGUF tokenizer.ggml.{name}_token_id {token_id} is outside the {vocab_size}-token "
            "vocabulary"
        )
    return token_id


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON file's object, or {} when the file is absent."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise TokenizerError(f"{path} is not valid JSON: {error}") from error


def _token_id(backend: tokenizers.Tokenizer, token: str | Mapping[str, Any] | None) -> int | None:
    """Id of a special token given as in tokenizer_config.json (string or AddedToken dict)."""
    if isinstance(token, Mapping):
        token = token.get("content")
    return None if token is None else backend.token_to_id(token)


def _default_template(template: str | list[Mapping[str, str]] | None) -> str | None:
    """The default template when a config lists named ones (`[{"name", "template"}]`)."""
    if isinstance(template, list):
        named = {entry["name"]: entry["template"] for entry in template}
        return named.get("default")
    return template
