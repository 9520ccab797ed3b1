"""``xds serve``'s OpenAI front-end options, as ``vllm serve`` spells them: the chat template,
tool calls, reasoning, logprob tokens, request templates and CORS."""

from __future__ import annotations

import argparse
import json


def parse_json(text: str):
    """An option's JSON value; not JSON is the option's error."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None


def json_strings(text: str) -> list[str]:
    """A JSON list of strings (``--allowed-origins '["https://a.example"]'``)."""
    value = parse_json(text)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise argparse.ArgumentTypeError('expected a JSON list of strings, e.g. ["*"]')
    return value


def add_openai_frontend_options(parser: argparse.ArgumentParser) -> None:
    """vLLM's OpenAI-frontend options (``--served-model-name`` is in the server group)."""
    from serving.entrypoints.reasoning import PARSERS as REASONING_PARSERS
    from serving.entrypoints.tool_calls import PARSERS

    group = parser.add_argument_group("OpenAI frontend (as vllm serve)")
    group.add_argument("--chat-template", metavar="FILE",
                       help="Jinja chat template replacing the model's (a file, or the "
                       "template text itself) for chat completions, /tokenize and "
                       "/tokenizer_info")
    group.add_argument("--enable-auto-tool-choice", action="store_true",
                       help='serve tool_choice "auto" (the default when tools are sent): '
                       "the --tool-call-parser reads the calls out of the reply; without it "
                       '"auto" is answered 400 (docs/server.md#tool-calling)')
    group.add_argument("--tool-call-parser", choices=sorted(PARSERS), metavar="NAME",
                       help="how the model writes tool calls, for --enable-auto-tool-choice: "
                       f"{', '.join(sorted(PARSERS))} (hermes: Qwen2.5 and Hermes "
                       "<tool_call> blocks; llama3_json: Llama 3.1/3.2 JSON calls; "
                       "deepseek_v3: DeepSeek-V3 and R1; deepseek_v31: DeepSeek-V3.1; glm45: "
                       "GLM-4.5/4.6; qwen3_coder: Qwen3-Coder)")
    group.add_argument("--reasoning-parser", choices=sorted(REASONING_PARSERS), metavar="NAME",
                       help="split chat replies of a thinking model into reasoning_content "
                       f"and content: {', '.join(sorted(REASONING_PARSERS))} (deepseek_r1: "
                       "DeepSeek-R1 and its distillations; qwen3, glm45: Qwen3's and GLM-4.5's "
                       "<think> blocks; "
                       "deepseek_v3: V3.1 and later, where chat_template_kwargs set thinking)")
    group.add_argument("--return-tokens-as-token-ids", action="store_true",
                       help='name logprob tokens "token_id:N" (for tokens whose text is no '
                       "valid UTF-8 alone) unless a request's return_tokens_as_token_ids "
                       "says otherwise")
    group.add_argument("--trust-request-chat-template", action="store_true",
                       help="apply a chat template a request sends (chat_template, or "
                       "chat_template_kwargs.chat_template); without it such a request is "
                       "answered 400, as vLLM does (a template is code the server runs)")


def add_cors_options(parser: argparse.ArgumentParser) -> None:
    """CORS for browser clients, vLLM's flags and defaults (every origin, method and header;
    no credentials)."""
    group = parser.add_argument_group("CORS (as vllm serve)")
    for flag, what in (("--allowed-origins", "origins browsers may call from, a JSON list"),
                       ("--allowed-methods", "HTTP methods allowed across origins"),
                       ("--allowed-headers", "request headers allowed across origins")):
        group.add_argument(flag, type=json_strings, default=["*"], metavar="JSON",
                           help=f'{what} (default: ["*"])')
    group.add_argument("--allow-credentials", action="store_true",
                       help="let cross-origin requests carry cookies and authorization")
