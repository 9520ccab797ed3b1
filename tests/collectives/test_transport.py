"""The transport under every MA service: hops there and back, rounds and fills."""

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from collectives.ep_moe import shard_from_host
from collectives.transport import DirectTransport, Transport, TransportError, make_transport


def _domain(num_ranks: int):
    mesh = Mesh(np.array(jax.devices()[:num_ranks]), ("dp",))
    return mesh, NamedSharding(mesh, P("dp"))


@pytest.mark.parametrize("ranks, targets", [(3, 5), (5, 3)])
def test_hops_put_each_rank_on_its_trampoline_and_bring_it_back(ranks, targets):
    mesh, on = _domain(ranks)
    tr = Transport(mesh, jax.devices()[ranks:ranks + targets])
    t, g = 2, tr.rounds
    rng = np.random.default_rng(0)
    x = rng.normal(size=(ranks * t, 4)).astype(np.float32)
    ids = rng.integers(0, 7, (ranks * t, 2)).astype(np.int32)
    sent_x, sent_ids = tr.send(shard_from_host(x, on), shard_from_host(ids, on), fills=(0, -1))
    assert sent_x.shape == (targets * g * t, 4) and sent_x.sharding.mesh == tr.other_mesh
    got_x, got_ids = np.asarray(sent_x), np.asarray(sent_ids)
    expect_x = np.zeros((targets * g * t, 4), np.float32)
    expect_ids = np.full((targets * g * t, 2), -1, np.int32)
    for i, (target, r) in enumerate(zip(tr.map.target_of, tr.map.round_of, strict=True)):
        rows = slice((target * g + r) * t, (target * g + r + 1) * t)
        expect_x[rows], expect_ids[rows] = x[i * t:(i + 1) * t], ids[i * t:(i + 1) * t]
    np.testing.assert_array_equal(got_x, expect_x)
    np.testing.assert_array_equal(got_ids, expect_ids)  # unsent rows: no expert
    back = tr.receive(sent_x * 2)
    assert back.sharding.device_set == set(mesh.devices.flat)
    np.testing.assert_array_equal(np.asarray(back), 2 * x)


def test_direct_transport_only_relabels_and_refuses_overlap():
    mesh, on = _domain(2)
    tr = make_transport("direct", mesh, jax.devices()[2:5])
    assert isinstance(tr, DirectTransport) and tr.hop_bytes([np.ones(3)]) == 0
    ids = np.arange(4, dtype=np.int32).reshape(4, 1)
    (union,) = tr.send(shard_from_host(ids, on), fills=(-1,))
    assert np.asarray(union).ravel().tolist() == [0, 1, 2, 3] + [-1] * 6
    np.testing.assert_array_equal(np.asarray(tr.receive(union)), ids)
    with pytest.raises(TransportError, match="share"):
        Transport(mesh, jax.devices()[1:4])
    with pytest.raises(TransportError, match="unknown"):
        make_transport("fanout", mesh, jax.devices()[2:5])


def test_colocated_hops_relabel_rows_on_the_same_devices():
    """EP decode: the expert mesh is the domain's own devices; each rank keeps its rows (no
    copy: the same buffers), and a slice of other devices is refused."""
    mesh, on = _domain(4)
    tr = make_transport("colocated", mesh, list(mesh.devices.flat))
    x = shard_from_host(np.arange(16, dtype=np.float32).reshape(8, 2), on)
    (sent,) = tr.send(x)
    assert sent.sharding.mesh == tr.other_mesh and tr.other_mesh.axis_names == ("ep",)
    assert {s.device: s.data.unsafe_buffer_pointer() for s in sent.addressable_shards} == {
        s.device: s.data.unsafe_buffer_pointer() for s in x.addressable_shards}
    back = tr.receive(sent)
    assert back.sharding.mesh == mesh
    np.testing.assert_array_equal(np.asarray(back), np.asarray(x))
    assert tr.hop_bytes([x]) == 0
    with pytest.raises(TransportError, match="attention domain's own devices"):
        make_transport("colocated", mesh, jax.devices()[4:8])
