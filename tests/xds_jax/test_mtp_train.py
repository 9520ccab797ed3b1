"""The trainable MTP block (``xds_jax.train.mtp_model``) against the serving one
(``xds_jax.model.mtp``): same outputs for both drafting passes, and a draft vocabulary maps
back to target ids."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tests.helpers import tiny
from xds_jax.model import stages
from xds_jax.model.attention import new_layer_cache
from xds_jax.model.mtp import draft_argmax, draft_tokens, mtp_block
from xds_jax.model.reference import forward, new_caches
from xds_jax.train.mtp_corpus import Corpus, greedy_states
from xds_jax.train.mtp_model import (
    block_pass,
    draft_logits,
    init_block,
    make_batch,
    teacher_logits,
    two_pass_loss,
)
from xds_jax.train.mtp_prompts import (
    SUBJECTS,
    TEMPLATES,
    held_out_conversations,
    train_conversations,
)
from xds_jax.train.mtp_train import draft_vocab


def _setup(seed: int = 0):
    m = tiny("llama")
    block = init_block(m.params, m.cfg, seed)
    block["eh_proj"] = block["eh_proj"] * 10  # let the hidden input matter
    rng = np.random.default_rng(seed)
    s = 12
    tokens = jnp.asarray(rng.integers(0, m.cfg.vocab_size, (2, s)), jnp.int32)
    hidden = jnp.asarray(rng.normal(0, 1, (2, s, m.cfg.hidden_size)), jnp.float32)
    return m, block, tokens, hidden, s


def test_dense_pass_equals_the_paged_serving_block():
    m, block, tokens, hidden, s = _setup()
    pos = jnp.broadcast_to(jnp.arange(s), (2, s))
    dense, _ = block_pass(block, m.params["embed"], m.cfg, tokens, hidden, pos)
    cache = new_layer_cache(m.cfg, 2, s, jnp.float32)
    paged, _ = mtp_block(block, m.params, m.cfg, tokens, hidden, pos, cache,
                         jnp.arange(2)[:, None])
    np.testing.assert_allclose(np.asarray(dense), np.asarray(paged), atol=2e-4, rtol=2e-4)


def test_second_pass_sees_first_pass_keys_before_it_and_its_own():
    """Pass 2 at every ``s`` equals the serving block's second draft after catching up on
    pairs ``0 .. s`` (its KV: pass-1 keys there, then its own at ``s + 1``)."""
    m, block, tokens, hidden, s = _setup(1)
    pos = jnp.broadcast_to(jnp.arange(s), (2, s))
    g, kv = block_pass(block, m.params["embed"], m.cfg, tokens, hidden, pos)
    nxt = jnp.roll(tokens, -2, axis=1)
    g2, _ = block_pass(block, m.params["embed"], m.cfg, nxt, g, pos + 1, prev_kv=kv)
    for last in (0, 5, s - 2):
        cache = new_layer_cache(m.cfg, 2, s + 2, jnp.float32)
        tables = jnp.arange(2)[:, None]
        w = last + 1
        x, cache = mtp_block(block, m.params, m.cfg, tokens[:, :w], hidden[:, :w], pos[:, :w],
                             cache, tables)
        out, _ = mtp_block(block, m.params, m.cfg, nxt[:, last:last + 1], x[:, last:last + 1],
                           pos[:, last:last + 1] + 1, cache, tables)
        np.testing.assert_allclose(np.asarray(out[:, 0]), np.asarray(g2[:, last]),
                                   atol=2e-4, rtol=2e-4)


def test_draft_vocabulary_maps_drafts_back_to_target_ids():
    m, block, tokens, hidden, s = _setup(2)
    pos = jnp.broadcast_to(jnp.arange(s), (2, s))
    x, _ = block_pass(block, m.params["embed"], m.cfg, tokens, hidden, pos)
    full = draft_argmax(block, m.params, m.cfg, x)
    ids = jnp.asarray(np.unique(np.concatenate([np.asarray(full).ravel(), [0, 3, 7]])),
                      jnp.int32)
    rows = (m.params["embed"][ids] if m.cfg.tie_word_embeddings
            else m.params["lm_head"][:, ids].T)
    sub = {**block, "vocab_ids": ids, "head": rows}
    np.testing.assert_array_equal(np.asarray(draft_argmax(sub, m.params, m.cfg, x)),
                                  np.asarray(full))
    cache = new_layer_cache(m.cfg, 2, s + 4, jnp.float32)
    drafts, _ = draft_tokens(sub, m.params, m.cfg, tokens, hidden, pos,
                             jnp.full((2,), s - 1), jnp.full((2,), 2), cache,
                             jnp.arange(2)[:, None], 2)
    assert set(np.asarray(drafts).ravel()) <= set(np.asarray(ids).tolist())


def test_batches_label_the_targets_choices_two_and_three_ahead_in_the_reply():
    tokens = np.array([[5, 6, 7, 8, 9, 0]])
    choice = np.array([[6, 7, 1, 9, 4, 0]])  # the target picks 1 where the text has 8
    corpus = Corpus(tokens, np.array([5]), np.zeros((1, 6, 4)), choice, np.array([2]))
    b = make_batch(corpus, [0], np.arange(10, dtype=np.int32))
    assert b["tok1"][0, :4].tolist() == [6, 7, 8, 9] and b["lab1"][0, :4].tolist() == [7, 1, 9, 4]
    # pairs from the last prompt token (s = 1) on, while the label is inside the sequence
    assert b["use1"][0].tolist() == [False, True, True, True, False, False]
    # pass 2 at s needs t[s+2] == choice[s+1]: false at s = 1 (8 != 1), true at s = 2 (9 == 9)
    assert b["use2"][0].tolist() == [False, False, True, False, False, False]
    assert b["lab2"][0, 2] == 4 and b["tok2"][0, 2] == 9
    # prompt_pairs: the prompt's pairs are labelled too (s = 0: t[1] = 6, the target picks 7)
    b = make_batch(corpus, [0], np.arange(10, dtype=np.int32), prompt_pairs=True)
    assert b["use1"][0].tolist() == [True, True, True, True, False, False]
    assert b["lab1"][0, 0] == 7 and b["use2"][0, 0] == (tokens[0, 2] == choice[0, 1])


def test_draft_vocabulary_is_the_most_chosen_ids():
    choice = np.array([[3, 3, 3, 5, 5, 9, 1, 1]])
    assert draft_vocab(choice, np.array([8]), 3).tolist() == [3, 1, 5]
    assert draft_vocab(choice, np.array([5]), 2).tolist() == [3, 5]


def test_teacher_logits_at_each_pair_are_the_targets_own_choice_for_its_label():
    """The soft target of pass 1 (2) at ``s`` is the target's distribution over the token its
    label names: its argmax is ``lab1`` (``lab2``) wherever the target chose freely."""
    m = tiny("llama")
    rng = np.random.default_rng(3)
    seqs = [rng.integers(1, m.cfg.vocab_size, n).tolist() for n in (10, 7)]
    c = greedy_states(m.params, m.cfg, seqs, [], max_tokens=0, width=10, batch=2)
    c.hidden = c.hidden.astype(np.float32)
    b = make_batch(c, [0, 1], np.arange(m.cfg.vocab_size, dtype=np.int32))
    head = (m.params["embed"] if m.cfg.tie_word_embeddings else m.params["lm_head"].T)
    for ahead, lab in ((1, b["lab1"]), (2, b["lab2"])):
        t = teacher_logits(jnp.asarray(c.hidden), m.params["final_norm"], head, m.cfg, ahead)
        valid = np.arange(10)[None] + ahead < c.lengths[:, None]
        np.testing.assert_array_equal(np.asarray(jnp.argmax(t, -1))[valid], lab[valid])


def _dense(m, seq: list[int]):
    """An independent reference: hiddens ``[L, D]`` and picks ``[L]`` of one whole sequence in
    one dense pass."""
    t = len(seq)
    x, _ = forward(m.params, m.cfg, jnp.asarray([seq], jnp.int32), jnp.arange(t)[None],
                   new_caches(m.cfg, 1, t, jnp.float32), jnp.zeros((1, 1), jnp.int32))
    return np.asarray(x[0]), np.asarray(jnp.argmax(stages.head(m.params, m.cfg, x[0]), -1))


def test_greedy_states_are_the_targets_greedy_replies_hiddens_and_picks():
    """Replies decoded a batch at a time (a padded last batch, prompts of several lengths)
    are the greedy continuation of a dense pass over each whole sequence, and the hiddens and
    picks kept from the decoding passes are that pass's, at every position."""
    m = tiny("llama")
    rng = np.random.default_rng(4)
    prompts = [rng.integers(1, m.cfg.vocab_size, n).tolist() for n in (5, 3, 7)]
    c = greedy_states(m.params, m.cfg, prompts, [], max_tokens=6, width=16, batch=2)
    assert c.lengths.tolist() == [11, 9, 13] and c.prompt_lens.tolist() == [5, 3, 7]
    for i, p in enumerate(prompts):
        n = c.lengths[i]
        seq = c.tokens[i, :n].tolist()
        assert seq[:len(p)] == p and not c.tokens[i, n:].any()
        x, picks = _dense(m, seq)
        assert seq[len(p):] == picks[len(p) - 1:n - 1].tolist()  # greedy
        assert c.choice[i, :n].tolist() == picks.tolist()  # prompt, reply, after the end
        np.testing.assert_allclose(c.hidden[i, :n].astype(np.float32), x, rtol=2e-3, atol=2e-3)


