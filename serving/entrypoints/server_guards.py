"""Checks at the server's door, as ASGI middleware: the API key and the request body size.

``ApiKeyMiddleware`` wants ``Authorization: Bearer <key>`` on the routes ``vllm serve
--api-key`` guards (the ``/v1`` API) and the scoring routes (``PROTECTED_PREFIXES``),
answering 401 in OpenAI's shape otherwise; health, metrics, version and tokenizer routes stay
open. ``BodyLimitMiddleware`` answers 413 to a
body over the limit, from ``Content-Length`` before anything is read, or as soon as a streamed
(chunked) body passes it, so no one can make the server buffer and parse gigabytes.
"""

from __future__ import annotations

import hmac
from typing import Any

from starlette.exceptions import HTTPException

from serving.entrypoints.api_error import ApiError

# Routes that need the API key, as vLLM asks it: the /v1 API (and /v2/rerank), and the
# scoring routes outside it, which compute too; /health, /ping, /metrics, /version, the
# tokenizer routes and the docs stay open.
PROTECTED_PREFIXES = ("/v1/", "/v2/", "/score", "/rerank")
DEFAULT_MAX_REQUEST_BYTES = 16 << 20


class ApiKeyMiddleware:
    """401 unless the request carries ``Authorization: Bearer <api_key>`` (the protected
    routes only: ``PROTECTED_PREFIXES``)."""

    def __init__(self, app: Any, api_key: str):
        self.app, self._key = app, api_key.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if (scope["type"] != "http" or scope["method"] == "OPTIONS"
                or not scope["path"].startswith(PROTECTED_PREFIXES)):
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._key):
            return await self.app(scope, receive, send)
        error = ApiError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>' "
                         "with the key the server was started with (--api-key)", None,
                         "invalid_api_key", {"WWW-Authenticate": "Bearer"})
        await error.response()(scope, receive, send)


class BodyLimitMiddleware:
    """413 for request bodies over ``max_bytes``; 415 for a compressed body
    (``Content-Encoding``)."""

    def __init__(self, app: Any, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _error(self, size: str) -> ApiError:
        return ApiError(413, f"the request body has {size} bytes, more than this server "
                        f"accepts ({self.max_bytes}; --max-request-bytes)", None,
                        "request_too_large")

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        encoding = headers.get(b"content-encoding", b"identity").strip().lower()
        if encoding not in (b"identity", b""):  # read as JSON it said "not UTF-8"
            return await ApiError(415, f"Content-Encoding {encoding.decode(errors='replace')} "
                                  "is not supported: send the JSON body uncompressed", None,
                                  "unsupported_media_type").response()(scope, receive, send)
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._error(length.decode()).response()(scope, receive, send)
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    # FastAPI re-raises HTTPExceptions from reading the body; the app's
                    # handler turns it into the error body.
                    raise HTTPException(413, self._error(f"over {self.max_bytes}").message)
            return message

        await self.app(scope, counted, send)
