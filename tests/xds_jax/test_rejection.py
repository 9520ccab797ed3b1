"""Draft verification: greedy prefix match, and rejection sampling keeps the target law."""

import jax
import numpy as np

from xds_jax.sampling.rejection import verify_drafts


def _verify(logits, drafts, num_drafts, temperature, seeds, **kw):
    b = logits.shape[0]
    return jax.device_get(verify_drafts(
        np.asarray(logits, np.float32), np.asarray(drafts, np.int32),
        np.asarray(num_drafts, np.int32), np.full((b,), temperature, np.float32),
        np.zeros((b,), np.int32), np.ones((b,), np.float32), np.asarray(seeds, np.uint32),
        np.zeros((b,), np.int32), random=temperature > 0, **kw))


def test_greedy_accepts_the_matching_prefix_plus_the_target_token():
    logits = np.zeros((3, 3, 5))
    target = [[1, 2, 3], [1, 4, 0], [2, 2, 2]]
    for b, row in enumerate(target):
        logits[b, np.arange(3), row] = 5.0
    drafts = [[1, 2], [1, 2], [1, 2]]
    tokens, accepted, *_ = _verify(logits, drafts, [2, 2, 1], 0.0, [0, 0, 0])
    assert accepted.tolist() == [2, 1, 0]
    assert tokens[0].tolist() == [1, 2, 3]
    assert tokens[1, :2].tolist() == [1, 4]
    assert tokens[2, 0] == 2


def test_rejection_sampling_keeps_the_target_distribution():
    v, rows = 4, 20000
    target_logits = np.log(np.array([[0.1, 0.5, 0.15, 0.25], [0.4, 0.3, 0.2, 0.1],
                                     [0.25, 0.25, 0.25, 0.25]]))
    logits = np.broadcast_to(target_logits, (rows, 3, v))
    drafts = np.tile([[2, 0]], (rows, 1))  # an unlikely first draft, a likely second
    tokens, accepted, *_ = _verify(logits, drafts, np.full(rows, 2), 1.0, np.arange(rows))
    first = np.bincount(tokens[:, 0], minlength=v) / rows
    np.testing.assert_allclose(first, [0.1, 0.5, 0.15, 0.25], atol=0.015)
    # Given the first draft was accepted, the second token follows position 1's law.
    second = tokens[accepted >= 1, 1]
    np.testing.assert_allclose(np.bincount(second, minlength=v) / len(second),
                               [0.4, 0.3, 0.2, 0.1], atol=0.04)
    assert abs((accepted >= 1).mean() - 0.15) < 0.015  # accept d with probability p(d)
    assert abs((accepted[accepted >= 1] == 2).mean() - 0.4) < 0.04


def test_same_seed_same_tokens():
    logits = np.random.default_rng(0).normal(size=(4, 3, 6))
    a = _verify(logits, np.ones((4, 2)), [2, 2, 1, 0], 0.7, [1, 2, 3, 4])
    b = _verify(logits, np.ones((4, 2)), [2, 2, 1, 0], 0.7, [1, 2, 3, 4])
    np.testing.assert_array_equal(a[0], b[0])


def test_without_logprobs_the_same_tokens_and_nothing_else():
    """``logprobs=False`` (no row asked) skips the log-softmax: the same tokens and
    acceptances, greedy and sampled, and only those two arrays."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 3, 7)) * 3
    drafts = rng.integers(0, 7, size=(6, 2))
    drafts[:3] = logits[:3, :2].argmax(-1)  # some rows accept
    for temperature in (0.0, 0.8):
        full = _verify(logits, drafts, [2, 2, 1, 2, 0, 2], temperature, range(6))
        bare = _verify(logits, drafts, [2, 2, 1, 2, 0, 2], temperature, range(6),
                       logprobs=False)
        assert len(full) == 6 and len(bare) == 2
        np.testing.assert_array_equal(bare[0], full[0])
        np.testing.assert_array_equal(bare[1], full[1])
        if temperature == 0:  # the rows whose drafts are the target's argmax accept all
            assert full[1][:3].tolist() == [2, 2, 1]


def test_host_greedy_acceptance_equals_the_verifier():
    """``accept_greedy`` (greedy rows verified on the host from the step's argmax) accepts
    exactly what ``verify_drafts`` accepts, draft counts and ties included."""
    from serving.core.spec_state import accept_greedy
    rng = np.random.default_rng(0)
    b, k, v = 64, 3, 6
    logits = rng.integers(0, 3, size=(b, k + 1, v)).astype(np.float32)  # ties: first wins
    greedy = logits.argmax(-1).astype(np.int32)
    drafts = np.where(rng.random((b, k)) < 0.7, greedy[:, :k], rng.integers(0, v, (b, k)))
    num_drafts = rng.integers(0, k + 1, size=b)
    tokens, accepted, *_ = _verify(logits, drafts, num_drafts, 0.0, np.zeros(b))
    np.testing.assert_array_equal(accept_greedy(greedy, drafts, num_drafts), accepted)
    np.testing.assert_array_equal(tokens, greedy)
    assert 0 < accepted.sum() < num_drafts.sum()
