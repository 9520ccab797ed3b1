"""Chat templates a request sends, and CORS, as ``vllm serve`` handles them: a template in
``chat_template`` (or ``chat_template_kwargs.chat_template``) is code the server would run on
a tokenizer thread with no time bound, so it is a 400 unless the server was started with
``--trust-request-chat-template``, and then it replaces the model's (it was applied from the
kwargs without a word, and ignored in ``chat_template``); browsers' CORS preflights are
answered (they were 405)."""

from __future__ import annotations

import httpx
import pytest

from serving.entrypoints.cli_args import build_parser
from serving.entrypoints.server import cors_options
from tests.serving.fake_engine import FakeEngine, serve
from tests.serving.real_server import CHATML

MINE = "X{% for m in messages %}{{ m['content'] }}{% endfor %}"
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def servers():
    """The tiny golden Llama with a byte tokenizer, behind two servers: (untrusted, trusted)."""
    from serving.core import async_engine as engines
    from tests.helpers import GOLDEN
    from xds_jax.text.byte_tokenizer import byte_tokenizer

    engine = engines.AsyncEngine.from_args(engines.EngineArgs(
        model=str(GOLDEN / "llama"), dtype="float32", max_num_seqs=4, kv_cache_bytes=8 << 20))
    tokenizer = byte_tokenizer(engine.llm.cfg)
    tokenizer.chat_template = CHATML
    engine.tokenizer = engine.llm.tokenizer = tokenizer
    engine.start()
    try:
        with serve(engine) as plain, serve(engine, trust_request_chat_template=True) as trusted:
            yield plain, trusted, tokenizer
    finally:
        engine.shutdown()


def chat(server, **extra) -> httpx.Response:
    return httpx.post(server.url + "/v1/chat/completions", timeout=120,
                      json={"messages": HI, "max_tokens": 2, "temperature": 0, **extra})


def tokenize(server, **extra) -> httpx.Response:
    return httpx.post(server.url + "/tokenize", json={"messages": HI, **extra})


@pytest.mark.parametrize("field", ["chat_template", "chat_template_kwargs"])
def test_a_request_s_template_is_refused_without_the_flag(servers, field):
    plain, _, tokenizer = servers
    sent = {field: MINE if field == "chat_template" else {"chat_template": MINE}}
    for reply in (chat(plain, **sent), tokenize(plain, **sent)):
        assert reply.status_code == 400, reply.text
        error = reply.json()["error"]
        assert error["param"] == field and "--trust-request-chat-template" in error["message"]
    model_s = tokenizer.encode(tokenizer.apply_chat_template(HI), add_special_tokens=False)
    assert chat(plain).json()["usage"]["prompt_tokens"] == len(model_s)  # still serving


@pytest.mark.parametrize("field", ["chat_template", "chat_template_kwargs"])
def test_a_trusted_request_s_template_replaces_the_model_s(servers, field):
    _, trusted, tokenizer = servers
    sent = {field: MINE if field == "chat_template" else {"chat_template": MINE}}
    want = tokenizer.encode("Xhi", add_special_tokens=False)
    assert tokenize(trusted, **sent).json()["tokens"] == want
    reply = chat(trusted, **sent)
    assert reply.status_code == 200 and reply.json()["usage"]["prompt_tokens"] == len(want)
    model_s = tokenizer.encode(tokenizer.apply_chat_template(HI), add_special_tokens=False)
    assert tokenize(trusted).json()["tokens"] == model_s  # the next request: the model's


@pytest.mark.parametrize("template", ["{{ 1 / 0 }}", "{{ range(10 ** 30) | list }}",
                                      "{% for m in messages %}", "{{ messages[9]['x'] }}",
                                      "{{ raise_exception('no system turns') }}"])
def test_a_failing_request_template_is_a_400(servers, template):
    """Python's errors inside the template (division by zero, an overflowing range) were
    500s; Jinja's own were 400s already."""
    _, trusted, _ = servers
    for reply in (chat(trusted, chat_template=template),
                  tokenize(trusted, chat_template=template)):
        assert reply.status_code == 400, reply.text
        assert "chat template failed" in reply.json()["error"]["message"]


def test_a_template_that_is_no_string_is_a_400(servers):
    _, trusted, _ = servers
    reply = chat(trusted, chat_template_kwargs={"chat_template": ["not", "a", "template"]})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "chat_template_kwargs"


PREFLIGHT = {"Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization,content-type"}


def test_cors_is_open_by_default_and_preflights_need_no_key():
    with serve(FakeEngine(), api_key="secret") as server:
        url = server.url + "/v1/chat/completions"
        origin = {"Origin": "https://app.example"}
        reply = httpx.options(url, headers=origin | PREFLIGHT)
        assert reply.status_code == 200
        assert reply.headers["access-control-allow-origin"] == "*"
        assert "POST" in reply.headers["access-control-allow-methods"]
        reply = httpx.get(server.url + "/v1/models",
                          headers=origin | {"Authorization": "Bearer secret"})
        assert reply.status_code == 200 and reply.headers["access-control-allow-origin"] == "*"
        assert httpx.get(server.url + "/v1/models", headers=origin).status_code == 401


def test_allowed_origins_from_the_command_line():
    args = build_parser().parse_args(["serve", "--allowed-origins", '["https://a.example"]',
                                      "--allow-credentials"])
    options = cors_options(args)
    assert options == {"allow_origins": ["https://a.example"], "allow_methods": ["*"],
                       "allow_headers": ["*"], "allow_credentials": True}
    with serve(FakeEngine(), cors=options) as server:
        url = server.url + "/v1/completions"
        allowed = httpx.options(url, headers={"Origin": "https://a.example"} | PREFLIGHT)
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "https://a.example"
        assert allowed.headers["access-control-allow-credentials"] == "true"
        other = httpx.options(url, headers={"Origin": "https://b.example"} | PREFLIGHT)
        assert other.status_code == 400
        assert "access-control-allow-origin" not in other.headers
    for bad in ("https://a.example", '{"origin": 1}', "[1]"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", "--allowed-origins", bad])
