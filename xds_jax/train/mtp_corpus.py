"""Self-distillation data for an MTP draft head: the target's own greedy replies, its last
hidden states and its next-token choices.

Prompts come from ``mtp_prompts``. ``greedy_states`` decodes them greedily with the model's
own stage functions over one dense KV page per row, keeping the hidden state and the pick of
every pass as it goes: the corpus costs one pass over its text, not a generation and then a
second pass for the states.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from xds_jax.generate import bucket
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


def prompt_ids(llm, conversations: list) -> list[list[int]]:
    """The prompt token ids of each conversation, as ``LLM.chat`` sends them."""
    return [llm.chat_prompt(c)[1] for c in conversations]


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("caches",))
def _target_pass(params: dict, tokens_BS: jax.Array, positions_BS: jax.Array, pages_B: jax.Array,
                 caches: list, *, cfg: ModelConfig):
    """Hiddens ``[B, S, D]`` and the target's picks ``[B, S]``; row ``b`` keeps its KV in
    page ``pages_B[b]`` (one page per sequence)."""
    x, caches = forward(params, cfg, tokens_BS, positions_BS, caches, pages_B[:, None])
    return x, argmax_last(stages.head(params, cfg, x)), caches


def greedy_states(params: dict, cfg: ModelConfig, prompts: list[list[int]], eos_ids,
                  max_tokens: int, width: int, batch: int = 64) -> Corpus:
    """The target's greedy replies to ``prompts`` with, from the same passes, its hidden state
    and pick at every position (no second pass over the text for them).

    ``batch`` prompts at a time: one prefill over their prompts (right-padded to the longest
    prompt of all: one compiled shape), then one-token steps over the rows still running
    (padded to a power of two, so a batch's tail runs narrower steps). A row stops once it
    has been fed an ``eos_ids`` token, its ``max_tokens``-th reply token or its ``width``-th
    token; the step that feeds a token gives the pick after it.
    """
    n = len(prompts)
    prompt_lens = np.array([min(len(p), width) for p in prompts], np.int32)
    pw = int(prompt_lens.max())
    tokens = np.zeros((n, width), np.int32)
    hidden = np.zeros((n, width, cfg.hidden_size), np.float16)
    choice = np.zeros((n, width), np.int32)
    lengths = prompt_lens.copy()
    eos = np.asarray(sorted(eos_ids), np.int32)
    idx = np.arange(pw)[None]
    for lo in range(0, n, batch):
        rows = np.arange(lo, min(lo + batch, n))
        used = np.arange(batch) < len(rows)
        plen = np.ones(batch, np.int32)  # padding rows: one position, never read
        plen[used] = prompt_lens[rows]
        t = np.zeros((batch, pw), np.int32)
        for i, r in enumerate(rows):
            t[i, :plen[i]] = prompts[r][:plen[i]]
        tokens[rows, :pw] = t[used]
        caches = new_caches(cfg, batch, width, params["embed"].dtype)
        x, picks, caches = _target_pass(params, jnp.asarray(t),
                                        jnp.asarray(np.where(idx < plen[:, None], idx, -1)),
                                        jnp.arange(batch), caches, cfg=cfg)
        hidden[rows, :pw] = np.asarray(x[used], np.float32).astype(np.float16)
        choice[rows, :pw] = np.asarray(picks)[used]
        cur = np.asarray(picks)[np.arange(batch), plen - 1]
        length, alive = plen.copy(), used & (max_tokens > 0) & (plen < width)
        while alive.any():
            live = np.flatnonzero(alive)
            r, at = rows[live], length[live]
            tokens[r, at] = cur[live]
            pad = bucket(len(live)) - len(live)
            x, picks, caches = _target_pass(
                params, jnp.asarray(np.pad(cur[live], (0, pad))[:, None]),
                jnp.asarray(np.pad(at, (0, pad), constant_values=-1)[:, None]),
                jnp.asarray(np.pad(live, (0, pad))), caches, cfg=cfg)
            hidden[r, at] = np.asarray(x[:len(live), 0], np.float32).astype(np.float16)
            choice[r, at] = cur[live] = np.asarray(picks[:len(live), 0])
            length[live] += 1
            alive[live] &= ~(np.isin(tokens[r, at], eos) | (length[live] - plen[live] >= max_tokens)
                             | (length[live] >= width))
        lengths[rows] = length[used]
        log.info("corpus: %d/%d sequences", rows[-1] + 1, n)
    return Corpus(tokens, lengths, hidden, choice, prompt_lens)


def save_states(path: Path, c: Corpus) -> None:
    np.savez(path, **dataclasses.asdict(c))


def concat(parts: list[Corpus]) -> Corpus:
    """One corpus of the rows of ``parts``, in order."""
    return Corpus(*(np.concatenate([getattr(c, f.name) for c in parts])
                    for f in dataclasses.fields(Corpus)))


def load_states(path: Path) -> Corpus:
    with np.load(path) as f:
        return Corpus(**{k: f[k] for k in f.files})