def test_greedy_states_stop_a_row_after_it_is_fed_an_eos_token():
    m = tiny("llama")
    rng = np.random.default_rng(5)
    prompts = [rng.integers(1, m.cfg.vocab_size, n).tolist() for n in (4, 6)]
    free = greedy_states(m.params, m.cfg, prompts, [], max_tokens=8, width=16)
    eos = int(free.tokens[0, 4 + 2])  # row 0's third reply token
    c = greedy_states(m.params, m.cfg, prompts, [eos], max_tokens=8, width=16)
    for i, plen in enumerate((4, 6)):
        reply = free.tokens[i, plen:plen + 8].tolist()
        stop = reply.index(eos) + 1 if eos in reply else 8
        assert c.lengths[i] == plen + stop
        assert c.tokens[i, :plen + stop].tolist() == free.tokens[i, :plen + stop].tolist()
        # the pick after the eos token comes from the pass that fed it
        assert c.choice[i, plen + stop - 1] == free.choice[i, plen + stop - 1]
    assert c.lengths[0] <= 4 + 3
    # max_tokens and width bound a row too
    short = greedy_states(m.params, m.cfg, prompts, [], max_tokens=8, width=9)
    assert short.lengths.tolist() == [9, 9]
    full = greedy_states(m.params, m.cfg, [*prompts, list(range(1, 12))], [], 8, width=6)
    assert full.lengths.tolist() == [6, 6, 6] and full.prompt_lens.tolist() == [4, 6, 6]


