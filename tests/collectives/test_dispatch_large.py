"""Dispatch + combine on 16, 64 and 384 virtual devices (each in its own process)."""

import numpy as np
import pytest

from tests.collectives.cases import need_devices, run_case

TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.mark.mesh16
@pytest.mark.parametrize("skew", ["random", "all"])
def test_16_devices_two_slots_each(skew):
    need_devices(16)
    out, ref, moe = run_case(16, slots=2, tokens=2, top_k=2, skew=skew)
    np.testing.assert_allclose(out, ref, **TOL)
    assert moe.stats.expert_tokens.sum() == 16 * 2 * 2


@pytest.mark.mesh64
def test_64_devices_redundant_slots_and_skew():
    need_devices(64)
    out, ref, moe = run_case(64, slots=1, experts=48, tokens=2, top_k=2, skew="all")
    np.testing.assert_allclose(out, ref, **TOL)
    assert moe.expert_map.num_redundant == 16
    assert moe.stats.expert_tokens[0] == 128


@pytest.mark.mesh384
def test_384_devices_staged_with_redundant_slots():
    need_devices(384)
    # 256 experts on 384 slots (128 replicas), every token to expert 0 first.
    out, ref, moe = run_case(384, slots=1, experts=256, tokens=1, top_k=2, hidden=8, inter=4,
                             skew="all")
    assert moe.staged  # one program per exchange: XLA:CPU's 256-thread collective limit
    np.testing.assert_allclose(out, ref, **TOL)
    assert moe.stats.expert_tokens.sum() == 384 * 2
