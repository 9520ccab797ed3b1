"""From OpenAI request bodies to engine inputs, and from errors to OpenAI error bodies."""

from __future__ import annotations

import logging
from typing import Any

from serving.core.admission import OverloadedError, RequestTooLargeError
from serving.core.balancer import NoHealthyGroupError
from serving.core.request_outcomes import (
    DuplicateRequestError,
    EngineDeadError,
    RequestFailedError,
)
from serving.distributed.lockstep import PeerLostError
from serving.entrypoints import openai_protocol as api
from serving.entrypoints.api_error import ApiError
from serving.entrypoints.tool_calls import tool_constraint
from xds_jax.errors import PromptTooLongError, SamplingParamsError
from xds_jax.llm import InvalidPromptError
from xds_jax.sampling.beam_search import BeamSearchParams
from xds_jax.sampling.params import SamplingParams, output_room
from xds_jax.sampling.structured import FIELD as STRUCTURED
from xds_jax.sampling.structured import StructuredOutputs
from xds_jax.text.tokenizer import TokenizerError, chat_template_options, text_parts_joined
from xds_jax.text.tokenizer import open_final_message as tokenizer_open_final_message

log = logging.getLogger(__name__)

Prompt = tuple[str | None, list[int]]  # (text if given as text, token ids)


def engine_error(error: Exception) -> ApiError:
    """The HTTP error for an exception raised while serving a request."""
    if isinstance(error, ApiError):
        return error
    if isinstance(error, PromptTooLongError):
        return ApiError(400, str(error), "prompt", "context_length_exceeded")
    if isinstance(error, InvalidPromptError | TokenizerError):
        return ApiError(400, str(error), "prompt", "invalid_prompt")
    if isinstance(error, SamplingParamsError):  # the message opens with the field's name
        return ApiError(400, str(error), str(error).split()[0].rstrip(":"), "invalid_value")
    if isinstance(error, RequestFailedError):  # that request alone; the engine serves on
        return ApiError(500, str(error), None, "request_failed")
    if isinstance(error, EngineDeadError | PeerLostError):  # the server is going down
        return ApiError(503, str(error), None, "shutting_down", {"Retry-After": "5"})
    if isinstance(error, DuplicateRequestError):
        return ApiError(400, str(error), None, "duplicate_request_id")
    if isinstance(error, NoHealthyGroupError):  # /health says so too; retry once one rejoins
        return ApiError(503, f"no DP group can serve now: {error}", None, "unavailable",
                        {"Retry-After": "5"})
    if isinstance(error, OverloadedError):
        code = "shutting_down" if error.reason == "shutting_down" else "overloaded"
        return ApiError(503, str(error), None, code, {"Retry-After": str(error.retry_after_s)})
    if isinstance(error, RequestTooLargeError):
        return ApiError(400, str(error), error.field, "request_too_large")
    log.error("request failed: %s: %s", type(error).__name__, error, exc_info=error)
    return ApiError(500, f"internal error: {type(error).__name__}: {error}")


def sampling_params(req: api.SamplingFields, max_tokens: int, logprobs: int | None,
                    prompt_logprobs: int | None = None, defaults: dict | None = None
                    ) -> SamplingParams | BeamSearchParams:
    """The engine's ``SamplingParams`` for a request of either endpoint (fields it cannot
    honour are a 400 naming them); ``defaults``: the model's values of the sampling fields
    the request leaves unset (``Served.sampling_defaults``)."""
    if getattr(req, "best_of", None) not in (None, req.n):
        raise ApiError(400, "best_of other than n is not supported", "best_of", "unsupported")
    if req.stream_options is not None and not req.stream:
        raise ApiError(400, "stream_options can only be set when stream is true (as in vLLM "
                       "and OpenAI)", "stream_options", "invalid_value")
    if req.prompt_logprobs is not None and req.stream:
        raise ApiError(400, "prompt_logprobs are not available when streaming (as in vLLM)",
                       "prompt_logprobs", "unsupported")
    if req.use_beam_search:
        return beam_search_params(req, max_tokens, logprobs, prompt_logprobs)
    optional = {k: v for k, v in (defaults or {}).items() if k != "max_tokens"}  # served.fit's
    optional |= {k: v for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
                 if (v := getattr(req, k)) is not None}
    try:
        return SamplingParams(
            **optional, n=req.n, seed=req.seed, max_tokens=max_tokens,
            presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
            min_tokens=req.min_tokens, stop=req.stop, stop_token_ids=req.stop_token_ids,
            allowed_token_ids=req.allowed_token_ids, bad_words=req.bad_words,
            ignore_eos=req.ignore_eos, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            include_stop_str_in_output=req.include_stop_str_in_output,
            skip_special_tokens=req.skip_special_tokens, logit_bias=logit_bias(req.logit_bias),
            structured_outputs=structured_outputs(req))
    except SamplingParamsError as error:
        raise engine_error(error) from None