def test_soft_zero_is_the_hard_cross_entropy_and_soft_pulls_to_the_teacher():
    m, block, tokens, hidden, s = _setup(4)
    corpus = Corpus(np.asarray(tokens), np.array([s, s - 2]), np.asarray(hidden),
                    np.asarray(tokens), np.array([3, 3]))
    vocab = np.arange(m.cfg.vocab_size, dtype=np.int32)
    b = make_batch(corpus, [0, 1], vocab)
    head = (m.params["embed"] if m.cfg.tie_word_embeddings else m.params["lm_head"].T)
    norm = m.params["final_norm"]
    hard, _ = two_pass_loss(block, m.params["embed"], head, m.cfg, b, norm, soft=0.0)
    pos = jnp.broadcast_to(jnp.arange(s), (2, s))
    g, kv = block_pass(block, m.params["embed"], m.cfg, b["tok1"], hidden, pos)
    logits = draft_logits(block, head, m.cfg, g)
    m1 = b["use1"] & (b["lab1"] >= 0)
    ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(b["lab1"])[..., None],
                              -1)[..., 0]
    g2, _ = block_pass(block, m.params["embed"], m.cfg, b["tok2"], g, pos + 1, prev_kv=kv)
    logits2 = draft_logits(block, head, m.cfg, g2)
    m2 = b["use2"] & (b["lab2"] >= 0)
    ce2 = -jnp.take_along_axis(jax.nn.log_softmax(logits2),
                               jnp.asarray(np.maximum(b["lab2"], 0))[..., None], -1)[..., 0]
    want = (ce * m1).sum() / m1.sum() + (ce2 * m2).sum() / max(m2.sum(), 1)
    np.testing.assert_allclose(float(hard), float(want), rtol=1e-5)
    # soft = 1: cross-entropy to the target's softmax over the same vocabulary, one and two
    # positions on (worked here with the target's head over the stored hiddens directly)
    soft, _ = two_pass_loss(block, m.params["embed"], head, m.cfg, b, norm, soft=1.0)
    want = 0.0
    for ahead, lg, mask in ((1, logits, m1), (2, logits2, m2)):
        h = jnp.roll(hidden, -ahead, axis=1)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, -1, keepdims=True) + m.cfg.rms_norm_eps) * norm
        p = jax.nn.softmax(h @ head.T)
        xent = -(p * jax.nn.log_softmax(lg)).sum(-1)
        want += (xent * mask).sum() / max(mask.sum(), 1)
    np.testing.assert_allclose(float(soft), float(want), rtol=1e-4)


