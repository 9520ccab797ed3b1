"""The server's tokenizer as vLLM exposes it: ``/tokenize``, ``/detokenize``,
``/tokenizer_info`` and ``/version``.

Clients that must count or build token-id prompts with the server's own tokenizer use these:
lm-evaluation-harness (``tokenizer_backend=remote`` reads ``eos_token``/``bos_token``/
``chat_template`` from ``/tokenizer_info`` and calls the other two), guidellm, prompt-length
checks before a request. Request and response shapes are vLLM's.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import FastAPI
from pydantic import Field

from serving.entrypoints.openai_protocol import ModelCard, OpenAIModel
from serving.entrypoints.server_requests import ApiError, encode_chat, render_chat
from xds_jax.text.tokenizer import TokenizerError


class TokenizeRequest(OpenAIModel):
    """``POST /tokenize``: a ``prompt`` (completion form) or ``messages`` (chat form)."""

    null_is_default = frozenset({"add_generation_prompt", "continue_final_message",
                                 "return_token_strs"})
    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages
    add_generation_prompt: bool | None = True
    continue_final_message: bool | None = False
    chat_template: str | None = None  # applied with --trust-request-chat-template, else a 400
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    return_token_strs: bool | None = False


class TokenizeResponse(OpenAIModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(OpenAIModel):
    model: str | None = None
    tokens: list[int] = Field(max_length=1 << 20)


def package_version() -> str:
    try:
        return version("xds-jax")
    except PackageNotFoundError:  # run from a source tree without installing
        return "0+unknown"


def tokenize_ids(tok: Any, req: TokenizeRequest, trust_template: bool = False) -> list[int]:
    """The token ids of a ``/tokenize`` request (run on a tokenizer thread); a template the
    request sends is applied where ``trust_template``."""
    if req.messages is not None:  # as chat completions renders them
        return encode_chat(tok, render_chat(tok, req, trust_template),
                           bool(req.add_special_tokens))
    try:
        special = True if req.add_special_tokens is None else req.add_special_tokens
        return tok.encode(req.prompt, add_special_tokens=special)
    except TokenizerError as error:
        raise ApiError(400, f"prompt: {error}", "prompt", "invalid_value") from None


def add_tokenizer_routes(app: FastAPI, served: Any) -> None:
    """Register the routes on ``app``; ``served`` gives the engine, the served names and the
    tokenizer threads."""
    engine = served.engine

    def tokenizer():
        if engine.tokenizer is None:
            raise ApiError(400, f"model {engine.model_name!r} has no tokenizer; send token ids",
                           "model", "no_tokenizer")
        return engine.tokenizer

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> dict:
        served.check_model(req.model)
        tok = tokenizer()
        if (req.prompt is None) == (req.messages is None):
            raise ApiError(400, "send either 'prompt' or 'messages'", "prompt", "invalid_value")
        ids = await served.off_loop(tokenize_ids, tok, req, served.trust_request_chat_template)
        strs = [tok.id_to_token(i) or "" for i in ids] if req.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=engine.max_model_len, tokens=ids,
                                token_strs=strs).model_dump()

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> dict:
        served.check_model(req.model)
        vocab = engine.cfg.vocab_size
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, f"tokens {bad[:5]} are outside the vocabulary (0..{vocab - 1})",
                           "tokens", "invalid_value")
        return {"prompt": tokenizer().decode(req.tokens, skip_special_tokens=False)}

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict:
        tok = tokenizer()

        def text(token_id: int | None) -> str | None:  # a special id as the vocabulary spells it
            return None if token_id is None else tok.id_to_token(token_id)

        return {
            "tokenizer_class": type(tok).__name__,
            "bos_token": text(tok.bos_token_id),
            "eos_token": text(tok.eos_token_id),
            "pad_token": text(tok.pad_token_id),
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
            "add_bos_token": tok.add_bos_token,
            "chat_template": tok.chat_template,
            "model_max_length": engine.max_model_len,
            "vocab_size": engine.cfg.vocab_size,
        }

    @app.get("/v1/models/{model_id:path}")
    async def model_card(model_id: str) -> dict:
        served.check_model(model_id)
        vocab = getattr(getattr(engine, "cfg", None), "vocab_size", None)
        return ModelCard(id=model_id, root=engine.model_name, max_model_len=engine.max_model_len,
                         vocab_size=vocab).model_dump()

    @app.get("/version")
    async def server_version() -> dict:
        return {"version": package_version()}