# What beam search does not apply (vLLM ignores them): each field's value that leaves it unset.
NOT_WITH_BEAMS = {"stop": (None, [], ""), "stop_token_ids": (None, []), "min_tokens": (0,),
                  "logit_bias": (None, {}), "allowed_token_ids": (None,), "bad_words": (None, []),
                  "presence_penalty": (0.0,),
                  "frequency_penalty": (0.0,), "repetition_penalty": (None, 1.0),
                  "top_p": (None, 1.0), "top_k": (None, 0, -1), "min_p": (None, 0.0)}


def beam_search_params(req: api.SamplingFields, max_tokens: int, logprobs: int | None,
                       prompt_logprobs: int | None) -> BeamSearchParams:
    """``use_beam_search`` (vLLM's extra): ``n`` beams searched, all returned, best first;
    a field beam search would not honour is a 400 naming it."""
    for field, unset in NOT_WITH_BEAMS.items():
        if getattr(req, field) not in unset:
            raise ApiError(400, f"{field} cannot be used with use_beam_search (beam search "
                           "ranks whole sequences by their log-probability alone)", field,
                           "unsupported")
    found = constraints(req)
    if found:
        raise ApiError(400, f"{next(iter(found))} cannot be used with use_beam_search",
                       next(iter(found)), "unsupported")
    try:
        return BeamSearchParams(
            beam_width=req.n, max_tokens=max_tokens, ignore_eos=req.ignore_eos,
            temperature=0.0 if req.temperature is None else req.temperature,
            length_penalty=req.length_penalty,
            include_stop_str_in_output=req.include_stop_str_in_output, logprobs=logprobs,
            prompt_logprobs=prompt_logprobs, skip_special_tokens=req.skip_special_tokens)
    except SamplingParamsError as error:
        field = str(error).split()[0]
        raise ApiError(400, str(error).replace("beam_width", "n (the beam width)"),
                       "n" if field == "beam_width" else field, "invalid_value") from None


def logit_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI's ``logit_bias`` (token ids as JSON object keys) with integer keys."""
    if not bias:
        return None
    try:
        return {int(t): v for t, v in bias.items()}
    except ValueError:
        raise ApiError(400, "logit_bias keys must be token ids (integers as strings), got "
                       f"{list(bias)[:5]}", "logit_bias", "invalid_value") from None


# -- structured outputs -----------------------------------------------------------------------
GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
          "guided_grammar": "grammar"}  # vLLM's older fields, each one structured_outputs key
OPTIONS = {"disable_any_whitespace", "disable_additional_properties", "disable_fallback",
           "whitespace_pattern"}  # structured_outputs keys that constrain nothing alone


def response_format_fields(value: dict[str, Any] | None) -> dict[str, Any] | None:
    """OpenAI's ``response_format`` as ``StructuredOutputs`` fields; None for plain text (or
    no ``response_format``; one without ``type`` is a 400, as OpenAI and vLLM answer)."""
    if value is None:
        return None
    if "type" not in value:
        raise ApiError(400, "response_format.type is required: 'text', 'json_object' or "
                       "'json_schema'", "response_format", "invalid_value")
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json_object": True}
    if kind != "json_schema":
        raise ApiError(400, "response_format.type must be 'text', 'json_object' or "
                       f"'json_schema', got {kind!r}", "response_format", "unsupported")
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise ApiError(400, "response_format.json_schema is required with type 'json_schema': "
                       "an object with 'name' and 'schema'", "response_format", "invalid_value")
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        why = "is required" if schema is None else f"must be an object, got {schema!r:.40}"
        raise ApiError(400, f"response_format.json_schema.schema {why}: the JSON schema the "
                       "output must match", "response_format", "invalid_value")
    return {"json": schema}


