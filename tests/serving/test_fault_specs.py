"""Fault specs, the injector and the reliability options: parsing with errors that name the
field, faults a layout cannot recover from refused when armed, the CLI flags, EngineConfig
checks and the Prometheus counters. Recovery itself is in ``test_faults.py``."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from serving.core.faults import (
    CollectiveError,
    CollectiveFailed,
    ExpertRankDown,
    ExpertRankLost,
    FaultInjector,
    FaultSpecError,
    GroupCrash,
    GroupStall,
    KVTransferFail,
    UnsupportedFaultError,
    parse_fault,
)
from serving.core.kv_cache import BlockManager
from serving.core.scheduler import Scheduler
from tests.helpers import GOLDEN
from xds_jax import LLM, SamplingParams
from xds_jax.engine_config import EngineConfig
from xds_jax.errors import ConfigError
from xds_jax.sequence import Sequence


# -- specs ------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, spec", [
    ("group_crash:group=1:after_steps=3", GroupCrash(group=1, after_steps=3)),
    ("group_crash:role=decode:group=0:after_steps=2", GroupCrash(0, "decode", 2)),
    ("group_crash:role=prefill:group=0:after_steps=1", GroupCrash(0, "prefill", 1)),
    ("kv_transfer_fail:times=2", KVTransferFail(times=2)),
    ("kv_transfer_fail:times=2:group=1", KVTransferFail(times=2, group=1)),
    ("group_stall:group=0:seconds=5", GroupStall(group=0, seconds=5.0)),
    ("group_stall:group=0:seconds=0.5:times=3", GroupStall(group=0, seconds=0.5, times=3)),
    ("expert_rank_down:rank=1:after_steps=2", ExpertRankDown(rank=1, after_steps=2)),
    ("collective_error:after_steps=2:times=1", CollectiveError(after_steps=2, times=1)),
])
def test_specs_parse_into_frozen_dataclasses(text, spec):
    parsed = parse_fault(text)
    assert parsed == spec and parse_fault(str(parsed)) == spec
    with pytest.raises(dataclasses.FrozenInstanceError):
        parsed.after_steps = 9


@pytest.mark.parametrize("text, message", [
    ("group_crash", "field 'group' is required"),
    ("group_crash:grup=1", "no field 'grup'"),
    ("group_crash:group=x", "field 'group' must be an integer"),
    ("group_crash:group=-1", "field 'group' must be an integer >= 0"),
    ("group_crash:group=1:role=attention", "field 'role' must be one of prefill, decode"),
    ("group_stall:group=0:seconds=0", "field 'seconds' must be positive"),
    ("kv_transfer_fail:times=0", "field 'times' must be an integer >= 1"),
    ("kv_transfer_fail:times=1:times=2", "field 'times' given twice"),
    ("group_crash:group", "'group' is not field=value"),
    ("disk_full:group=1", "unknown kind 'disk_full'"),
])
def test_bad_specs_are_refused_naming_the_field(text, message):
    with pytest.raises(FaultSpecError, match=message):
        parse_fault(text)
    with pytest.raises(FaultSpecError, match=message):
        LLM(str(GOLDEN / "llama"), faults=[text], use_param_cache=False)  # before loading


class FakeGroup:
    """What the injector reads of a group; drives itself unless a pool holds it."""

    def __init__(self, index: int, role: str = "decode"):
        self.index, self.role, self.steps = index, role, 0

    @property
    def groups(self) -> list:
        return [self]


class FakePool:
    """An MA pool as the injector sees it: groups, steps, which expert ranks it can lose."""

    def __init__(self, groups: list, spare: tuple = (0,)):
        self.groups = groups
        self.steps = 0
        self.spare = spare

    def check_scale_down(self, rank: int) -> None:
        if rank not in self.spare:
            raise ConfigError(f"losing expert device {rank} would leave experts [3] with no "
                              "replica")


def test_faults_a_layout_cannot_recover_from_are_refused_when_armed():
    colocated = [FakeGroup(0), FakeGroup(1)]
    faults = FaultInjector(colocated, colocated)
    for text, message in [
            ("expert_rank_down:rank=1:after_steps=2", "needs an MA layout"),
            ("collective_error:after_steps=2:times=1", "needs an MA layout"),
            ("kv_transfer_fail:times=2", "needs a PD layout"),
            ("group_crash:role=prefill:group=0", "field 'role': this layout has no prefill"),
            ("group_crash:group=7", "field 'group': no group 7"),
            ("group_stall:role=decode:group=2:seconds=1", "decode group 2 does not exist")]:
        with pytest.raises(UnsupportedFaultError, match=message):
            faults.add(text)
    attention = [FakeGroup(1), FakeGroup(2)]
    prefill = FakeGroup(0, "prefill")
    ma = FaultInjector([prefill, *attention], [prefill, FakePool(attention)])
    with pytest.raises(UnsupportedFaultError, match="not supported yet"):
        ma.add("group_crash:role=decode:group=0")
    with pytest.raises(UnsupportedFaultError, match=r"rank=1:after_steps=2: losing expert "
                                                    r"device 1 would leave experts \[3\]"):
        ma.add("expert_rank_down:rank=1:after_steps=2")
    ma.add("group_crash:role=prefill:group=0")  # PD + MA: a prefill group recovers as in PD
    ma.add("expert_rank_down:rank=0")
    ma.add("collective_error:after_steps=2")
    assert faults.injected == ma.injected == 0


def test_ma_hop_faults_fire_at_dispatch_after_the_pools_steps():
    pool = FakePool([FakeGroup(1)])
    faults = FaultInjector(pool.groups, [pool])
    faults.add("collective_error:after_steps=1:times=2")
    faults.add("expert_rank_down:rank=0:after_steps=3")
    faults.before_dispatch(pool)  # step 0: nothing due
    pool.steps = 1
    for _ in range(2):  # the same step's attempts, one after another
        with pytest.raises(CollectiveFailed, match="collective_error:after_steps=1:times=2"):
            faults.before_dispatch(pool)
    faults.before_dispatch(pool)  # spent
    pool.steps = 3
    with pytest.raises(ExpertRankLost) as lost:
        faults.before_dispatch(pool)
    assert lost.value.rank == 0 and faults.injected == 3
    faults.before_dispatch(pool)


def test_injector_fires_after_steps_counted_from_arming():
    group = FakeGroup(0)
    group.steps = 5
    faults = FaultInjector([group], [group])
    faults.add("group_crash:group=0:after_steps=2")
    faults.before_launch(group)
    group.steps = 7
    with pytest.raises(Exception, match="injected fault group_crash:group=0:after_steps=2"):
        faults.before_launch(group)
    faults.before_launch(group)  # spent
    assert faults.injected == 1 and faults.fired[0][1] == "group_crash:group=0:after_steps=2"


def test_a_stall_with_times_slows_that_many_steps_in_a_row():
    group = FakeGroup(0)
    faults = FaultInjector([group], [group])
    faults.add("group_stall:group=0:seconds=0.001:after_steps=1:times=3")
    stalled = []
    for step in range(6):
        group.steps = step
        stalled.append(faults.stall(group))
    assert stalled == [0.0, 0.001, 0.001, 0.001, 0.0, 0.0] and faults.injected == 3


def test_scheduler_clear_and_drop_free_blocks_and_leave_sequences_alone():
    blocks = BlockManager(16, 4)
    s = Scheduler(blocks, max_num_seqs=4, max_num_batched_tokens=64)
    params = SamplingParams(max_tokens=4)
    running, waiting = Sequence([1, 2, 3, 4, 5], params), Sequence([6, 7], params)
    s.add(running)
    s.schedule()
    s.add(waiting)
    assert s.clear() == [running, waiting]
    assert not s.has_unfinished() and blocks.num_free_blocks == 16
    assert not running.finished and not waiting.finished
    pulled = Sequence([1, 2, 3], params)
    pulled.output_ids.append(9)
    s.admit_computed(pulled)
    s.drop(pulled.seq_id)
    assert blocks.num_free_blocks == 16 and not pulled.finished


# -- options ----------------------------------------------------------------------------------
def test_the_cli_takes_repeated_fault_flags_and_refuses_bad_ones(capsys):
    from serving.core.async_engine import EngineArgs
    from serving.entrypoints.cli_args import ENGINE_FIELDS, build_parser

    args = build_parser().parse_args([
        "serve", "--fault", "group_crash:group=1:after_steps=3", "--fault",
        "kv_transfer_fail:times=2", "--heartbeat-timeout", "5", "--kv-transfer-retries", "2"])
    options = EngineArgs(**{name: getattr(args, name) for name in ENGINE_FIELDS})
    assert options.faults == (GroupCrash(1, None, 3), KVTransferFail(2))
    assert (options.heartbeat_timeout_s, options.kv_transfer_retries) == (5.0, 2)
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["generate", "--fault", "group_stall:group=0"])
    assert exit_.value.code == 2
    assert "field 'seconds' is required" in capsys.readouterr().err


def test_engine_config_checks_the_reliability_options():
    from xds_jax.errors import ConfigError

    assert EngineConfig(faults="group_crash:group=0").faults == ("group_crash:group=0",)
    for bad in ({"faults": [3]}, {"heartbeat_timeout_s": 0}, {"kv_transfer_retries": -1}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            EngineConfig(**bad)


def test_prometheus_exports_the_fault_counters():
    from serving.entrypoints.metrics import EngineCollector

    stats = {"faults_injected": 2, "requests_recovered": 5, "rollbacks": 3, "scale_downs": 1,
             "rejoins": 4, "healthy_groups": 3}
    registry = CollectorRegistry()
    registry.register(EngineCollector(argparse.Namespace(stats=lambda: stats), "m"))
    text = generate_latest(registry).decode()
    for line in ('xds:faults_injected_total{model_name="m"} 2.0',
                 'xds:requests_recovered_total{model_name="m"} 5.0',
                 'xds:rollbacks_total{model_name="m"} 3.0',
                 'xds:scale_downs_total{model_name="m"} 1.0',
                 'xds:rejoins_total{model_name="m"} 4.0',
                 'xds:healthy_groups{model_name="m"} 3.0'):
        assert line in text
