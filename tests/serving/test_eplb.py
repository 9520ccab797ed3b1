"""EPLB while serving MA: options refused at start-up, load counted on device per window,
rebalances every few steps with greedy tokens identical to the single-device reference (which
is also what MA gives without rebalancing), and the metrics fed from the real engine."""

import numpy as np
import pytest

from serving.disagg.eplb_config import EplbConfig
from serving.disagg.ma import MAPool
from serving.disagg.ma_layout import MALayout
from serving.entrypoints.metrics import EngineCollector
from tests.collectives.cases import need_devices
from tests.helpers import GOLDEN, tiny
from tests.serving.test_disaggregation import ma, run_and_compare
from tests.serving.test_ma import GROUP, assert_matches_reference, requests_for, run_on_engine
from xds_jax import LLM
from xds_jax.errors import ConfigError

CPU16 = "configs/deployments/cpu16-ma.yaml"
TINY_V3_256 = "configs/models/deepseek-v3-tiny.json"
EVERY_2 = {"window_size": 1, "step_interval": 2}  # a rebalance every other step


def test_config_is_checked_field_by_field():
    assert EplbConfig.parse(True, '{"window_size": 5}').window_size == 5
    for bad, match in ((({"window_size": 0}), "window_size must be >= 1"),
                       ({"step_interval": "3"}, "step_interval must be an integer"),
                       ({"windows": 3}, "unknown fields"), ("{not json", "not valid JSON"),
                       ("[1]", "JSON object")):
        with pytest.raises(ConfigError, match=match):
            EplbConfig.parse(True, bad)
    on = EplbConfig.parse(True, {"num_redundant_experts": 5})
    with pytest.raises(ConfigError, match="dense"):
        on.resolve(None, 12)
    with pytest.raises(ConfigError, match="no decode_experts role"):
        on.resolve(8, None)
    with pytest.raises(ConfigError, match="= 5 is more than the 4 spare"):
        on.resolve(8, 12)
    assert EplbConfig.parse(True).resolve(8, 12).num_redundant_experts == 4
    assert EplbConfig.parse(False, {"num_redundant_experts": 99}).resolve(8, 12).enabled is False


def ma8(tmp_path) -> str:
    """2 domains x 2 ranks and 4 expert devices x 3 slots (8 experts + 4 spare)."""
    return ma(tmp_path, 2, 2, 4, redundant_slots=4)


def test_bad_eplb_options_fail_at_start_up(tmp_path):
    with pytest.raises(ConfigError, match="dense"):
        LLM(str(GOLDEN / "llama"), deployment=ma8(tmp_path), enable_eplb=True)
    with pytest.raises(ConfigError, match="6 is more than the 4 spare"):
        LLM(str(GOLDEN / "deepseek_v3"), deployment=ma8(tmp_path), enable_eplb=True,
            eplb_config={"num_redundant_experts": 6})
    with pytest.raises(ConfigError, match="window_size must be >= 1"):
        LLM(str(GOLDEN / "deepseek_v3"), enable_eplb=True, eplb_config={"window_size": 0})
    with pytest.raises(ConfigError, match="without a deployment"):
        LLM(str(GOLDEN / "deepseek_v3"), enable_eplb=True)


def test_cli_flags_reach_the_engine(tmp_path, capsys):
    """``xds generate --enable-eplb --eplb-config JSON`` on a real MA engine (8 devices), and
    a bad config as a one-line error."""
    from tests.serving.test_cli import run

    base = ["generate", "--model", TINY_V3_256, "--deployment", ma8(tmp_path), "--dtype",
            "float32", "--max-tokens", "4", "--max-num-seqs", "4", "--enable-eplb"]
    code, _, err = run([*base, "--eplb-config", '{"num_redundant_experts": 9}', "Hi"], capsys)
    assert code != 0 and "= 9 is more than the 4 spare expert slots" in err
    assert len(err.strip().splitlines()) <= 2
    code, out, err = run([*base, "--eplb-config", '{"window_size": 1, "step_interval": 2}',
                          "Hi"], capsys)
    assert code == 0 and out.strip(), err


def test_rebalancing_every_other_step_keeps_tokens_on_8_devices(tmp_path):
    need_devices(8)
    m = tiny("qwen3_moe")
    eplb = EplbConfig.parse(True, EVERY_2)
    pool = MAPool(m.params, m.cfg, MALayout.load(ma8(tmp_path), m.cfg), GROUP, eplb=eplb)
    requests = requests_for(m.cfg.vocab_size, 10, seed=3)
    engine = run_on_engine(pool, requests)
    assert_matches_reference(m.params, m.cfg, requests)
    stats = engine.stats()
    assert stats["eplb_rebalances"] > 0 and stats["ma_eplb_moved_slots"] > 0
    assert stats["ma_expert_imbalance"] >= 1.0
    load = stats["expert_load"]
    moe_layers = [i for i in range(m.cfg.num_layers) if m.cfg.is_moe_layer(i)]
    assert sorted(load) == moe_layers and all(len(c) == m.cfg.moe.num_experts
                                              for c in load.values())
    k = m.cfg.moe.num_experts_per_tok
    assert all(sum(c) % k == 0 and sum(c) > 0 for c in load.values())  # K per token
    devices = stats["expert_device_load"]  # counted on the 4 expert ranks
    assert all(len(devices[i]) == 4 and sum(devices[i]) == sum(load[i]) for i in moe_layers)
    maps = pool.rebalancer.maps
    assert all(maps[i].num_redundant == 4 for i in moe_layers)