def constraints(req: api.SamplingFields) -> dict[str, dict[str, Any]]:
    """Each request field that constrains the output, as ``StructuredOutputs`` fields (a
    named or required ``tool_choice`` too, last: ``tool_calls.tool_constraint``). A
    ``structured_outputs`` of ``OPTIONS`` alone shapes the constraint another field sets (as
    in vLLM) and is no constraint of its own; an explicit null in it means the default."""
    fmt = response_format_fields(req.response_format)
    guided = {name: {key: getattr(req, name)} for name, key in GUIDED.items()
              if getattr(req, name) is not None}
    tools = tool_constraint(req)
    own = {k: v for k, v in (req.structured_outputs or {}).items() if v is not None}
    found = {} if fmt is None else {"response_format": fmt}
    if req.structured_outputs is not None and (
            set(own) - OPTIONS or not (found or guided or tools)):
        found[STRUCTURED] = own
    return found | guided | ({} if tools is None else {"tool_choice": tools})


def structured_outputs(req: api.SamplingFields) -> StructuredOutputs | None:
    """The request's output constraint (None: free text); more than one is a 400 naming
    them."""
    found = constraints(req)
    if len(found) > 1:
        names = list(found)
        raise ApiError(400, f"only one output constraint per request, got {' and '.join(names)}",
                       names[-1], "invalid_value")
    if not found:
        return None
    options = {k: v for k, v in (req.structured_outputs or {}).items()
               if k in OPTIONS and v is not None}
    if getattr(req, "guided_whitespace_pattern", None) is not None:  # vLLM's older field
        options.setdefault("whitespace_pattern", req.guided_whitespace_pattern)
    try:
        return StructuredOutputs.coerce(options | next(iter(found.values())))
    except SamplingParamsError as error:
        raise constraint_error(engine_error(error), req) from None


def reasoning_for(req: api.SamplingFields, parser: Any) -> Any:
    """The reasoning parser a chat request's reply is read with: none where an output
    constraint (a response format, a named or required tool choice) holds from the first
    token, so the reply cannot think first; a parser whose thinking a template switch turns on
    (``deepseek_v3``) only where the request's ``chat_template_kwargs`` turn it on."""
    if parser is None or constraints(req):
        return None
    return parser.for_template(getattr(req, "chat_template_kwargs", None))


def constraint_error(error: ApiError, req: api.SamplingFields) -> ApiError:
    """``error`` about ``structured_outputs.<key>`` (the engine's names, as when a schema does
    not compile) named after the request field that set the constraint; other errors as
    they are."""
    param = error.param or ""
    if not param.startswith(STRUCTURED):
        return error
    field = next(iter(constraints(req)), STRUCTURED)
    if field == STRUCTURED:
        return ApiError(error.status, error.message, field, error.code)
    if field == "tool_choice":  # the schema came from the functions' parameters
        return ApiError(error.status, "tools: a function's parameters do not compile as a JSON "
                        "schema" + error.message[len(param):], "tools", error.code)
    path = ("response_format.json_schema.schema"
            if (field, param) == ("response_format", f"{STRUCTURED}.json") else field)
    return ApiError(error.status, path + error.message[len(param):], field, error.code)


def truncated(prompt: Prompt, keep: int | None, max_model_len: int,
              max_tokens: int | None = 0) -> Prompt:
    """vLLM's ``truncate_prompt_tokens``: the prompt's last ``keep`` tokens (-1: as many as the
    context holds beside the ``max_tokens`` asked for, at least one when None; embeddings ask
    for none). A cut prompt loses its text, so an echo shows the tokens kept."""
    if keep is None:
        return prompt
    keep = max(max_model_len - output_room(max_tokens), 1) if keep == -1 else keep
    if not 1 <= keep <= max_model_len:
        raise ApiError(400, f"truncate_prompt_tokens must be -1 or in 1..{max_model_len} (the "
                       f"context length), got {keep}", "truncate_prompt_tokens", "invalid_value")
    return prompt if len(prompt[1]) <= keep else (None, prompt[1][-keep:])


