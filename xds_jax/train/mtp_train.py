"""``make train-mtp``: train the shipped SmolLM2 MTP draft head by self-distillation.

    python -m xds_jax.train.mtp_train [--steps 1600] [--vocab 4096] [--out DIR]

1. Corpus: the target's greedy replies to the training prompts with its last hidden state
   and next-token choice at every position, from the same passes (``mtp_corpus``), cached
   chunk by chunk under ``$XDS_CACHE_DIR/mtp`` (greedy, so a rerun regenerates the same files).
2. A draft vocabulary: the ``--vocab`` ids the target chooses most often in the corpus.
3. AdamW (optax) on both drafting passes' loss (``mtp_model.two_pass_loss``): cross-entropy
   to the target's choice, or with ``--soft w`` a share ``w`` to the target's distribution
   over the draft vocabulary (the shipped recipe uses 0: hard labels measured better).
4. Save (Orbax, bfloat16) and measure the held-out mean accepted length with ``k = 2`` twice:
   offline on held-out target states, and in the engine (``LLM(.., speculative_config)``).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from xds_jax.loading.draft_heads import SHIPPED, save_head
from xds_jax.train import mtp_corpus
from xds_jax.train.mtp_model import init_block, make_batch, two_pass_loss
from xds_jax.train.mtp_prompts import held_out_conversations, train_conversations

log = logging.getLogger(__name__)
MODEL = "smollm2"


def draft_vocab(choice: np.ndarray, lengths: np.ndarray, size: int) -> np.ndarray:
    """The ``size`` target ids chosen most often in the corpus, most frequent first (ties:
    lower id), so that a prefix is the best smaller vocabulary."""
    used = choice[np.arange(choice.shape[1])[None, :] < lengths[:, None]]
    counts = np.bincount(used, minlength=size)
    return np.argsort(-counts, kind="stable")[:size].astype(np.int32)


def in_dtype(block: dict, dtype: str) -> dict:
    """The block with its matrices in ``dtype`` (the norms stay float32): the weights its
    matmuls read. A bfloat16 x bfloat16 dot with float32 accumulation is what serving runs."""
    return jax.tree_util.tree_map(lambda a: a.astype(dtype) if a.ndim == 2 else a, block)


@functools.partial(jax.jit, static_argnames=("cfg", "opt", "soft", "compute"))
def _train_step(block, opt_state, embed, head, norm, batch, *, cfg, opt, soft, compute):
    """One AdamW step on float32 weights; the loss's matmuls read them (and the head) in
    ``compute``, accumulating in float32 (norms, softmax and the loss are float32)."""
    def loss_of(b):
        return two_pass_loss(in_dtype(b, compute), embed, head.astype(compute), cfg, batch,
                             norm, soft)

    (loss, _), grads = jax.value_and_grad(loss_of, has_aux=True)(block)
    updates, opt_state = opt.update(grads, opt_state, block)
    return optax.apply_updates(block, updates), opt_state, loss


@functools.partial(jax.jit, static_argnames=("cfg",))
def _eval_step(block, embed, head, norm, batch, *, cfg):
    return two_pass_loss(block, embed, head, cfg, batch, norm, soft=0.0)[1]


def vocab_coverage(train_c, held, sizes=(1024, 2048, 4096, 8192)) -> dict:
    """The share of the held-out reply choices that a draft vocabulary of each size (the most
    chosen training ids) holds: a ceiling on the first draft's hit rate."""
    ids = draft_vocab(train_c.choice, train_c.lengths, max(sizes))
    idx = np.arange(held.choice.shape[1])[None, :]
    reply = (idx + 1 >= held.prompt_lens[:, None]) & (idx + 1 < held.lengths[:, None])
    used = held.choice[reply]
    return {str(n): float(np.isin(used, ids[:n]).mean()) for n in sizes}