def test_hot_experts_get_replicas_and_the_devices_even_out(tmp_path):
    """DeepSeek-V3 with 256 experts whose correction bias makes 3 experts part of every
    token's top 8 (each ~32x the mean): after a rebalance the expert devices' load evens out,
    and the tokens stay the reference's."""
    need_devices(8)
    from collectives.eplb import device_loads, max_over_mean
    from xds_jax.loading.loader import load_model

    m = load_model(TINY_V3_256, dtype="float32", use_cache=False)
    hot = [0, 37, 99]
    for i, layer in enumerate(m.params["layers"]):
        if m.cfg.is_moe_layer(i):
            layer["moe"]["router_bias"] = layer["moe"]["router_bias"].at[np.array(hot)].add(1.0)
    layout = MALayout.load(ma8(tmp_path), m.cfg)
    pool = MAPool(m.params, m.cfg, layout, GROUP,
                  eplb=EplbConfig.parse(True, {"window_size": 2, "step_interval": 2}))
    requests = requests_for(m.cfg.vocab_size, 8, seed=2)
    engine = run_on_engine(pool, requests)
    assert_matches_reference(m.params, m.cfg, requests)
    stats = engine.stats()
    assert stats["eplb_rebalances"] > 0
    window = pool.load.last_window[1]
    assert set(np.argsort(window)[-3:].tolist()) == set(hot)
    before = max_over_mean(device_loads(layout.expert_map, window))
    after = stats["ma_expert_imbalance"]
    print(f"device max/mean: deployment's map {before:.2f}, rebalanced {after:.2f}")
    assert after < 0.75 * before  # the last window holds a few decode steps only
    assert all(pool.rebalancer.maps[1].replica_counts()[hot] >= 2)


@pytest.mark.mesh16
@pytest.mark.parametrize("mode", ["trampoline", "direct"])
def test_cpu16_ma_rebalances_keep_qwen3_moe_tokens(mode):
    need_devices(16)
    m = tiny("qwen3_moe")
    pool = MAPool(m.params, m.cfg, MALayout.load(CPU16, m.cfg, a2e_mode=mode), GROUP,
                  eplb=EplbConfig.parse(True, EVERY_2))
    requests = requests_for(m.cfg.vocab_size, 18, seed=5)
    engine = run_on_engine(pool, requests)
    assert_matches_reference(m.params, m.cfg, requests)
    assert engine.stats()["eplb_rebalances"] > 0


@pytest.mark.mesh16
def test_cpu16_ma_deepseek_v3_256_experts_through_llm_and_metrics():
    """PD + MA on the shipped cpu16-ma, 256 experts (2 spare slots), rebalancing every other
    decode step; the Prometheus collector reads the real engine's load and rebalances."""
    need_devices(16)
    llm = run_and_compare(TINY_V3_256, CPU16, count=8, max_tokens=6, staged=True,
                          enable_eplb=True, eplb_config=EVERY_2)
    stats = llm.engine.stats()
    assert stats["eplb_rebalances"] > 0
    assert len(stats["expert_load"][1]) == 256
    families = {f.name: f for f in EngineCollector(llm.engine, "m").collect()}
    samples = families["xds:expert_load"].samples
    assert len(samples) == 256 * len(stats["expert_load"])
    assert sum(s.value for s in samples) == sum(map(sum, stats["expert_load"].values()))
    rebalances = families["xds:eplb_rebalances"].samples[0]
    assert rebalances.name == "xds:eplb_rebalances_total" and rebalances.value > 0
    pool = llm.engine.drivers[-1]
    assert np.all(pool.rebalancer.maps[1].replica_counts() >= 1)


@pytest.mark.mesh384
def test_ma_on_384_devices_rebalances_keep_tokens(tmp_path):
    """Attention domains of 16 ranks and 16 expert devices (8 experts, 8 spare slots) at the
    far end of the pod, rebalancing every other step."""
    need_devices(384)
    dep = ma(tmp_path, domains=2, dp=16, experts=16, start=336)
    llm = run_and_compare(str(GOLDEN / "deepseek_v3"), dep, count=6, max_tokens=5,
                          enable_eplb=True, eplb_config=EVERY_2)
    assert llm.engine.stats()["eplb_rebalances"] > 0


