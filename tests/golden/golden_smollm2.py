"""The SmolLM2 golden files (``smollm2.json``, ``smollm2_logits.npz``) for make_golden.py.

SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to float32 by transformers): prompts and chat
renderings with greedy continuations, tokenizer cases and special tokens; the last-position
logits of the plain prompt and 16 greedy margins. README.md gives the meaning of every key.
"""

import json
import logging
import re
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers as tf
from make_golden import GOLDEN_DIR, NEW_TOKENS, greedy_margins

log = logging.getLogger("make_golden")

TOKENIZER_CASES = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "   leading spaces",
    "trailing spaces   ",
    "multiple    spaces   between  words",
    "line one\nline two\n\n\nline five",
    "tab\tseparated\tvalues\r\nand CRLF",
    "Numbers: 0 7 42 1234567890 3.14159 -12,345",
    "Punctuation!?.,;:'\"()[]{}<>-_/\\@#$%^&*~`|",
    "def add(a, b):\n    return a + b  # sum\n",
    "Café naïve façade résumé Ångström Ærøskøbing",
    "中文分词测试，日本語のテキスト、한국어",
    "Emoji: 😀🚀👍🏽 ❤️ 🇫🇷",
    "<|im_start|>user\nhi<|im_end|>",
    "",
]
LONG_PROSE = (
    "The history of the printing press begins in the fifteenth century, when Johannes "
    "Gutenberg combined movable metal type, oil-based ink and a wooden screw press into a "
    "single practical system. Before his invention, books were copied by hand, a slow and "
    "expensive process that kept written knowledge in the hands of a few monasteries, courts "
    "and universities. Within fifty years of the first printed Bible, presses had spread to "
    "more than two hundred cities across Europe, and millions of volumes were in circulation. "
    "Historians still debate how much this change contributed to"
)
CHAT_CASES = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are a terse geography tutor. Answer in one sentence."},
        {"role": "user", "content": "Which river flows through Paris?"},
    ],
]


def compact_json(obj) -> str:
    """Indented JSON with lists of numbers kept on one line."""
    text = json.dumps(obj, indent=2, ensure_ascii=False)
    return re.sub(r"\[\s+([-\d.,\se]+?)\s+\]", lambda m: "[" + " ".join(m[1].split()) + "]", text)


def smollm2_case(tok, model, text: str, chat: bool, messages=None) -> tuple[dict, np.ndarray]:
    """Greedy 32-token continuation of one prompt; also returns the per-step margins [N]."""
    ids = tok.encode(text, add_special_tokens=not chat)
    gen = model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        do_sample=False,
        max_new_tokens=32,
        output_logits=True,
        return_dict_in_generate=True,
    )
    new = gen.sequences[0, len(ids) :].tolist()
    _, margin = greedy_margins(gen.logits)
    case = {"text": text, "chat": chat}
    if messages is not None:
        case["messages"] = messages
    case |= {
        "prompt_token_ids": ids,
        "greedy_token_ids": new,
        "finish_reason": "stop" if new[-1] == tok.eos_token_id else "length",
        "greedy_text": tok.decode(new, skip_special_tokens=True),
        "greedy_margins": [round(float(m), 5) for m in margin],
    }
    return case, margin


def smollm2_golden(gguf: Path) -> None:
    """Write smollm2.json and smollm2_logits.npz from the SmolLM2 GGUF."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / gguf.name).symlink_to(gguf.resolve())
        tok = tf.AutoTokenizer.from_pretrained(tmp, gguf_file=gguf.name)
        model = tf.AutoModelForCausalLM.from_pretrained(
            tmp, gguf_file=gguf.name, dtype=torch.float32
        ).eval()
    plain, plain_margin = smollm2_case(tok, model, "The capital of France is", chat=False)
    cases = [plain]
    for messages in CHAT_CASES:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        case, _ = smollm2_case(tok, model, text, chat=True, messages=messages)
        templated = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
        assert case["prompt_token_ids"] == list(templated["input_ids"])
        cases.append(case)
    cases.append(smollm2_case(tok, model, LONG_PROSE, chat=False)[0])
    for case in cases:
        log.info(
            "smollm2 %r -> %r (%s)", case["text"][-40:], case["greedy_text"], case["finish_reason"]
        )

    tokenizer_cases = [
        {
            "text": text,
            "ids": tok.encode(text, add_special_tokens=False),
            "ids_with_special_tokens": tok.encode(text, add_special_tokens=True),
        }
        for text in TOKENIZER_CASES
    ]
    probe = tok.encode("hi", add_special_tokens=True)
    special = {
        "bos_token": tok.bos_token,
        "bos_token_id": tok.bos_token_id,
        "eos_token": tok.eos_token,
        "eos_token_id": tok.eos_token_id,
        "pad_token": tok.pad_token,
        "pad_token_id": tok.pad_token_id,
        "unk_token": tok.unk_token,
        "unk_token_id": tok.unk_token_id,
        "adds_bos_by_default": bool(probe and probe[0] == tok.bos_token_id),
        "chat_template": tok.chat_template,
    }
    cfg = model.config
    config = {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.intermediate_size,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_parameters["rope_theta"],
        "tie_word_embeddings": cfg.tie_word_embeddings,
    }
    doc = {
        "model": gguf.name,
        "config": config,
        "special": special,
        "prompts": cases,
        "tokenizer_cases": tokenizer_cases,
    }
    (GOLDEN_DIR / "smollm2.json").write_text(compact_json(doc) + "\n", encoding="utf-8")

    assert len(plain["greedy_token_ids"]) >= NEW_TOKENS
    with torch.no_grad():
        last = model(torch.tensor([plain["prompt_token_ids"]])).logits[0, -1].numpy()
    np.savez(
        GOLDEN_DIR / "smollm2_logits.npz",
        prompt=np.asarray(plain["prompt_token_ids"], np.int32),
        last_logits=last.astype(np.float32),
        greedy=np.asarray(plain["greedy_token_ids"][:NEW_TOKENS], np.int32),
        greedy_margin=plain_margin[:NEW_TOKENS].astype(np.float32),
    )
