"""A2E/E2A between an attention slice and an expert slice (``collectives.transport`` hops),
against the dense MoE."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from collectives.a2e import A2E, A2EError, trampoline_devices
from collectives.ep_moe import shard_from_host
from collectives.expert_map import build_expert_map
from collectives.transport import TrampolineMap
from tests.collectives.cases import make_experts, make_routing, need_devices
from xds_jax.model.moe import moe_dense_reference

TOL = {"rtol": 1e-5, "atol": 1e-5}


def run_a2e(num_attn, num_expert, *, mode, experts, slots=1, tokens=2, top_k=2, hidden=16,
            skew="random", seed=0):
    devs = jax.devices()
    attn = Mesh(np.array(devs[:num_attn]), ("dp",))
    exp = Mesh(np.array(devs[num_attn:num_attn + num_expert]), ("ep",))
    rng = np.random.default_rng(seed)
    w = make_experts(rng, experts, hidden, 8)
    x = rng.normal(size=(num_attn * tokens, hidden)).astype(np.float32)
    ids, gates = make_routing(rng, num_attn * tokens, experts, top_k, skew)
    a2e = A2E(attn, exp, build_expert_map(experts, num_expert, slots), mode=mode,
              capacity=tokens * top_k)
    on_attn = NamedSharding(attn, P("dp"))
    out = a2e(a2e.place_experts(w), *(shard_from_host(a, on_attn) for a in (x, ids, gates)))
    assert out.sharding.device_set == set(devs[:num_attn])
    ref = jax.jit(moe_dense_reference)(w, jnp.asarray(x), ids, gates)
    return np.asarray(out), np.asarray(ref), a2e


@pytest.mark.parametrize("mode", ["trampoline", "direct"])
def test_four_attention_to_four_experts(mode):
    out, ref, a2e = run_a2e(4, 4, mode=mode, experts=4)
    np.testing.assert_allclose(out, ref, **TOL)


def test_trampolines_are_spread_or_shared_in_rounds():
    assert trampoline_devices(list(range(10)), 6) == [0, 1, 3, 5, 6, 8]
    assert trampoline_devices(list(range(4)), 6) == [0, 0, 1, 1, 2, 2]  # 2 rounds
    tmap = TrampolineMap.spread(5, 3)
    assert tmap.rounds == 2 and tmap.pairs(0) == [(0, 5), (2, 6), (4, 7)]
    assert tmap.pairs(1) == [(1, 5), (3, 6)]


def test_more_attention_ranks_than_experts_share_trampolines_in_rounds():
    """5 attention ranks on 3 expert ranks: two rounds of hops, the last trampoline gets
    one rank (its second-round rows are empty: expert id -1, no capacity used)."""
    out, ref, a2e = run_a2e(5, 3, mode="trampoline", experts=6, slots=2, tokens=3)
    np.testing.assert_allclose(out, ref, **TOL)
    assert a2e.transport.rounds == 2 and a2e.stats.expert_tokens.sum() == 5 * 3 * 2


def test_unknown_mode_and_shared_devices_are_errors():
    devs = jax.devices()
    m = Mesh(np.array(devs[:4]), ("dp",))
    with pytest.raises(A2EError, match="share"):
        A2E(m, Mesh(np.array(devs[2:6]), ("ep",)), build_expert_map(4, 4, 1))
    with pytest.raises(A2EError, match="unknown"):
        A2E(m, Mesh(np.array(devs[4:8]), ("ep",)), build_expert_map(4, 4, 1), mode="fanout")


@pytest.mark.mesh16
@pytest.mark.parametrize("mode", ["trampoline", "direct"])
@pytest.mark.parametrize("skew", ["random", "all"])
def test_six_attention_to_ten_experts(mode, skew):
    need_devices(16)
    out, ref, a2e = run_a2e(6, 10, mode=mode, experts=16, slots=2, skew=skew)
    np.testing.assert_allclose(out, ref, **TOL)
    assert a2e.stats.expert_tokens.sum() == 6 * 2 * 2
    hop = a2e.stats.by_name("a2e_hop")[-1]
    assert (hop.bytes_moved > 0) == (mode == "trampoline")


@pytest.mark.mesh384
def test_160_attention_to_224_experts_through_trampolines():
    need_devices(384)
    out, ref, a2e = run_a2e(160, 224, mode="trampoline", experts=200, tokens=1, hidden=8)
    np.testing.assert_allclose(out, ref, **TOL)
    assert not a2e.moe.staged and len(set(a2e.trampolines)) == 160
