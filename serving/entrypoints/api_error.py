"""``ApiError``: an error a route answers as an OpenAI error body."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from serving.entrypoints import openai_protocol as api

ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error",
               404: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
               504: "timeout_error"}


class ApiError(Exception):
    """An error answered as an OpenAI error body with HTTP ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers

    def body(self) -> dict:
        default = "invalid_request_error" if self.status < 500 else "server_error"
        kind = ERROR_TYPES.get(self.status, default)
        info = api.ErrorInfo(message=self.message, type=kind, param=self.param, code=self.code)
        return api.ErrorResponse(error=info).model_dump()

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)
