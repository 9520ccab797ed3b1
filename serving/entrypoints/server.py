"""OpenAI-compatible HTTP server over ``AsyncEngine`` (FastAPI + uvicorn), like ``vllm serve``.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``POST /v1/responses`` (and
its stored responses: ``responses_api``), ``GET /v1/models``,
``GET /health`` (and vLLM's ``/ping``), ``GET /metrics`` (Prometheus text). Every error is an
OpenAI error body ``{"error": {"message", "type", "param", "code"}}``; a bad request never
disturbs the others.

Each request is admitted against the queue limits (``serving.core.admission``: n samples count
as n; over a limit, 503 with ``Retry-After``), tokenized on a thread so the event loop keeps
streaming, and lives under a ``Watchdog``: when its client disconnects or its timeout passes,
the engine aborts it at once, which frees its KV blocks and ends its output stream. An API key
and a body-size limit guard the door (``server_guards``); SIGTERM drains (``shutdown``).
Modules: ``server_state`` (shared state), ``server_responses`` (JSON and SSE answers),
``tool_calls`` and ``tool_parsers`` (``tools`` and ``tool_choice``).
"""

from __future__ import annotations

import contextlib
import logging
import socket
from pathlib import Path
from typing import Any

import jinja2
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.entrypoints import cli_vllm
from serving.entrypoints import openai_protocol as api
from serving.entrypoints.embeddings_api import add_embeddings_routes
from serving.entrypoints.reasoning import reasoning_parser as reasoning_parser_named
from serving.entrypoints.request_checks import InvalidFieldError
from serving.entrypoints.responses_api import add_responses_routes
from serving.entrypoints.score_api import add_score_routes
from serving.entrypoints.server_guards import (
    DEFAULT_MAX_REQUEST_BYTES,
    ApiKeyMiddleware,
    BodyLimitMiddleware,
)
from serving.entrypoints.server_requests import (
    ApiError,
    chat_prompt,
    completion_prompts,
    engine_error,
    sampling_params,
    truncated,
)
from serving.entrypoints.server_responses import respond
from serving.entrypoints.server_state import Served
from serving.entrypoints.tokenizer_routes import add_tokenizer_routes
from serving.entrypoints.tool_calls import PARSERS
from serving.entrypoints.tool_parsers import ToolParser
from xds_jax.errors import ConfigError, XdsError
from xds_jax.sampling.params import MAX_LOGPROBS
from xds_jax.text.chat_template import compile_chat_template
from xds_jax.text.tokenizer import TokenizerError

log = logging.getLogger(__name__)


def load_chat_template(value: str) -> str:
    """``--chat-template``: a Jinja file's text, or the template itself when ``value`` is no
    file but looks like Jinja (as ``vllm serve`` takes it); one that does not compile is
    refused here, not in every chat request."""
    path = Path(value).expanduser()
    if path.is_file():
        source = path.read_text(encoding="utf-8")
    elif "{" in value:
        source = value
    else:
        raise ConfigError(f"--chat-template: {value!r} is neither a file nor a Jinja template")
    try:
        compile_chat_template(source)
    except jinja2.TemplateSyntaxError as error:
        raise ConfigError(f"--chat-template: not a valid Jinja template: {error} (line "
                          f"{error.lineno})") from None
    return source