@pytest.mark.mesh384
def test_cm384_rebalances_256_experts_keep_tokens(monkeypatch):
    """The shipped cm384 (3 domains x 64 ranks, 96 expert dies x 4 slots, 128 spare), 256
    experts, rebalancing every other step with 32 of the spare slots replicated (all 128 move
    most slots of 96 dies per swap, minutes of this test on a 2-core host). A swap can take
    longer than the few decode steps, so each step boundary waits for the swap under way to
    be ready: every rebalance lands between the same steps on any host."""
    need_devices(384)
    from serving.disagg.ma_eplb import ExpertRebalancer

    poll = ExpertRebalancer.poll

    def settled(self):
        if self.pending is not None:
            self.pending.ready.wait()
        return poll(self)

    monkeypatch.setattr(ExpertRebalancer, "poll", settled)
    llm = run_and_compare(TINY_V3_256, "configs/deployments/cm384.yaml", count=6,
                          max_tokens=5, staged=True, enable_eplb=True,
                          eplb_config=EVERY_2 | {"num_redundant_experts": 32})
    stats = llm.engine.stats()
    assert stats["eplb_rebalances"] > 0 and len(stats["expert_load"][1]) == 256


def test_swap_phases_map_off_then_weights_then_map_on(tmp_path, monkeypatch):
    """Held inside the weight move: the switch-off map is on between steps, the old weights
    serve; released: the new weights and map go on together. A failed move switches the
    old map back on."""
    need_devices(8)
    import threading

    import serving.disagg.ma_eplb as ma_eplb

    m = tiny("qwen3_moe")
    pool = MAPool(m.params, m.cfg, MALayout.load(ma8(tmp_path), m.cfg), GROUP,
                  eplb=EplbConfig.parse(True))
    reb, layer = pool.rebalancer, min(pool.rebalancer.maps)
    initial, svc = reb.maps[layer], pool.parts[0].routed
    old_weights = svc.weights[layer]
    skew = {layer: np.array([[90, 1, 1, 1, 1, 1, 1, 1]])}
    release, rewrite = threading.Event(), ma_eplb._rewrite

    def held(*args):
        release.wait()
        return rewrite(*args)

    def replicas() -> list[int]:
        return np.asarray(svc.maps[layer][1]).tolist()

    monkeypatch.setattr(ma_eplb, "_rewrite", held)
    assert reb.start(skew) and not reb.start(skew)  # one swap at a time
    reb.pending.planned.wait()
    assert reb.poll() is False  # phase 1 only
    off = replicas()
    assert off != initial.replica_counts().tolist() and min(off) >= 1
    assert svc.weights[layer] is old_weights and reb.pending is not None
    release.set()
    assert reb.wait() is True and reb.rebalances == 1 and reb.pending is None
    assert replicas() == reb.maps[layer].replica_counts().tolist()
    assert reb.maps[layer].replica_counts()[0] == 4 and svc.weights[layer] is not old_weights

    def broken(*args):
        raise RuntimeError("device lost")

    monkeypatch.setattr(ma_eplb, "_rewrite", broken)
    current = reb.maps[layer]
    assert reb.start({layer: np.array([[1, 1, 1, 1, 1, 1, 1, 90]])})
    assert reb.wait() is False and reb.pending is None and reb.rebalances == 1
    assert replicas() == current.replica_counts().tolist() and reb.maps[layer] is current


SWAP_AT_EXIT = """
import sys, threading
import jax, jax.numpy as jnp, numpy as np
from sharding.devices import configure_cpu_devices
configure_cpu_devices(8)
import serving.disagg.ma_eplb as ma_eplb
from serving.disagg.eplb_config import EplbConfig
from serving.disagg.ma import MAPool
from serving.disagg.ma_layout import MALayout
from tests.helpers import tiny
from tests.serving.test_ma import GROUP

m = tiny("qwen3_moe")
pool = MAPool(m.params, m.cfg, MALayout.load(sys.argv[1], m.cfg), GROUP,
              eplb=EplbConfig.parse(True))
slow = jax.jit(lambda x: jax.lax.fori_loop(0, 100, lambda i, y: jnp.tanh(y @ y), x))
x = jnp.ones((512, 512)) / 512
slow(x).block_until_ready()
inside, rewrite = threading.Event(), ma_eplb._rewrite

def moving(*args):  # a weight move still on the device when the interpreter exits
    inside.set()
    jax.block_until_ready(slow(x))
    return rewrite(*args)

ma_eplb._rewrite = moving
assert pool.rebalancer.start({min(pool.rebalancer.maps): np.array([[90] + [1] * 7])})
inside.wait()
"""


def test_a_swap_under_way_when_the_process_exits_does_not_abort_it(tmp_path):
    """The swap thread waits in jaxlib calls; a daemon thread there when the interpreter
    finalizes is unwound by ``pthread_exit`` through C++ frames, and the process ends in
    SIGABRT ("terminate called ..."). Exit waits for the swap instead."""
    import subprocess
    import sys
    from pathlib import Path

    done = subprocess.run([sys.executable, "-c", SWAP_AT_EXIT, ma8(tmp_path)],
                          cwd=Path(__file__).resolve().parents[2], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
