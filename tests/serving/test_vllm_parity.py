"""vLLM server parity, with the ``openai`` client against the real engine (tiny golden Llama):
``stream_options.include_usage``, several ``--served-model-name``s, ``--chat-template FILE``,
and chat ``logprobs`` in OpenAI's ``choices[].logprobs.content[].top_logprobs`` form."""

from __future__ import annotations

import httpx
import openai
import pytest

from serving.entrypoints.cli_args import build_parser
from serving.entrypoints.server import load_chat_template
from tests.serving.fake_engine import client, serve
from tests.serving.real_server import text_server_fixture

base = text_server_fixture()
NAMES = ["tiny-llama", "alias-b", "alias-c"]
TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}[assistant] {% endif %}")
CHAT = [{"role": "user", "content": "Name a river."}]


@pytest.fixture(scope="module")
def server(base, tmp_path_factory):
    """The engine served under several names with a chat template from a file."""
    path = tmp_path_factory.mktemp("template") / "template.jinja"
    path.write_text(TEMPLATE)
    args = build_parser().parse_args(["serve", "--served-model-name", *NAMES,
                                      "--chat-template", str(path)])
    tokenizer = base.engine.tokenizer
    model_template = tokenizer.chat_template
    try:
        with serve(base.engine, served_model_names=args.served_model_name,
                   chat_template=load_chat_template(args.chat_template)) as running:
            running.engine = base.engine
            yield running
    finally:
        tokenizer.chat_template = model_template


def test_include_usage_ends_streams_with_a_usage_chunk(server):
    c = client(server)
    full = c.chat.completions.create(model=NAMES[0], messages=CHAT, max_tokens=5,
                                     temperature=0, extra_body={"ignore_eos": True})
    chunks = list(c.chat.completions.create(model=NAMES[0], messages=CHAT, max_tokens=5,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    assert all(ch.usage is None for ch in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks[:-1])
    assert text == full.choices[0].message.content
    plain = list(c.completions.create(model=NAMES[1], prompt=[5, 6, 7], max_tokens=3,
                                      stream=True, stream_options={"include_usage": True},
                                      extra_body={"ignore_eos": True}))
    usage = plain[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (3, 3, 6)
    assert plain[-1].choices == [] and plain[-1].model == NAMES[1]
    no_usage = list(c.completions.create(model=NAMES[1], prompt=[5, 6, 7], max_tokens=3,
                                         stream=True))
    assert all(ch.usage is None and ch.choices for ch in no_usage)


def test_every_served_name_answers_under_its_own_name(server):
    c = client(server)
    assert [m.id for m in c.models.list().data] == NAMES
    for name in NAMES:
        reply = c.completions.create(model=name, prompt=[5, 6, 7], max_tokens=2)
        assert reply.model == name
        assert c.models.retrieve(name).id == name
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model=server.engine.model_name + "-other", prompt=[5], max_tokens=1)


def test_chat_template_file_replaces_the_models(server):
    tok = server.engine.tokenizer
    rendered = "[user] Name a river.\n[assistant] "
    assert tok.apply_chat_template(CHAT) == rendered
    info = httpx.get(server.url + "/tokenizer_info").json()
    assert info["chat_template"] == TEMPLATE
    counted = httpx.post(server.url + "/tokenize", json={"messages": CHAT}).json()["count"]
    reply = client(server).chat.completions.create(model=NAMES[2], messages=CHAT, max_tokens=1)
    assert reply.usage.prompt_tokens == counted == len(tok.encode(rendered,
                                                                   add_special_tokens=False))
    assert load_chat_template("{{ messages }}") == "{{ messages }}"
    with pytest.raises(Exception, match="neither a file"):
        load_chat_template("/no/such/template.jinja")


def test_chat_logprobs_in_openai_form(server):
    c = client(server)
    kwargs = dict(model=NAMES[0], messages=CHAT, max_tokens=4, temperature=0, logprobs=True,
                  top_logprobs=3, extra_body={"ignore_eos": True})
    reply = c.chat.completions.create(**kwargs)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens == 4
    for entry in content:
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert entry.logprob == tops[0]  # greedy: the chosen token is the likeliest
        assert entry.bytes == list(entry.token.encode())
    streamed = [e for ch in c.chat.completions.create(**kwargs, stream=True)
                if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    bare = c.chat.completions.create(**{**kwargs, "top_logprobs": None})
    assert all(e.top_logprobs == [] for e in bare.choices[0].logprobs.content)


def test_allowed_token_ids_and_bad_words(server):
    """vLLM's extra_body fields reach the sampler: every token from the allowed set, and a bad
    word's last token never right after its first; out-of-vocabulary ids are a 400."""
    tok = server.engine.tokenizer
    letters = tok.encode("abcdefgh", add_special_tokens=False)
    body = dict(prompt="Name a river:", max_tokens=16, temperature=0, ignore_eos=True,
                allowed_token_ids=letters)
    free = client(server).completions.create(model=NAMES[0], **_split(body))
    ids = tok.encode(free.choices[0].text, add_special_tokens=False)
    assert len(ids) == 16 and set(ids) <= set(letters)
    word = tok.decode(ids[:2])
    banned = client(server).completions.create(model=NAMES[0],
                                               **_split(dict(body, bad_words=[word])))
    text = banned.choices[0].text
    assert text[0] == word[0] and word not in text
    r = httpx.post(server.url + "/v1/completions", timeout=60,
                   json=dict(body, model=NAMES[0], allowed_token_ids=[1, 10**6]))
    assert r.status_code == 400 and r.json()["error"]["param"] == "allowed_token_ids"
    # allowed ids that a JSON output cannot start with: a short 400 naming allowed_token_ids
    # (it was a ~1 KB dump of the grammar parser's state named after response_format)
    r = httpx.post(server.url + "/v1/completions", timeout=60,
                   json=dict(body, model=NAMES[0], response_format={"type": "json_object"}))
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "allowed_token_ids", error
    assert "<state>" not in error["message"] and len(error["message"]) < 500, error


def _split(body: dict) -> dict:
    """OpenAI's fields as arguments, vLLM's in ``extra_body``."""
    known = {"prompt", "max_tokens", "temperature"}
    return {k: v for k, v in body.items() if k in known} | {
        "extra_body": {k: v for k, v in body.items() if k not in known}}