def check_address(host: str, port: int) -> None:
    """``--host`` / ``--port`` bindable now (vLLM binds before it loads the model): a port in
    use or an unknown host is a ConfigError before the slow load, not uvicorn's exit 3 after."""
    if not host:  # every interface, as asyncio reads an empty host
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise ConfigError(f"--host {host!r}: {error.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:  # as asyncio's server sockets: IPv6 only
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            probe.bind(address)
        except OSError as error:
            raise ConfigError(f"--host {host} --port {port}: cannot listen there "
                              f"({error.strerror})") from None


def front_end_options(args: Any) -> tuple[ToolParser | None, str | None]:
    """The ``xds serve`` options the HTTP front end reads, checked before the model loads:
    the tool-call parser, the reasoning parser, the chat template (compiled), the address.
    Returns the parser and the template's source."""
    parser = tool_parser(getattr(args, "enable_auto_tool_choice", False),
                         getattr(args, "tool_call_parser", None))
    reasoning_parser_named(getattr(args, "reasoning_parser", None))
    template = getattr(args, "chat_template", None)
    source = load_chat_template(template) if template else None
    if hasattr(args, "host") and hasattr(args, "port"):
        check_address(args.host, args.port)
    return parser, source


CORS_DEFAULTS = {"allow_origins": ["*"], "allow_methods": ["*"], "allow_headers": ["*"],
                 "allow_credentials": False}


def cors_options(args: Any) -> dict:
    """``CORSMiddleware``'s options from ``--allowed-origins``, ``--allowed-methods``,
    ``--allowed-headers`` and ``--allow-credentials`` (vLLM's defaults where absent)."""
    d = CORS_DEFAULTS
    return {"allow_origins": getattr(args, "allowed_origins", d["allow_origins"]),
            "allow_methods": getattr(args, "allowed_methods", d["allow_methods"]),
            "allow_headers": getattr(args, "allowed_headers", d["allow_headers"]),
            "allow_credentials": getattr(args, "allow_credentials", d["allow_credentials"])}


def tool_parser(enable_auto_tool_choice: bool, name: str | None) -> ToolParser | None:
    """The parser of ``tool_choice`` "auto" (``--enable-auto-tool-choice`` with
    ``--tool-call-parser NAME``, as in vLLM); None when auto tool choice is off."""
    if not enable_auto_tool_choice:
        return None
    if name not in PARSERS:
        raise ConfigError(f"--enable-auto-tool-choice needs --tool-call-parser, one of "
                          f"{', '.join(PARSERS)}; got {name!r}")
    return PARSERS[name]


def build_app(engine: Any, served_model_names: list[str] | None = None,
              request_timeout_s: float | None = None, *, api_key: str | None = None,
              max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
              chat_template: str | None = None,
              tool_call_parser: str | None = None,
              reasoning_parser: str | None = None,
              return_tokens_as_token_ids: bool = False,
              trust_request_chat_template: bool = False,
              cors: dict | None = None, response_role: str = "assistant",
              max_logprobs: int = MAX_LOGPROBS, log_requests: bool = False) -> FastAPI:
    """The FastAPI app serving ``engine``, which the caller starts and shuts down.

    ``api_key``: required as ``Authorization: Bearer <key>`` on the ``/v1`` API and the
    scoring routes (``server_guards.PROTECTED_PREFIXES``); ``max_request_bytes``: larger
    bodies are answered 413;
    ``chat_template``: Jinja source replacing the model's template (the tokenizer renders
    chats, ``/tokenize`` messages and ``/tokenizer_info`` with it); ``tool_call_parser``: the
    ``tool_parsers.PARSERS`` name that reads tool calls out of ``tool_choice`` "auto" replies
    (None: "auto" is refused, as vLLM does without ``--enable-auto-tool-choice``);
    ``reasoning_parser``: the ``reasoning.PARSERS`` name that splits chat replies into
    ``reasoning_content`` and ``content``; ``return_tokens_as_token_ids``: logprob tokens
    named ``token_id:N`` unless a request says otherwise; ``trust_request_chat_template``:
    apply a template a chat request sends (else a 400, as vLLM without
    ``--trust-request-chat-template``); ``cors``: ``CORSMiddleware``'s options (default: every
    origin, method and header, without credentials, as ``vllm serve``); ``response_role``:
    the role of chat replies after a generation prompt; ``max_logprobs``: most logprobs a
    request may ask (a 400 past it); ``log_requests``: log each request (vLLM's
    ``--enable-log-requests``).
    """
    if chat_template is not None:
        if engine.tokenizer is None:
            raise ConfigError("--chat-template needs a model with a tokenizer")
        engine.tokenizer.chat_template = chat_template
    parser = None if tool_call_parser is None else tool_parser(True, tool_call_parser)
    served = Served(engine, served_model_names or [engine.model_name], request_timeout_s,
                    parser, reasoning_parser_named(reasoning_parser), return_tokens_as_token_ids,
                    trust_request_chat_template)
    served.response_role, served.max_logprobs = response_role, max_logprobs
    served.log_requests = log_requests

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        served.close()

    app = FastAPI(title="xds-jax OpenAI-compatible server", lifespan=lifespan)
    app.state.served = served
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_request_bytes)
    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)
    # outermost: a browser's preflight is answered before the key is asked for
    app.add_middleware(CORSMiddleware, **(cors or CORS_DEFAULTS))

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, error: ApiError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        first = (error.errors() or [{}])[0]
        if first.get("type") == "json_invalid":
            detail = first.get("ctx", {}).get("error", first.get("msg"))
            return ApiError(400, f"malformed JSON body: {detail}", None, "invalid_json").response()
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if not loc and first.get("input") is None:
            return ApiError(400, "the body is empty: send a JSON object", None,
                            "invalid_json").response()
        if not loc and isinstance(first.get("input"), bytes):  # not read as JSON
            return ApiError(400, "the body must be a JSON object, sent with Content-Type: "
                            "application/json", None, "invalid_json").response()
        return ApiError(400, f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid value')}",
                        loc[0] if loc else None, "invalid_value").response()

    @app.exception_handler(InvalidFieldError)
    async def _invalid_field(_: Request, error: InvalidFieldError) -> JSONResponse:
        return ApiError(400, error.message, error.field, "invalid_value").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, error: StarletteHTTPException) -> JSONResponse:
        if error.status_code == 400:  # FastAPI read no JSON: not UTF-8, or nested too deep
            if "digits" in str(error.__cause__):  # Python's limit on an integer's digits
                return ApiError(400, "a number in the body has more than 4300 digits",
                                None, "invalid_value").response()
            return ApiError(400, f"malformed JSON body: {error.detail} (it must be UTF-8 JSON, "
                            "nested less than 1000 deep)", None, "invalid_json").response()
        code = "request_too_large" if error.status_code == 413 else None
        return ApiError(error.status_code, str(error.detail), None, code).response()

    # Errors a request can cause are answered here; only bugs reach the catch-all ``Exception``
    # handler, after which uvicorn also closes the connection (a keep-alive client sees the
    # next request on it fail).
    @app.exception_handler(XdsError)
    @app.exception_handler(TokenizerError)
    async def _request_error(_: Request, error: Exception) -> JSONResponse:
        return engine_error(error).response()

    @app.exception_handler(Exception)
    async def _crash(_: Request, error: Exception) -> JSONResponse:
        return engine_error(error).response()

    @app.get("/health")
    @app.api_route("/ping", methods=["GET", "POST"])  # vLLM's, for SageMaker's health checks
    async def health() -> Response:
        if served.draining:
            raise ApiError(503, "the server is shutting down", None, "shutting_down")
        if not engine.can_serve():  # PD: a prefill and a decode group must be in service
            raise ApiError(503, "no engine group can serve a request now", None, "unhealthy")
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models() -> dict:
        vocab = getattr(getattr(engine, "cfg", None), "vocab_size", None)
        return api.ModelList(data=[
            api.ModelCard(id=name, root=engine.model_name, max_model_len=engine.max_model_len,
                          vocab_size=vocab) for name in served.names]).model_dump()

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(served.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions")
    async def completions(req: api.CompletionRequest, raw: Request):
        model = served.check_model(req.model)
        if req.suffix:
            raise ApiError(400, "suffix is not supported", "suffix", "unsupported")
        served.precheck(req.n)
        prompts = await served.off_loop(completion_prompts, req.prompt, engine.tokenizer)
        prompts = [truncated(p, req.truncate_prompt_tokens, engine.max_model_len,
                             served.output_tokens(req.max_tokens)) for p in prompts]
        # echo with logprobs scores the prompt too (vLLM); max_tokens 0 generates nothing
        scored = req.prompt_logprobs if req.prompt_logprobs is not None else (
            req.logprobs if req.echo else None)
        jobs = [(p, sampling_params(req, served.fit(p[1], req.max_tokens, "prompt", least=0),
                                    req.logprobs, scored, served.sampling_defaults))
                for p in prompts]
        return await respond(served, raw, req, model, jobs, "completion")

    @app.post("/v1/chat/completions")
    async def chat(req: api.ChatCompletionRequest, raw: Request):
        model = served.check_model(req.model)
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs set to true", "top_logprobs")
        if not 0 <= (req.top_logprobs or 0) <= MAX_LOGPROBS:
            raise ApiError(400, f"top_logprobs must be in 0..{MAX_LOGPROBS}, got "
                           f"{req.top_logprobs}", "top_logprobs", "invalid_value")
        tools = served.reply_plan(req)
        served.precheck(req.n)
        field = "max_tokens" if req.max_completion_tokens is None else "max_completion_tokens"
        prompt = truncated(await served.off_loop(chat_prompt, req, engine.tokenizer,
                                                 served.trust_request_chat_template),
                           req.truncate_prompt_tokens, engine.max_model_len,
                           served.output_tokens(getattr(req, field)))
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = sampling_params(req, served.fit(prompt[1], getattr(req, field), "messages",
                                                 field=field), logprobs, req.prompt_logprobs,
                                 served.sampling_defaults)
        return await respond(served, raw, req, model, [(prompt, params)], "chat", tools)

    add_tokenizer_routes(app, served)
    add_responses_routes(app, served)
    add_embeddings_routes(app, served)
    add_score_routes(app, served)
    return app


def run_server(args: Any, engine: Any = None, front_end: tuple | None = None) -> None:
    """Serve until SIGTERM/SIGINT, then drain (``serving.entrypoints.shutdown``). ``args``: the
    ``xds serve`` options (``host``, ``port``, ``served_model_name``, ``request_timeout``,
    ``api_key`` (else ``$XDS_API_KEY``, else ``$VLLM_API_KEY``), ``max_request_bytes``,
    ``shutdown_timeout``, ``chat_template``, ``enable_auto_tool_choice``, ``tool_call_parser``,
    ``reasoning_parser``, ``return_tokens_as_token_ids``, ``trust_request_chat_template``, the
    CORS options (``cors_options``), ``log_level``, the vLLM spellings (``cli_vllm``), and the
    engine's when ``engine`` is None); ``front_end``: ``front_end_options(args)`` where the
    caller checked them before loading ``engine``."""
    import uvicorn

    from serving.entrypoints.shutdown import DrainingServer

    parser, template = front_end or front_end_options(args)  # before the slow load
    if engine is None:
        from serving.entrypoints.launch import load_engine

        engine = load_engine(args)
    names = args.served_model_name or [engine.model_name]
    api_key = cli_vllm.api_key(args)
    app = build_app(engine, names, args.request_timeout, api_key=api_key,
                    max_request_bytes=args.max_request_bytes, chat_template=template,
                    tool_call_parser=parser and parser.name,
                    reasoning_parser=getattr(args, "reasoning_parser", None),
                    return_tokens_as_token_ids=getattr(args, "return_tokens_as_token_ids",
                                                       False),
                    trust_request_chat_template=getattr(args, "trust_request_chat_template",
                                                        False),
                    cors=cors_options(args),
                    response_role=getattr(args, "response_role", "assistant"),
                    max_logprobs=getattr(args, "max_logprobs", MAX_LOGPROBS),
                    log_requests=getattr(args, "enable_log_requests", False))
    config = uvicorn.Config(app, host=args.host, port=args.port,
                            log_level=getattr(args, "uvicorn_log_level", None) or args.log_level,
                            timeout_graceful_shutdown=5)
    log.info("serving %s at http://%s:%d/v1%s", names[0], args.host, args.port,
             " (API key required)" if api_key else "")
    try:
        DrainingServer(config, app.state.served, args.shutdown_timeout).run()
    finally:
        engine.shutdown()
