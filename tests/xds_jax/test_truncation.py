"""Top-k / top-p truncation without a sort equals vLLM's sorted semantics, on the candidates'
road (peaked rows, small ``top_k``) and on the bisection's (flat rows, a large ``top_k``), in
mixed batches, with ties, banned (-inf) tokens and rows with fewer finite tokens than k."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xds_jax.sampling import truncation
from xds_jax.sampling.truncation import truncate


def reference(x: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """The kept (finite) tokens of one row, from its sorted values (vLLM: top-k, then the
    nucleus of the renormalised top-k; ties with an edge kept; the most likely always)."""
    order = np.sort(x)[::-1]
    k = min(top_k, len(x)) if top_k > 0 else len(x)
    kth = order[k - 1]
    if top_p >= 1:
        return (x >= kth) & np.isfinite(x)
    kept = np.where(order >= kth, order, -np.inf).astype(np.float64)
    probs = np.exp(kept - kept[0]) / np.sum(np.exp(kept - kept[0]))
    before = np.cumsum(probs) - probs
    keep = (before < top_p) & (order >= kth)
    keep[0] = True
    return (x >= order[keep].min()) & np.isfinite(x)


def agrees(got: np.ndarray, x: np.ndarray, top_k: int, top_p: float) -> bool:
    """``got`` is the reference's set, or its set for a ``top_p`` a float32 rounding away
    (a token whose mass above lies that close to ``top_p`` may go either way)."""
    return any(np.array_equal(got, reference(x, top_k, p))
               for p in (top_p, top_p * (1 - 1e-6), min(top_p * (1 + 1e-6), 1 - 1e-9)))


def run(x: np.ndarray, top_k: list, top_p: list) -> np.ndarray:
    out = jax.jit(truncate)(jnp.asarray(x), jnp.asarray(top_k, jnp.int32),
                            jnp.asarray(top_p, jnp.float32))
    return np.isfinite(np.asarray(out))


def rows(rng, n: int, v: int, scale: float, ties: bool = False, banned: float = 0.0):
    x = (rng.standard_normal((n, v)) * scale).astype(np.float32)
    if ties:
        x = np.round(x, 1)
    x[rng.random((n, v)) < banned] = -np.inf
    x[:, 0] = np.maximum(x[:, 0], 0)  # every row keeps a finite token
    return x


@pytest.mark.parametrize("scale,ties,banned", [
    (8.0, False, 0.0),  # peaked: every nucleus ends among the candidates
    (0.5, False, 0.0),  # flat: nuclei of thousands of tokens, found by bisection
    (3.0, True, 0.3),  # ties at the edges, banned tokens
])
def test_truncation_keeps_what_the_sorted_definition_keeps(scale, ties, banned):
    rng = np.random.default_rng(int(scale * 10) + ties)
    v = 3000
    x = rows(rng, 16, v, scale, ties, banned)
    top_k = [0, 1, 2, 5, 40, 64, 65, 500, v, v + 9, 0, 0, 3, 0, 200, 0]
    top_p = [0.9, 1.0, 0.5, 0.95, 1.0, 0.8, 0.3, 0.99, 0.7, 1.0, 1e-3, 0.999, 0.9, 0.5, 1.0,
             1.0]
    got = run(x, top_k, top_p)
    for i in range(len(x)):
        assert agrees(got[i], x[i], top_k[i], top_p[i]), (i, top_k[i], top_p[i], got[i].sum())


def test_both_roads_agree_row_by_row():
    rng = np.random.default_rng(7)
    x = jnp.asarray(np.concatenate([rows(rng, 4, 2000, 9.0), rows(rng, 4, 2000, 0.3)]))
    top_k = jnp.asarray([0, 10, 0, 50] * 2, jnp.int32)
    top_p = jnp.asarray([0.9, 0.8, 0.5, 1.0] * 2, jnp.float32)
    edge, covered = jax.jit(truncation._candidate_edges)(x, top_k, top_p)
    assert np.asarray(covered).tolist() == [True] * 4 + [False, True, False, True]
    bisected = jax.jit(truncation._bisected_edges)(x, top_k, top_p)
    settled = np.asarray(covered)
    np.testing.assert_array_equal(np.asarray(edge)[settled], np.asarray(bisected)[settled])


def test_a_row_of_fewer_finite_tokens_than_k_keeps_them_all():
    x = np.full((2, 100), -np.inf, np.float32)
    x[:, :3] = [[1.0, 2.0, 3.0], [3.0, 3.0, 0.5]]
    got = run(x, [10, 90], [1.0, 0.9])
    assert got[0].sum() == 3 and got[1][:2].all() and not got[1][3:].any()


def test_the_sampler_truncates_on_every_road():
    from xds_jax.sampling.params import SamplingParams
    from xds_jax.sampling.sampler import flags_for, make_batch, sample

    rng = np.random.default_rng(3)
    logits = jnp.asarray(np.concatenate([rows(rng, 2, 4096, 10.0), rows(rng, 2, 4096, 0.2)]))
    params = [SamplingParams(temperature=1.0, top_k=k, top_p=p, seed=s)
              for k, p, s in ((3, 1.0, 1), (0, 0.5, 2), (0, 0.2, 3), (100, 1.0, 4))]
    flags = flags_for(params)
    assert flags.top_k_top_p
    for step in range(20):
        batch = make_batch(params, [p.seed for p in params], [step] * 4, [[]] * 4, [[]] * 4,
                           [[]] * 4, 4096, flags)
        tokens = np.asarray(sample(logits, batch, flags)[0])
        for i, p in enumerate(params):
            assert reference(np.asarray(logits[i]), p.top_k, p.top_p)[tokens[i]], (step, i)


def test_no_row_is_sorted_whole():
    """XLA:CPU must keep top_k as its TopK call: a later slice pushed into it turns it into a
    sort of every row (~290 ms for 32 x 49,152), which the candidates' barrier prevents."""
    x = jnp.zeros((8, 4096))
    text = jax.jit(truncate).lower(x, jnp.zeros(8, jnp.int32), jnp.ones(8)).compile().as_text()
    assert 'custom_call_target="TopK"' in text
    assert not [line for line in text.splitlines() if " sort(" in line]


def test_a_row_keeps_the_same_tokens_whatever_road_its_neighbours_need():
    """Rows whose top_p is exactly a cumulative mass (an edge within rounding) keep the same
    set beside a row the candidates settle and beside one that needs the bisection."""
    rng = np.random.default_rng(11)
    x = rows(rng, 16, 2048, 6.0)
    top = np.sort(np.asarray(jax.nn.softmax(jnp.asarray(x), axis=-1)), axis=-1)[:, ::-1]
    top_p = np.cumsum(top[:, :8], axis=-1, dtype=np.float32)[np.arange(16), np.arange(16) % 8]
    neighbours = {"peaked": rows(rng, 1, 2048, 9.0), "flat": rows(rng, 1, 2048, 0.2)}
    kept = {}
    for name, other in neighbours.items():
        kept[name] = [run(np.concatenate([x[i:i + 1], other]), [0, 0], [top_p[i], 0.9])[0]
                      for i in range(16)]
    assert all(np.array_equal(a, b) for a, b in zip(kept["peaked"], kept["flat"], strict=True))