def offline_acceptance(block, embed, head, norm, cfg, corpus, index_of,
                       batch_size: int) -> dict:
    """Draft hit rates over the replies of corpus rows and the mean accepted length with
    ``k = 2`` they give: ``1 + p1 + p1 * p2`` (``p2``: second draft right given the first was)."""
    n1 = h1 = n21 = h21 = 0
    for lo in range(0, len(corpus.tokens), batch_size):
        sl = slice(lo, lo + batch_size)
        b = make_batch(corpus, sl, index_of)
        hit1, hit2 = (np.asarray(a) for a in _eval_step(block, embed, head, norm, b, cfg=cfg))
        n1 += b["use1"].sum()
        h1 += hit1.sum()
        n21 += (hit1 & b["use2"]).sum()
        h21 += (hit1 & hit2).sum()
    p1, p2 = h1 / max(n1, 1), h21 / max(n21, 1)
    return {"p1": float(p1), "p2_given_1": float(p2), "mean_accepted_len": float(1 + p1 + p1 * p2)}


def corpus_states(llm, name: str, conversations: list, max_tokens: int, width: int,
                  chunk: int = 512) -> mtp_corpus.Corpus:
    """The target's greedy replies to ``conversations`` with its hidden states and picks
    (``mtp_corpus.greedy_states``, in ``llm``'s dtype), cached ``chunk`` conversations to a
    file under ``$XDS_CACHE_DIR/mtp`` (delete it to regenerate): an interrupted run resumes
    at its first missing chunk."""
    root = Path(os.environ.get("XDS_CACHE_DIR", Path.home() / ".cache/xds_jax")) / "mtp"
    dtype = jnp.dtype(llm.params["embed"].dtype).name
    folder = root / f"{name}-x{max_tokens}.{dtype}.w{width}"
    folder.mkdir(parents=True, exist_ok=True)
    prompts = mtp_corpus.prompt_ids(llm, conversations)
    parts, t, made = [], time.monotonic(), 0
    for lo in range(0, len(prompts), chunk):
        path = folder / f"{lo:05d}-{min(lo + chunk, len(prompts)):05d}.npz"
        if path.is_file():
            parts.append(mtp_corpus.load_states(path))
            continue
        parts.append(mtp_corpus.greedy_states(llm.params, llm.cfg, prompts[lo:lo + chunk],
                                              llm.tokenizer.eos_token_ids, max_tokens, width))
        mtp_corpus.save_states(path, parts[-1])
        made += int(parts[-1].lengths.sum() - parts[-1].prompt_lens.sum())
        print(f"corpus: {lo + len(parts[-1].lengths)}/{len(prompts)} sequences, {made} reply "
              f"tokens in {time.monotonic() - t:.0f} s -> {path}", flush=True)
    corpus = mtp_corpus.concat(parts)
    print(f"corpus {name}: {len(corpus.lengths)} sequences, "
          f"{int(corpus.lengths.sum())} tokens", flush=True)
    return corpus


def engine_acceptance(out: Path, conversations: list, max_tokens: int, dtype: str) -> dict:
    """Mean accepted length (k = 2) of the saved head in the serving engine, greedy."""
    from xds_jax import LLM, SamplingParams

    os.environ["XDS_DRAFT_HEAD"] = str(out)
    # acceptance: every step drafts, whatever its batch
    llm = LLM(MODEL, dtype=dtype,
              speculative_config={"method": "mtp", "num_speculative_tokens": 2,
                                  "disable_by_batch_size": len(conversations)})
    llm.chat(conversations, SamplingParams(temperature=0.0, max_tokens=max_tokens))
    s = llm.engine.stats()
    return {"spec_num_drafts": s["spec_num_drafts"],
            "spec_accepted_tokens": s["spec_accepted_tokens"],
            "mean_accepted_len": 1 + s["spec_accepted_tokens"] / max(s["spec_num_drafts"], 1)}