def completion_prompts(prompt: Any, tokenizer: Any) -> list[Prompt]:
    """The prompts of a completion request: text, a list of texts, or token id list(s)."""
    items = [prompt] if isinstance(prompt, str) else list(prompt)
    if items and isinstance(items[0], int):
        items = [items]
    if not items:
        raise ApiError(400, "prompt must not be empty", "prompt", "invalid_prompt")
    result: list[Prompt] = []
    for item in items:
        if not item:
            raise ApiError(400, "prompt must not be empty", "prompt", "invalid_prompt")
        if isinstance(item, str):
            if tokenizer is None:
                raise ApiError(400, "this model has no tokenizer; send token ids", "prompt")
            try:
                result.append((item, tokenizer.encode(item)))
            except TokenizerError as error:
                raise ApiError(400, f"prompt: {error}", "prompt", "invalid_prompt") from None
        else:
            result.append((None, list(item)))
    return result


def chat_prompt(req: api.ChatCompletionRequest, tokenizer: Any,
                trust_template: bool = False) -> Prompt:
    if not req.messages:
        raise ApiError(400, "messages must be a non-empty list", "messages", "invalid_value")
    if tokenizer is None:
        raise ApiError(400, "this model has no tokenizer or chat template", "messages")
    text = render_chat(tokenizer, req, trust_template)
    # The template already holds BOS where the model wants it.
    return text, encode_chat(tokenizer, text, False)


def reply_role(req: api.ChatCompletionRequest, response_role: str = "assistant") -> str:
    """The role of a chat reply, as vLLM names it: ``response_role`` (``--response-role``)
    after a generation prompt, else the last message's (a continued final message)."""
    if req.add_generation_prompt or not req.messages:
        return response_role
    return req.messages[-1].get("role") or response_role


def chat_echo(req: api.ChatCompletionRequest, response_role: str = "assistant") -> str:
    """vLLM's chat ``echo``: the last message's text when its role is the reply's
    (``reply_role``), to lead the reply; "" otherwise."""
    if not req.echo or not req.messages:
        return ""
    last = req.messages[-1]
    if last.get("role") != reply_role(req, response_role):
        return ""
    return text_parts_joined(last, len(req.messages) - 1).get("content") or ""


def encode_chat(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    """Rendered chat text to ids; a text the tokenizer refuses is a 400 on ``messages``."""
    try:
        return tokenizer.encode(text, add_special_tokens=add_special_tokens)
    except TokenizerError as error:
        raise ApiError(400, f"messages: {error}", "messages", "invalid_value") from None


def render_chat(tokenizer: Any, req: Any, trust_template: bool = False) -> str:
    """A chat request's prompt text (chat completions and ``/tokenize`` alike): ``messages``
    through the chat template with ``add_generation_prompt``, ``chat_template_kwargs``,
    ``tools`` (rendered even with ``tool_choice`` "none", as vLLM does) and
    ``continue_final_message``. A template the request sends (``chat_template``, or one in
    ``chat_template_kwargs``) replaces the model's where ``trust_template``
    (``--trust-request-chat-template``), else it is a 400: a template is code, and the
    sandbox does not bound its time."""
    try:
        add_generation_prompt, kwargs = chat_template_options(req.add_generation_prompt,
                                                              req.chat_template_kwargs)
        sent = kwargs.pop("chat_template", None)
        template = getattr(req, "chat_template", None)
        field = "chat_template" if template is not None else "chat_template_kwargs"
        template = sent if template is None else template
        if template is not None:
            if not trust_template:
                raise ApiError(400, f"{field}: a chat template sent with the request runs "
                               "only on a server started with --trust-request-chat-template",
                               field, "invalid_value")
            if not isinstance(template, str):
                raise ApiError(400, f"{field}: the chat template must be a string", field,
                               "invalid_value")
            kwargs["chat_template"] = template
        if req.tools:
            kwargs = {"tools": req.tools, **kwargs}
        if req.continue_final_message and add_generation_prompt:
            raise ApiError(400, "continue_final_message needs add_generation_prompt set to "
                           "false", "continue_final_message", "invalid_value")
        text = tokenizer.apply_chat_template(
            req.messages, add_generation_prompt=add_generation_prompt, **kwargs)
    except TokenizerError as error:
        raise ApiError(400, f"messages: {error}", "messages", "invalid_value") from None
    return open_final_message(text, req.messages) if req.continue_final_message else text


def open_final_message(text: str, messages: list[dict[str, Any]]) -> str:
    """``tokenizer.open_final_message``, its error a 400 on ``continue_final_message``."""
    try:
        return tokenizer_open_final_message(text, messages)
    except TokenizerError as error:
        raise ApiError(400, str(error), "continue_final_message", "invalid_value") from None
