"""``multihost.zeros_tree``: a KV pool's zero arrays come from one program per set of devices,
laid out as asked and device-owned (a donating step updates them in place)."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from xds_jax import multihost


def _shapes(layers: int) -> list[dict]:
    return [{"k": jax.ShapeDtypeStruct((8, 4, 2, 16), jnp.bfloat16),
             "v": jax.ShapeDtypeStruct((8, 4, 2, 16), jnp.float32)} for _ in range(layers)]


def test_one_program_per_device_set_and_leaves_laid_out_as_asked():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[1:3]), ("tp",))
    tp = NamedSharding(mesh, P(None, None, "tp"))
    shapes = _shapes(3)
    targets = [{"k": jax.devices()[0], "v": tp} for _ in shapes]
    multihost._zeros_program.cache_clear()
    made = multihost.zeros_tree(shapes, targets)
    assert multihost._zeros_program.cache_info().misses == 2  # device 0, devices 1-2
    for layer, shape in zip(made, shapes, strict=True):
        for name in ("k", "v"):
            a = layer[name]
            assert a.shape == shape[name].shape and a.dtype == shape[name].dtype
            assert not np.asarray(a).any()
        assert layer["k"].devices() == {jax.devices()[0]}
        assert layer["v"].sharding == tp
    again = multihost.zeros_tree(shapes, targets)  # a second runner of the same shape
    assert multihost._zeros_program.cache_info().misses == 2
    assert again[0]["k"].unsafe_buffer_pointer() != made[0]["k"].unsafe_buffer_pointer()


def test_zero_pages_are_updated_in_place_by_a_donating_step():
    pages = multihost.zeros_tree(_shapes(2), jax.devices()[0])
    write = jax.jit(lambda c: jax.tree.map(lambda x: x.at[0].add(1), c), donate_argnums=0)
    before = [c["k"].unsafe_buffer_pointer() for c in pages]
    after = jax.block_until_ready(write(pages))
    assert all(c["k"].is_deleted() for c in pages)
    assert [c["k"].unsafe_buffer_pointer() for c in after] == before
    assert float(after[1]["v"][0].sum()) == 4 * 2 * 16