def train(args) -> dict:
    from xds_jax import LLM

    llm = LLM(MODEL, max_num_seqs=64, dtype=args.dtype)
    cfg = llm.cfg
    train_c = corpus_states(llm, "train", train_conversations()[:args.prompts],
                            args.max_tokens, args.width)
    vocab = draft_vocab(train_c.choice, train_c.lengths, args.vocab)
    index_of = np.full(cfg.vocab_size, -1, np.int32)
    index_of[vocab] = np.arange(len(vocab))
    embed = jnp.asarray(llm.params["embed"], jnp.float32)
    head = embed[jnp.asarray(vocab)]
    norm = jnp.asarray(llm.params["final_norm"], jnp.float32)
    block = init_block(llm.params, cfg, args.seed)
    sched = optax.warmup_cosine_decay_schedule(0.0, args.lr, args.steps // 20, args.steps)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.01))
    opt_state = opt.init(block)
    rng = np.random.default_rng(args.seed)
    n, t0 = len(train_c.tokens), time.monotonic()
    order = rng.permutation(n)
    for step in range(args.steps):
        lo = (step * args.batch) % n
        if lo + args.batch > n:
            order, lo = rng.permutation(n), 0
        rows = order[lo:lo + args.batch]
        b = make_batch(train_c, rows, index_of, args.prompt_pairs)
        block, opt_state, loss = _train_step(block, opt_state, embed, head, norm, b, cfg=cfg,
                                             opt=opt, soft=args.soft,
                                             compute=args.compute_dtype)
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step + 1}/{args.steps} loss {float(loss):.3f} "
                  f"({time.monotonic() - t0:.0f} s)", flush=True)
    held = corpus_states(llm, "held-out", held_out_conversations(args.held_out),
                         args.max_tokens, args.width)
    coverage = vocab_coverage(train_c, held)
    print(f"held-out choices inside the N most chosen training ids: {json.dumps(coverage)}",
          flush=True)
    offline = offline_acceptance(block, embed, head, norm, cfg, held, index_of, args.batch)
    print(f"held-out offline (k=2): {json.dumps(offline)}", flush=True)
    meta = {"target": "SmolLM2-135M-Instruct.Q4_1.gguf", "hidden_size": cfg.hidden_size,
            "vocab_size": cfg.vocab_size, "num_heads": cfg.num_heads,
            "num_kv_heads": cfg.num_kv_heads, "draft_vocab": int(len(vocab)),
            "train_sequences": int(n), "steps": args.steps, "batch": args.batch,
            "lr": args.lr, "soft": args.soft, "prompt_pairs": args.prompt_pairs,
            "seed": args.seed, "corpus_dtype": args.dtype,
            "compute_dtype": args.compute_dtype,
            "held_out_offline": offline,
            "held_out_vocab_coverage": coverage}
    out = Path(args.out)
    save_head(out, block, vocab, meta)
    print(f"saved the draft head to {out.resolve()}", flush=True)
    if not args.engine:
        return meta
    engine = engine_acceptance(out, held_out_conversations(args.held_out),
                               args.max_tokens, args.dtype)
    meta["held_out_engine"] = engine
    (out / "head.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"held-out engine (k=2, greedy): mean accepted length "
          f"{engine['mean_accepted_len']:.3f} ({json.dumps(engine)})", flush=True)
    return meta


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1600)
    ap.add_argument("--batch", type=int, default=8, help="sequences per step")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--vocab", type=int, default=4096, help="draft vocabulary size")
    ap.add_argument("--prompts", type=int, default=3200, help="training prompts (of 7260)")
    ap.add_argument("--max-tokens", type=int, default=128, help="reply length in the corpus")
    ap.add_argument("--width", type=int, default=176, help="tokens per training sequence")
    ap.add_argument("--held-out", type=int, default=48, help="held-out prompts")
    ap.add_argument("--soft", type=float, default=0.0,
                    help="weight of the target's distribution against its choice in the loss")
    ap.add_argument("--prompt-pairs", action=argparse.BooleanOptionalAction, default=True,
                    help="also train on the prompts' (hidden, next token) pairs (held-out "
                         "offline 1.761 -> 1.783 with the same data and steps)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                    help="the target's dtype for the corpus (replies, hidden states, picks) "
                         "and the engine check")
    ap.add_argument("--compute-dtype", default="bfloat16", choices=("bfloat16", "float32"),
                    help="dtype the training matmuls read the weights in (float32 master "
                         "weights and accumulation either way)")
    ap.add_argument("--engine", action=argparse.BooleanOptionalAction, default=True,
                    help="measure the saved head's held-out acceptance in the serving engine")
    ap.add_argument("--out", default=str(SHIPPED["SmolLM2-135M-Instruct.Q4_1.gguf"]))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("xds_jax.train").setLevel(logging.INFO)  # target-state progress
    train(args)


if __name__ == "__main__":
    main()
