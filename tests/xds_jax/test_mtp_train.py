"""The trainable MTP block (``xds_jax.train.mtp_model``) against the serving one
(``xds_jax.model.mtp``): same outputs for both drafting passes, and a draft vocabulary maps
back to target ids."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from tests.helpers import tiny
from xds_jax.model.attention import new_layer_cache
from xds_jax.model.mtp import draft_argmax, draft_tokens, mtp_block
from xds_jax.train.mtp_corpus import Corpus
from xds_jax.train.mtp_model import block_pass, init_block, make_batch
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


def test_draft_vocabulary_is_the_most_chosen_ids():
    choice = np.array([[3, 3, 3, 5, 5, 9, 1, 1]])
    assert draft_vocab(choice, np.array([8]), 3).tolist() == [3, 1, 5]
    assert draft_vocab(choice, np.array([5]), 2).tolist() == [3, 5]
