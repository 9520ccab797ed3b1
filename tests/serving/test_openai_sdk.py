"""The server through the ``openai`` SDK on the real engine (tiny golden Llama, byte tokenizer,
ChatML): request shapes other clients send and vLLM accepts, answered as vLLM answers them."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.serving.fake_engine import client
from tests.serving.real_server import text_server_fixture

server = text_server_fixture()
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def sdk(server) -> openai.OpenAI:
    return client(server)


def test_explicit_nulls_take_the_defaults(server, sdk):
    """Clients that send every field send unset ones as null; the OpenAI spec marks these
    nullable and vLLM takes null as the default (they were 400s)."""
    nulls = dict(n=None, stream=None, presence_penalty=None, frequency_penalty=None,
                 extra_body={"min_tokens": None, "ignore_eos": None, "skip_special_tokens": None,
                             "include_stop_str_in_output": None})
    model = server.engine.model_name
    done = sdk.completions.create(model=model, prompt=[5, 6, 7], max_tokens=3, temperature=0,
                                  echo=None, **nulls)
    plain = sdk.completions.create(model=model, prompt=[5, 6, 7], max_tokens=3, temperature=0)
    assert [c.text for c in done.choices] == [c.text for c in plain.choices]
    chat = sdk.chat.completions.create(model=model, messages=HI, max_tokens=2, logprobs=None,
                                       stream_options=None, temperature=0, **nulls)
    plain = sdk.chat.completions.create(model=model, messages=HI, max_tokens=2, temperature=0)
    assert len(chat.choices) == 1 and chat.choices[0].logprobs is None
    assert chat.choices[0].message.content == plain.choices[0].message.content
    assert chat.usage == plain.usage and chat.usage.completion_tokens <= 2
    # an unseeded sampled reply may end at its first token (EOS drawn); never past max_tokens
    sampled = sdk.chat.completions.create(model=model, messages=HI, max_tokens=2, **nulls)
    assert sampled.usage.completion_tokens == 2 or sampled.choices[0].finish_reason == "stop"


def test_continuous_usage_stats(server, sdk):
    """vLLM's ``stream_options.continuous_usage_stats``: every chunk carries the usage so far
    (it was accepted and ignored: every chunk said null)."""
    chunks = list(sdk.chat.completions.create(
        model=server.engine.model_name, messages=HI, max_tokens=4, temperature=0, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True},
        extra_body={"ignore_eos": True}))
    usages = [chunk.usage for chunk in chunks]
    assert all(u is not None and u.total_tokens == u.prompt_tokens + u.completion_tokens
               for u in usages)
    counts = [u.completion_tokens for u in usages]
    assert counts == sorted(counts) and counts[0] == 0 and counts[-1] == 4
    assert chunks[-1].choices == [] and len({u.prompt_tokens for u in usages}) == 1


def test_continuous_usage_stats_counts_each_choice_s_own_tokens(server, sdk):
    """With several prompts and samples each chunk's usage is its choice's (its prompt's
    tokens, its own completion tokens), as vLLM reports it; the last chunk holds the totals."""
    chunks = list(sdk.completions.create(
        model=server.engine.model_name, prompt=[[5, 6, 7], [8, 9]], n=2, max_tokens=3,
        temperature=0, stream=True, extra_body={"ignore_eos": True},
        stream_options={"include_usage": True, "continuous_usage_stats": True}))
    seen: dict[int, list[int]] = {}
    for chunk in chunks[:-1]:
        [choice] = chunk.choices
        assert chunk.usage.prompt_tokens == (3 if choice.index < 2 else 2)
        seen.setdefault(choice.index, []).append(chunk.usage.completion_tokens)
    assert sorted(seen) == [0, 1, 2, 3]
    assert all(counts == sorted(counts) and counts[-1] == 3 for counts in seen.values())
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (5, 12)


def test_continue_final_message(server, sdk):
    """vLLM's assistant prefill: ``continue_final_message`` ends the prompt inside the last
    message, so the reply is what a completion of that text gives (it was ignored: the turn
    was closed and a new one opened)."""
    model = server.engine.model_name
    messages = [*HI, {"role": "assistant", "content": "Sure, the answer"}]
    text = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nSure, the answer"
    ids = httpx.post(server.url + "/tokenize", json={
        "model": model, "prompt": text, "add_special_tokens": False}).json()["tokens"]
    chat = sdk.chat.completions.create(
        model=model, messages=messages, max_tokens=6, temperature=0,
        extra_body={"continue_final_message": True, "add_generation_prompt": False,
                    "ignore_eos": True})
    same = sdk.completions.create(model=model, prompt=ids, max_tokens=6, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert chat.usage.prompt_tokens == len(ids)
    assert chat.choices[0].message.content == same.choices[0].text
    with pytest.raises(openai.BadRequestError) as error:
        sdk.chat.completions.create(model=model, messages=messages, max_tokens=1,
                                    extra_body={"continue_final_message": True})
    assert error.value.param == "continue_final_message"


def test_chat_echo(server, sdk):
    """vLLM's chat ``echo``: a reply continuing the last message (its role is the reply's)
    starts with that message's text, streamed or not; after a generation prompt the last
    message is the user's and nothing is echoed (it was ignored)."""
    model = server.engine.model_name
    messages = [*HI, {"role": "assistant", "content": [{"type": "text", "text": "Sure,"},
                                                       {"type": "text", "text": "the"}]}]
    extra = {"continue_final_message": True, "add_generation_prompt": False,
             "ignore_eos": True}
    kwargs = dict(model=model, messages=messages, max_tokens=5, temperature=0)
    plain = sdk.chat.completions.create(**kwargs, extra_body=extra)
    echoed = sdk.chat.completions.create(**kwargs, extra_body={**extra, "echo": True})
    assert echoed.choices[0].message.content == "Sure,\nthe" + plain.choices[0].message.content
    assert echoed.usage == plain.usage
    chunks = list(sdk.chat.completions.create(**kwargs, stream=True,
                                              extra_body={**extra, "echo": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == \
        echoed.choices[0].message.content
    fresh = sdk.chat.completions.create(model=model, messages=HI, max_tokens=3, temperature=0,
                                        extra_body={"echo": True, "ignore_eos": True})
    alone = sdk.chat.completions.create(model=model, messages=HI, max_tokens=3, temperature=0,
                                        extra_body={"ignore_eos": True})
    assert fresh.choices[0].message.content == alone.choices[0].message.content


def test_truncate_prompt_tokens(server, sdk):
    """vLLM's ``truncate_prompt_tokens`` keeps a prompt's last k tokens (it was ignored: a
    prompt over the context got the 400 the client asked to avoid)."""
    model, ids = server.engine.model_name, list(range(3, 303))  # 300 tokens > 256
    greedy = dict(model=model, max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
    cut = sdk.completions.create(prompt=ids, **greedy | {"extra_body": {
        "ignore_eos": True, "truncate_prompt_tokens": 100}})
    tail = sdk.completions.create(prompt=ids[-100:], **greedy)
    assert cut.usage.prompt_tokens == 100 and cut.choices[0].text == tail.choices[0].text
    chat = sdk.chat.completions.create(messages=[{"role": "user", "content": "x" * 400}],
                                       **greedy | {"extra_body": {"truncate_prompt_tokens": 200}})
    assert chat.usage.prompt_tokens == 200 and chat.usage.completion_tokens == 4
    # -1: as much of the prompt as the context holds beside the output asked for
    most = sdk.completions.create(prompt=ids, **greedy | {"extra_body": {
        "ignore_eos": True, "truncate_prompt_tokens": -1}})
    assert most.usage.prompt_tokens == 252 and most.usage.completion_tokens == 4
    scored = sdk.completions.create(prompt=ids, model=model, max_tokens=0, echo=True,
                                    extra_body={"truncate_prompt_tokens": -1})
    assert scored.usage.prompt_tokens == 256  # scoring only: the whole context
    with pytest.raises(openai.BadRequestError) as error:
        sdk.completions.create(prompt=ids, **greedy | {"extra_body": {
            "truncate_prompt_tokens": 300}})
    assert error.value.param == "truncate_prompt_tokens" and "256" in error.value.message


def test_prompt_logprobs(server, sdk):
    """vLLM's ``prompt_logprobs``: per prompt token ``{token id: {logprob, rank,
    decoded_token}}``, on each completion choice and on a chat response (it was ignored)."""
    model, ids = server.engine.model_name, [5, 6, 7, 8]
    done = sdk.completions.create(model=model, prompt=ids, max_tokens=1,
                                  extra_body={"prompt_logprobs": 2})
    echo = sdk.completions.create(model=model, prompt=ids, max_tokens=0, echo=True, logprobs=2)
    scored = done.choices[0].model_extra["prompt_logprobs"]
    assert len(scored) == len(ids) and scored[0] is None
    want = echo.choices[0].logprobs.token_logprobs[1:]
    assert [entries[str(t)]["logprob"] for entries, t in zip(scored[1:], ids[1:],
                                                              strict=True)] == want
    assert all(2 <= len(entries) <= 3 and {e["rank"] for e in entries.values()} >= {1, 2}
               for entries in scored[1:])
    chat = sdk.chat.completions.create(model=model, messages=HI, max_tokens=1,
                                       extra_body={"prompt_logprobs": 0})
    assert len(chat.model_extra["prompt_logprobs"]) == chat.usage.prompt_tokens
    with pytest.raises(openai.BadRequestError) as error:
        sdk.completions.create(model=model, prompt=ids, max_tokens=1, stream=True,
                               extra_body={"prompt_logprobs": 1})
    assert error.value.param == "prompt_logprobs"


def test_echo_of_special_tokens_keeps_the_prompt_logprobs(server, sdk):
    """An echoed token-id prompt of special tokens only leads the logprobs with its scored
    tokens, streamed or not (they were dropped, shifting the indices lm-eval's loglikelihood
    reads), and its text spells them, as vLLM's does and as the logprob tokens do."""
    model, ids = server.engine.model_name, [1, 2, 1]  # BOS, EOS, BOS
    echo = dict(model=model, prompt=ids, echo=True, logprobs=1, temperature=0)
    scored = sdk.completions.create(max_tokens=0, **echo).choices[0]
    assert len(scored.logprobs.tokens) == 3
    specials = server.engine.tokenizer.decode(ids, skip_special_tokens=False)
    assert scored.text == "".join(scored.logprobs.tokens) == specials and specials
    assert scored.logprobs.token_logprobs[0] is None
    assert all(lp < 0 for lp in scored.logprobs.token_logprobs[1:])
    done = sdk.completions.create(max_tokens=2, extra_body={"ignore_eos": True}, **echo)
    lp = done.choices[0].logprobs
    assert lp.token_logprobs[:3] == scored.logprobs.token_logprobs and len(lp.tokens) == 5
    chunks = list(sdk.completions.create(max_tokens=2, stream=True,
                                         extra_body={"ignore_eos": True}, **echo))
    assert "".join(c.choices[0].text for c in chunks) == done.choices[0].text
    streamed = [c.choices[0].logprobs for c in chunks]
    assert sum((s.token_logprobs for s in streamed), []) == lp.token_logprobs
    assert sum((s.text_offset for s in streamed), []) == lp.text_offset


def test_echo_text_offsets_count_on_past_the_prompt_tokens(server, sdk):
    """``text_offset`` counts the token strings (vLLM's): a prompt whose tokens each hold part
    of a character ("é" is two byte tokens, each shown as U+FFFD) is two characters long in
    them, one in its echoed text; the generated tokens' offsets continue after the prompt's
    (they restarted at the echoed text's length, inside the prompt's own). The BOS token's
    string spells it."""
    echo = dict(model=server.engine.model_name, prompt="é", echo=True, logprobs=0,
                max_tokens=2, temperature=0, extra_body={"ignore_eos": True})
    done = sdk.completions.create(**echo)
    lp, first = done.choices[0].logprobs, done.usage.prompt_tokens  # BOS and two bytes
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(lp.tokens))]
    bos = server.engine.tokenizer.decode([server.engine.tokenizer.bos_token_id],
                                         skip_special_tokens=False)
    assert lp.tokens[0] == bos != ""  # spelled, as vLLM's tokenizer.decode(token_id) does
    assert lp.text_offset[first] == len(bos) + 2 and done.choices[0].text.startswith("é")
    chunks = list(sdk.completions.create(stream=True, **echo))
    assert sum((c.choices[0].logprobs.text_offset for c in chunks), []) == lp.text_offset


def test_logit_bias(server, sdk):
    """OpenAI's ``logit_bias`` (it was a 400): +100 makes a token the greedy pick at every
    step, streamed or not, on both endpoints; bad keys and ids outside the vocabulary are 400s
    naming the field."""
    model = server.engine.model_name
    h, i = (server.engine.tokenizer.encode(c, add_special_tokens=False)[0] for c in "hi")
    done = sdk.completions.create(model=model, prompt=[5, 6, 7], max_tokens=4, temperature=0,
                                  logit_bias={str(h): 100}, logprobs=0,
                                  extra_body={"ignore_eos": True})
    assert done.choices[0].text == "hhhh"
    chunks = sdk.chat.completions.create(model=model, messages=HI, max_tokens=3, temperature=0.7,
                                         seed=2, logit_bias={str(i): 100}, stream=True,
                                         extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "iii"
    for bias in ({"x": 1}, {"-3": 1}, {str(10**6): 1}):
        with pytest.raises(openai.BadRequestError) as error:
            sdk.completions.create(model=model, prompt=[5], max_tokens=1, logit_bias=bias)
        assert "logit_bias" in str(error.value)


def test_tools_with_tool_choice_none_reach_the_chat_template(server, sdk):
    """vLLM renders ``tools`` into the prompt even when ``tool_choice`` is "none" (the model
    may not call them, but reads them); they were dropped."""
    tok = server.engine.tokenizer
    plain_template = tok.chat_template
    tok.chat_template = ("{% for t in tools or [] %}<tool:{{ t['function']['name'] }}>"
                         "{% endfor %}" + plain_template)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    try:
        kw = dict(model=server.engine.model_name, messages=HI, max_tokens=1, temperature=0)
        without = sdk.chat.completions.create(**kw).usage.prompt_tokens
        with_tools = sdk.chat.completions.create(**kw, tools=tools, tool_choice="none")
    finally:
        tok.chat_template = plain_template
    assert with_tools.usage.prompt_tokens == without + len("<tool:get_weather>")  # byte tokens
