"""EPLB under MA decode with MTP drafting: the MTP block's routed experts (one more layer on
the expert slice, ``cfg.num_layers``) are counted on both sides of the slice and rebalanced
like a target layer, and greedy output stays the reference's with the same drafts accepted
as a colocated group."""

import numpy as np
import pytest

from collectives.eplb import moved_slots
from serving.entrypoints.metrics import EngineCollector
from tests.collectives.cases import need_devices
from tests.mtp_checkpoint import make_mimic_checkpoint
from tests.serving.test_disaggregation import ma
from tests.serving.test_spec_decode import (  # noqa: F401 (an autouse fixture)
    assert_same,
    draft_at_every_batch_size,
    mixed_params,
    run,
)
from tests.serving.test_spec_decode_ma import check_drafted

EVERY_2 = {"window_size": 2, "step_interval": 2}  # a rebalance every other step


@pytest.fixture(scope="module")
def mimic_moe(tmp_path_factory):
    return str(make_mimic_checkpoint(tmp_path_factory.mktemp("mimic_moe"), moe=True))


def test_mtp_layer_load_is_counted_and_rebalanced(mimic_moe, tmp_path):
    """2 domains x 2 ranks, 4 expert devices x 3 slots (8 experts, 4 spare): every window
    counts the MTP layer's tokens per expert (attention ranks) and per expert device (expert
    ranks), the same total; rebalances move its slots; output and drafts unchanged."""
    need_devices(8)
    params = mixed_params()
    _, ref = run(mimic_moe, None, params)
    colocated, _ = run(mimic_moe, 2, params)
    llm, got = run(mimic_moe, 2, params, deployment=ma(tmp_path, 2, 2, 4, redundant_slots=4),
                   enable_eplb=True, eplb_config=EVERY_2)
    assert_same(ref, got)
    check_drafted(llm, colocated, 2)
    pool = llm.engine.drivers[-1]
    cfg, mtp = llm.cfg, llm.cfg.num_layers
    windows = list(pool.load.slices)
    assert windows and all(sorted(w) == [0, mtp] for w in windows)
    assert any(w[mtp].sum() > 0 for w in windows)
    k = cfg.moe.num_experts_per_tok
    assert all(w[mtp].sum() % k == 0 for w in windows)  # K experts per MTP token
    stats = llm.engine.stats()
    load, devices = stats["expert_load"], stats["expert_device_load"]
    assert sorted(load) == sorted(devices) == [0, mtp]
    assert len(load[mtp]) == cfg.moe.num_experts and len(devices[mtp]) == 4
    assert sum(devices[mtp]) == sum(load[mtp])
    reb = pool.rebalancer
    assert stats["eplb_rebalances"] > 0
    assert len(moved_slots(pool.layout.expert_map, reb.maps[mtp]))  # its slots moved
    assert reb.maps[mtp].num_redundant == 4
    routed = pool.parts[0].routed
    assert np.asarray(routed.maps[mtp][1]).tolist() == reb.maps[mtp].replica_counts().tolist()
    families = {f.name: f for f in EngineCollector(llm.engine, "m").collect()}
    layers = {s.labels["layer"] for s in families["xds:expert_load"].samples}
    assert str(mtp) in layers
    device_layers = {s.labels["layer"] for s in families["xds:expert_device_load"].samples}
    assert str(mtp) in device_layers
