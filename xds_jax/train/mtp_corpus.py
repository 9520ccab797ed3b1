"""Self-distillation data for an MTP draft head: the target's own greedy replies, its last
hidden states and its next-token choices.

Prompts come from ``mtp_prompts``. Replies come from our engine, batched wide and greedy, so
a rerun gives the same corpus (up to float rounding between batch shapes); they are appended
to a JSON-lines file chunk by chunk, so an interrupted generation resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from xds_jax.model import stages
from xds_jax.model.config import ModelConfig
from xds_jax.model.reference import forward, new_caches
from xds_jax.sampling.argmax import argmax_last

log = logging.getLogger(__name__)

@dataclasses.dataclass
class Corpus:
    """Sequences (prompt + greedy reply), right-padded: ``tokens [N, S]``, ``lengths [N]``;
    ``hidden [N, S, D]`` the target's last hidden state before the final norm (float16) and
    ``choice [N, S]`` its argmax next token at each position; ``prompt_lens [N]``."""

    tokens: np.ndarray
    lengths: np.ndarray
    hidden: np.ndarray
    choice: np.ndarray
    prompt_lens: np.ndarray


def generate_replies(llm, conversations: list, max_tokens: int) -> list[list[int]]:
    """Prompt + greedy reply token ids of each conversation, from the serving engine."""
    from xds_jax.sampling.params import SamplingParams

    outs = llm.chat(conversations, SamplingParams(temperature=0.0, max_tokens=max_tokens))
    return [list(o.prompt_token_ids) + list(o.outputs[0].token_ids) for o in outs]


def prompt_lengths(llm, conversations: list) -> list[int]:
    """Prompt tokens of each conversation, as ``LLM.chat`` encodes it."""
    return [len(llm.tokenizer.encode(llm.tokenizer.apply_chat_template(
        c, add_generation_prompt=True), add_special_tokens=False)) for c in conversations]


@functools.partial(jax.jit, static_argnames=("cfg",))
def _target_pass(params: dict, tokens_BS: jax.Array, positions_BS: jax.Array, *,
                 cfg: ModelConfig):
    b, s = tokens_BS.shape
    caches = new_caches(cfg, b, s, params["embed"].dtype)
    x, _ = forward(params, cfg, tokens_BS, positions_BS, caches, jnp.arange(b)[:, None])
    return x, argmax_last(stages.head(params, cfg, x))


def target_states(params: dict, cfg: ModelConfig, seqs: list[list[int]],
                  prompt_lens: list[int], width: int, batch: int = 8) -> Corpus:
    """Run the target over ``seqs`` (cut to ``width`` tokens) for hiddens and choices.

    In the reply the target's choice is the next token itself (the replies are its greedy
    output); in the prompt it is the argmax of this pass. Pass bfloat16 ``params`` for speed
    (twice as fast on XLA:CPU): hiddens then differ slightly from a float32 target's.
    """
    seqs = [s[:width] for s in seqs]
    n = len(seqs)
    tokens = np.zeros((n, width), np.int32)
    lengths = np.array([len(s) for s in seqs], np.int32)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)] = s
    hidden = np.zeros((n, width, cfg.hidden_size), np.float16)
    choice = np.zeros((n, width), np.int32)
    idx = np.arange(width)[None]
    for lo in range(0, n, batch):
        rows = min(batch, n - lo)
        t = np.zeros((batch, width), np.int32)  # one compiled shape
        t[:rows] = tokens[lo:lo + rows]
        lens = np.zeros(batch, np.int32)
        lens[:rows] = lengths[lo:lo + rows]
        pos = np.where(idx < lens[:, None], idx, -1)
        x, a = _target_pass(params, jnp.asarray(t), jnp.asarray(pos), cfg=cfg)
        hidden[lo:lo + rows] = np.asarray(x[:rows], np.float32).astype(np.float16)
        choice[lo:lo + rows] = np.asarray(a[:rows])
        if (lo + rows) % (32 * batch) == 0 or lo + rows == n:
            log.info("target states: %d/%d sequences", lo + rows, n)
    prompt_lens = np.asarray(prompt_lens, np.int32)
    reply = idx + 1 >= prompt_lens[:, None]
    nxt = np.concatenate([tokens[:, 1:], np.zeros((n, 1), np.int32)], axis=1)
    choice = np.where(reply & (idx + 1 < lengths[:, None]), nxt, choice)
    return Corpus(tokens, lengths, hidden, choice, prompt_lens)


def extend_replies(llm, path: Path, conversations: list, max_tokens: int,
                   chunk: int = 64) -> list[list[int]]:
    """Prompt + greedy reply of every conversation, read from ``path`` (JSON lines, one per
    conversation in order) as far as it goes; the rest are generated ``chunk`` at a time and
    appended to it. (A chunk of 256 at ``max_num_seqs=64`` measured slower than one batch at
    a time: 392 against 473 tokens/s over 256 prompts, as its new prompts' prefills join the
    decode steps.)"""
    seqs = load_corpus(path) if path.is_file() else []
    if len(seqs) >= len(conversations):
        return seqs[:len(conversations)]
    path.parent.mkdir(parents=True, exist_ok=True)
    t0, done = time.monotonic(), len(seqs)
    for lo in range(done, len(conversations), chunk):
        new = generate_replies(llm, conversations[lo:lo + chunk], max_tokens)
        with path.open("a") as f:
            f.write("".join(json.dumps(s) + "\n" for s in new))
        seqs += new
        log.info("corpus: %d/%d replies (%.0f s, %.0f tokens/s)", len(seqs),
                 len(conversations), time.monotonic() - t0,
                 sum(len(s) for s in seqs[done:]) / (time.monotonic() - t0))
    return seqs


def load_corpus(path: Path) -> list[list[int]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def save_states(path: Path, c: Corpus) -> None:
    np.savez(path, **dataclasses.asdict(c))


def load_states(path: Path) -> Corpus:
    with np.load(path) as f:
        return Corpus(**{k: f[k] for k in f.files})