def test_training_prompts_are_distinct_and_none_is_a_benchmark_prompt():
    train = [c[0]["content"] for c in train_conversations()]
    bench = {c[0]["content"] for c in held_out_conversations()}
    assert len(set(train)) == len(train) == len(TEMPLATES) * len(SUBJECTS) - len(
        bench & {t.format(s) for t in TEMPLATES for s in SUBJECTS})
    assert not bench & set(train)
    # the first 1600 (the shipped recipe's) mix every template
    template_of = {t.format(s): t for t in TEMPLATES for s in SUBJECTS}
    assert {template_of[p] for p in train[:1600]} == set(TEMPLATES)


def test_bf16_training_step_keeps_float32_weights_and_follows_the_float32_loss():
    """``mtp_train._train_step`` with bfloat16 matmuls: master weights and optimiser state
    stay float32, its loss is the float32 loss within bfloat16 rounding, and a few steps on
    one batch lower it as float32 steps do."""
    import optax

    from xds_jax.train.mtp_train import _train_step, in_dtype

    m, block, tokens, hidden, s = _setup(5)
    corpus = Corpus(np.asarray(tokens), np.array([s, s - 2]), np.asarray(hidden),
                    np.asarray(tokens), np.array([3, 3]))
    b = make_batch(corpus, [0, 1], np.arange(m.cfg.vocab_size, dtype=np.int32))
    head = (m.params["embed"] if m.cfg.tie_word_embeddings else m.params["lm_head"].T)
    norm = m.params["final_norm"]
    cast = in_dtype(block, "bfloat16")
    assert cast["eh_proj"].dtype == jnp.bfloat16 and cast["enorm"].dtype == jnp.float32
    opt = optax.adam(1e-2)
    losses = {}
    for compute in ("float32", "bfloat16"):
        blk, state, seen = block, opt.init(block), []
        for _ in range(5):
            blk, state, loss = _train_step(blk, state, m.params["embed"], head, norm, b,
                                           cfg=m.cfg, opt=opt, soft=0.0, compute=compute)
            seen.append(float(loss))
        assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(blk))
        assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(state)
                   if hasattr(a, "dtype") and a.dtype != jnp.int32)
        losses[compute] = seen
    np.testing.assert_allclose(losses["bfloat16"][0], losses["float32"][0], rtol=2e-2)
    assert losses["bfloat16"][-1] < 0.8 * losses["bfloat16"][0]
    assert losses["float32"][-1] < 0.8 * losses["float32"][0]


def test_corpus_resumes_at_its_first_missing_chunk(tmp_path, monkeypatch):
    """``corpus_states`` caches the corpus chunk by chunk; a rerun reads the chunks it finds
    and decodes only the missing ones, with the same result."""
    from types import MethodType, SimpleNamespace

    from xds_jax import LLM
    from xds_jax.train import mtp_corpus
    from xds_jax.train.mtp_train import corpus_states

    m = tiny("llama")

    class Tokenizer:  # a test double: a conversation's content is its prompt ids
        eos_token_ids = {1}

        def apply_chat_template(self, conversation, add_generation_prompt):
            return conversation[0]["content"]

        def encode(self, text, add_special_tokens):
            return [int(t) for t in text.split()]

    llm = SimpleNamespace(params=m.params, cfg=m.cfg, tokenizer=Tokenizer(), model_name="t")
    llm.chat_prompt = MethodType(LLM.chat_prompt, llm)  # the real encoding, over the double
    rng = np.random.default_rng(6)
    convs = [[{"role": "user", "content": " ".join(map(str, rng.integers(2, 60, n)))}]
             for n in (3, 5, 4, 6, 2)]
    monkeypatch.setenv("XDS_CACHE_DIR", str(tmp_path))
    calls = []
    real = mtp_corpus.greedy_states
    monkeypatch.setattr(mtp_corpus, "greedy_states",
                        lambda *a, **k: calls.append(len(a[2])) or real(*a, **k))
    first = corpus_states(llm, "t", convs, 4, 12, chunk=2)
    assert calls == [2, 2, 1]
    files = sorted((tmp_path / "mtp" / "t-x4.float32.w12").iterdir())
    assert [f.name for f in files] == ["00000-00002.npz", "00002-00004.npz", "00004-00005.npz"]
    files[1].unlink()
    again = corpus_states(llm, "t", convs, 4, 12, chunk=2)
    assert calls == [2, 2, 1, 2]  # only the missing chunk
    for f in ("tokens", "lengths", "hidden", "choice", "prompt_lens"):
        np.testing.assert_array_equal(getattr(again, f), getattr(first, f))
    assert first.prompt_lens.tolist() == [3, 5, 4, 6, 2]
