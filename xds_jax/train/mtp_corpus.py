"""Self-distillation data for an MTP draft head: the target's own greedy replies, its last
hidden states and its next-token choices.

Training prompts are chat turns built from ``TEMPLATES x SUBJECTS`` (deterministic); held-out
prompts are the serving benchmark's dataset (``serving/entrypoints/datasets/prompts.jsonl``):
no prompt in common, other templates (but one), 3 of the 40 subjects shared. Replies come
from our engine, batched and greedy, so a rerun gives the same corpus (up to float rounding
between batch shapes).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from xds_jax.model import stages
from xds_jax.model.config import ModelConfig
from xds_jax.model.reference import forward, new_caches

log = logging.getLogger(__name__)

HELD_OUT = Path(__file__).resolve().parents[2] / "serving/entrypoints/datasets/prompts.jsonl"

TEMPLATES = [
    "How does {} work? Keep it simple.",
    "Write a haiku about {}.",
    "What are the pros and cons of {}?",
    "Tell me a fun story involving {}.",
    "Write a short email to a friend about {}.",
    "Explain {} like I am a beginner.",
    "What would happen if {} disappeared tomorrow?",
    "Give me a step-by-step guide to learning about {}.",
    "Compare {} with something from everyday life.",
    "Write a limerick about {}.",
    "What are common misconceptions about {}?",
    "Describe a day in the life of someone who studies {}.",
    "Why do people find {} interesting?",
    "Write a product description for a book about {}.",
    "Give me five quiz questions about {}, with answers.",
    "Write a dialogue between two friends discussing {}.",
    "What is the future of {}?",
    "Write a tweet about {}.",
    "Explain the science behind {}.",
    "Give some tips for a school project on {}.",
]

SUBJECTS = [
    "coral reefs", "the French Revolution", "machine learning", "recycling", "penguins",
    "the Great Wall of China", "solar panels", "earthquakes", "jazz music", "the human brain",
    "origami", "hurricanes", "the Olympic Games", "vaccines", "dinosaurs", "rainbows",
    "cryptography", "the Amazon river", "gardening", "the water cycle", "democracy",
    "football", "submarines", "butterflies", "the theory of evolution", "video games",
    "mountain climbing", "tea", "wind turbines", "the Renaissance", "sharks", "bridges",
    "public libraries", "the immune system", "comets", "cooking pasta", "Mars rovers",
    "trains", "sleep", "the periodic table",
]


def train_conversations() -> list[list[dict]]:
    """Every training chat turn, in a fixed order (template-major)."""
    return [[{"role": "user", "content": t.format(s)}] for t in TEMPLATES for s in SUBJECTS]


def held_out_conversations(limit: int | None = None) -> list[list[dict]]:
    """The serving benchmark's prompts as chat turns (none of them is a training prompt)."""
    with HELD_OUT.open() as f:
        prompts = [json.loads(line)["prompt"] for line in f if line.strip()]
    return [[{"role": "user", "content": p}] for p in prompts[:limit]]


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
    return x, jnp.argmax(stages.head(params, cfg, x), axis=-1).astype(jnp.int32)


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
        log.info("target states: %d/%d sequences", lo + rows, n)
    prompt_lens = np.asarray(prompt_lens, np.int32)
    reply = idx + 1 >= prompt_lens[:, None]
    nxt = np.concatenate([tokens[:, 1:], np.zeros((n, 1), np.int32)], axis=1)
    choice = np.where(reply & (idx + 1 < lengths[:, None]), nxt, choice)
    return Corpus(tokens, lengths, hidden, choice, prompt_lens)


def save_corpus(path: Path, seqs: list[list[int]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(s) + "\n" for s in seqs))


def load_corpus(path: Path) -> list[list[int]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def save_states(path: Path, c: Corpus) -> None:
    np.savez(path, **dataclasses.asdict(c))


def load_states(path: Path) -> Corpus:
    with np.load(path) as f:
        return Corpus(**{k: f[k] for k in f.files})
