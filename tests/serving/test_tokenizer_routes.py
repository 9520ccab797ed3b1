"""/tokenize, /detokenize, /tokenizer_info, /version and /v1/models/{id}, in vLLM's shapes,
checked against the engine's own tokenizer and as lm-evaluation-harness's remote tokenizer
reads them."""

from __future__ import annotations

import httpx
import jinja2

from tests.serving.real_server import text_server_fixture

server = text_server_fixture()


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=60)


def test_tokenize_a_prompt_equals_the_engine_tokenizer(server):
    tok = server.engine.tokenizer
    r = post(server, "/tokenize", {"prompt": "Hello, world", "return_token_strs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == tok.encode("Hello, world") and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == server.engine.max_model_len
    assert body["token_strs"] == [tok.id_to_token(i) for i in body["tokens"]]
    plain = post(server, "/tokenize", {"prompt": "Hello", "add_special_tokens": False}).json()
    assert plain["tokens"] == tok.encode("Hello", add_special_tokens=False)
    assert plain["token_strs"] is None


def test_tokenize_messages_counts_what_chat_completions_charges(server):
    messages = [{"role": "user", "content": "hi there"}]
    counted = post(server, "/tokenize", {"messages": messages}).json()["count"]
    r = post(server, "/v1/chat/completions", {"model": server.engine.model_name,
                                              "messages": messages, "max_tokens": 1})
    assert r.json()["usage"]["prompt_tokens"] == counted


def test_detokenize_round_trips_and_checks_the_vocabulary(server):
    ids = post(server, "/tokenize", {"prompt": "ünïcode ok", "add_special_tokens": False})
    back = post(server, "/detokenize", {"tokens": ids.json()["tokens"]})
    assert back.status_code == 200 and back.json() == {"prompt": "ünïcode ok"}
    bad = post(server, "/detokenize", {"tokens": [1, 10**6]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def test_bad_tokenize_requests_are_400s(server):
    assert post(server, "/tokenize", {}).status_code == 400
    both = {"prompt": "a", "messages": [{"role": "user", "content": "a"}]}
    assert post(server, "/tokenize", both).status_code == 400
    assert post(server, "/tokenize", {"prompt": "a", "model": "other"}).status_code == 404
    bad_chat = post(server, "/tokenize", {"messages": [{"content": "no role"}]})
    assert bad_chat.status_code == 400 and bad_chat.json()["error"]["param"] == "messages"


def test_lm_eval_remote_tokenizer_contract(server):
    """What lm-eval's RemoteTokenizer reads: eos/bos strings that encode to their ids with
    add_special_tokens False, a chat template it renders itself, and decode."""
    info = httpx.get(server.url + "/tokenizer_info").json()
    tok = server.engine.tokenizer
    assert info["eos_token"] is not None and "eos_token" in info
    eos = post(server, "/tokenize", {"prompt": info["eos_token"], "add_special_tokens": False})
    assert eos.json()["tokens"][0] == tok.eos_token_id == info["eos_token_id"]
    rendered = jinja2.Environment().from_string(info["chat_template"]).render(
        messages=[{"role": "user", "content": "x"}], add_generation_prompt=True)
    assert rendered == tok.apply_chat_template([{"role": "user", "content": "x"}])
    assert info["model_max_length"] == server.engine.max_model_len


def test_version_and_model_card(server):
    assert httpx.get(server.url + "/version").json()["version"]
    name = server.engine.model_name
    card = httpx.get(f"{server.url}/v1/models/{name}")
    assert card.status_code == 200 and card.json()["id"] == name
    missing = httpx.get(server.url + "/v1/models/nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_tokenize_messages_takes_tools_and_continue_final_message_as_chat_does(server):
    """``/tokenize`` renders ``messages`` exactly as chat completions does, with vLLM's
    ``tools`` and ``continue_final_message`` (it ignored both)."""
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure"}]
    body = {"messages": messages, "add_generation_prompt": False,
            "continue_final_message": True}
    got = httpx.post(f"{server.url}/tokenize", json=body).json()
    text = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nSure"
    assert got["tokens"] == server.engine.tokenizer.encode(text, add_special_tokens=False)
    bad = httpx.post(f"{server.url}/tokenize", json={**body, "add_generation_prompt": True})
    assert bad.status_code == 400 and "continue_final_message" in bad.text
    tok = server.engine.tokenizer
    plain_template = tok.chat_template
    tok.chat_template = "{% for t in tools or [] %}[{{ t['name'] }}]{% endfor %}" + plain_template
    try:
        with_tools = httpx.post(f"{server.url}/tokenize",
                                json={"messages": messages[:1], "tools": [{"name": "f"}]}).json()
        without = httpx.post(f"{server.url}/tokenize", json={"messages": messages[:1]}).json()
    finally:
        tok.chat_template = plain_template
    assert with_tools["count"] == without["count"] + len("[f]")
