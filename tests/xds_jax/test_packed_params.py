"""Packed parameters (``xds_jax.model.packed_params``): the same tree back, bit for bit, and the
same step program results, from far fewer leaves."""

import jax
import jax.numpy as jnp
import numpy as np

from tests.helpers import GOLDEN
from xds_jax import LLM
from xds_jax.generate import model_step
from xds_jax.model.packed_params import PackedParams, as_tree, pack, unpack
from xds_jax.model.reference import new_caches


def test_round_trip_keeps_every_leaf_and_packs_vectors_by_dtype():
    tree = {"w": jnp.arange(12, dtype=jnp.float32).reshape(3, 4),
            "layers": [{"norm": jnp.ones(4, jnp.bfloat16), "q": jnp.ones((2, 2), jnp.int8),
                        "q_scale": jnp.full((2,), 0.5, jnp.float32)},
                       {"norm": jnp.full((4,), 2, jnp.bfloat16), "q": jnp.zeros((2, 2), jnp.int8),
                        "q_scale": jnp.full((2,), 0.25, jnp.float32), "t": jnp.float32(3.0)}]}
    packed = pack(tree)
    assert len(jax.tree.leaves(packed)) == 3 + 2  # three matrices, a buffer per vector dtype
    assert sorted(str(v.dtype) for v in packed.vectors) == ["bfloat16", "float32"]
    back = unpack(packed)
    assert jax.tree.structure(back) == jax.tree.structure(tree)
    for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(tree), strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert as_tree(tree) is tree
    # values from a host copy of the same tree, placed by the caller
    host = jax.tree.map(np.asarray, tree)
    again = pack(tree, put=lambda v: jnp.asarray(v) * 1, host=host)
    np.testing.assert_array_equal(np.asarray(again.vectors[0]), np.asarray(packed.vectors[0]))
    # the layout is static: a program is traced once per layout
    calls = []

    @jax.jit
    def total(p: PackedParams):
        calls.append(1)
        return sum(jnp.sum(x.astype(jnp.float32)) for x in jax.tree.leaves(unpack(p)))

    assert float(total(packed)) == float(total(pack(tree))) and len(calls) == 1


def test_model_step_takes_either_form_alike():
    llm = LLM(str(GOLDEN / "llama"), dtype="float32", use_param_cache=False)
    params, cfg = llm.params, llm.cfg
    packed = pack(params)
    assert len(jax.tree.leaves(packed)) < len(jax.tree.leaves(params))
    tokens = jnp.asarray([[5, 6, 7, 8]], jnp.int32)
    positions = jnp.arange(4, dtype=jnp.int32)[None]
    tables = jnp.arange(2, dtype=jnp.int32)[None]
    last = jnp.asarray([3], jnp.int32)
    out = [model_step(p, tokens, positions, new_caches(cfg, 4, 16, jnp.float32), tables, last,
                      cfg=cfg) for p in (params, packed)]
    np.testing.assert_array_equal(np.asarray(out[0][0]), np.asarray(out[1][0]))
    for a, b in zip(jax.tree.leaves(out[0][2]), jax.tree.leaves(out[1][2]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    runner = llm.engine.drivers[0].runner
    assert isinstance(runner.step_params, PackedParams)
