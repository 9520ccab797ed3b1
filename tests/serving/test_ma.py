"""MA disaggregated decode through the engine (an ``MAPool`` driver): greedy tokens equal the
single-device loop's, expert overflow re-runs the step, and the recorded timeline reports what
the devices were seen doing: the pipeline dispatches the domains in turn to the experts, and a
schedule serialised stage by stage is reported with no overlap."""

import json

import jax
import numpy as np
import pytest

from serving.core import timeline as timeline_module
from serving.core.dp_group import GroupConfig
from serving.core.engine import Engine
from serving.core.interfaces import Driver, Runner
from serving.core.request import Request
from serving.core.timeline import Timeline
from serving.disagg.ma import MAPool
from serving.disagg.ma_layout import MALayout
from sharding.deployment import ExpertSlotsError
from tests.collectives.cases import need_devices
from tests.helpers import tiny
from xds_jax import SamplingParams
from xds_jax.generate import LocalGenerator
from xds_jax.sequence import Sequence

CPU16 = "configs/deployments/cpu16-ma.yaml"
GROUP = GroupConfig(num_blocks=16, max_num_seqs=4, max_num_batched_tokens=64)


def run_on_engine(pool: MAPool, requests: list[Request], timeline=None) -> Engine:
    """The engine with the pool as its only driver runs ``requests`` to the end."""
    engine = Engine(None, pool.cfg, groups=pool.groups, drivers=[pool], timeline=timeline)
    engine.run_until_done(requests)
    return engine


def requests_for(vocab: int, count: int, seed: int, max_len: int = 15) -> list[Request]:
    """Greedy requests with mixed prompt lengths (1 .. max_len) and output lengths."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        prompt = rng.integers(0, vocab, int(rng.integers(1, max_len + 1))).tolist()
        params = SamplingParams(temperature=0, max_tokens=3 + i % 4, ignore_eos=True)
        out.append(Request(f"r{i}", None, prompt, params, [Sequence(prompt, params)]))
    return out


def assert_matches_reference(params, cfg, requests: list[Request]) -> None:
    gen = LocalGenerator(params, cfg)
    for r in requests:
        seq = Sequence(r.prompt_ids, r.params)
        gen.run([seq])
        assert r.seqs[0].output_ids == seq.output_ids, r.request_id


def expert_blocks(events) -> list[list]:
    """Expert events split into one block per (pass, layer), in dispatch order."""
    blocks: list[list] = []
    for e in events:
        if e.role != "expert":
            continue
        if not blocks or blocks[-1][-1].layer != e.layer:
            blocks.append([])
        blocks[-1].append(e)
    return blocks


def micro_batches_overlap(events) -> bool:
    """Some layer where the experts of micro-batch 0 and the attention of micro-batch 1 (same
    domain, same pass) run at the same time."""
    for i, e in enumerate(events):
        if e.role != "expert" or e.micro_batch != 0:
            continue
        attn = next((a for a in events[i + 1:] if a.stage == f"attn_l{e.layer}"
                     and a.domain == e.domain and a.micro_batch == 1), None)
        if attn is not None and e.start < attn.end and attn.start < e.end:
            return True
    return False


@pytest.mark.mesh16
@pytest.mark.parametrize("name, capacity, mode", [("deepseek_v3", None, "direct"),
                                                  ("qwen3_moe", 1, "trampoline"),
                                                  ("granitemoeshared", 1, "trampoline"),
                                                  ("glm4_moe", None, "trampoline")])
def test_cpu16_ma_matches_reference_and_traces(name, capacity, mode, tmp_path):
    """18 requests on 2 domains x 3 ranks (several rows per rank, so 2 micro-batches) give
    the reference tokens, through trampolines or direct A2E; a forced capacity of 1
    overflows, re-runs and stays exact."""
    need_devices(16)
    m = tiny(name)
    timeline = Timeline()
    pool = MAPool(m.params, m.cfg, MALayout.load(CPU16, m.cfg, a2e_mode=mode), GROUP,
                  timeline=timeline, capacity=capacity)
    assert isinstance(pool, Driver) and isinstance(pool.groups[0].runner, Runner)
    assert pool.expert_map.num_redundant == 4  # 8 experts in 6 devices x 2 slots
    requests = requests_for(m.cfg.vocab_size, 18, seed=1)
    engine = run_on_engine(pool, requests, timeline)
    assert_matches_reference(m.params, m.cfg, requests)
    stats = engine.stats()
    assert stats["num_running"] == stats["num_waiting"] == 0 and stats["ma_steps"] > 0
    assert all(g.steps > 0 for g in pool.groups)
    if capacity is not None:
        assert stats["ma_reruns"] > 0 and stats["ma_max_capacity"] > capacity

    events = timeline.events
    blocks = expert_blocks(events)
    assert any(len({e.micro_batch for e in b}) > 1 for b in blocks)
    assert any({e.domain for e in b} == {0, 1} for b in blocks)
    for block in blocks:  # domains are dispatched to the experts in turn: d before d + 1
        assert [e.domain for e in block] == sorted(e.domain for e in block)
    # Whether stages overlapped is what the devices showed (on virtual CPU devices sharing
    # the host's cores, often little): every start observed by a marker, none inferred.
    assert all(e.observed_start and e.dispatch <= e.start <= e.end for e in events)
    trace = json.loads(timeline.save(tmp_path / "ma.json").read_text())
    names = {e["name"] for e in trace["traceEvents"] if e["ph"] == "X"}
    first = next(i for i in range(m.cfg.num_layers) if m.cfg.is_moe_layer(i))
    dense = {f"ffn_l{i}" for i in range(first)}  # DeepSeek / Qwen3-MoE tiny: layer 0 dense
    assert {"embed", "attn_l0", *dense, "head",
            *(f"{s}_l{first}" for s in ("gate", "a2e", "moe", "e2a", "combine"))} <= names
    summary = timeline.summary()
    hops = summary["a2e"]["bytes"] > 0 and summary["e2a"]["bytes"] > 0
    assert hops == (mode == "trampoline")  # direct: no copy between the slices
    assert 0 <= summary["expert"]["idle_fraction"] < 1


def traced_run(name: str, layout, count: int, seed: int):
    """A traced pool on ``layout`` runs ``count`` requests; outputs checked against the
    reference. Returns (model, pool, timeline)."""
    m = tiny(name)
    timeline = Timeline()
    pool = MAPool(m.params, m.cfg, MALayout.load(str(layout), m.cfg), GROUP, timeline=timeline)
    requests = requests_for(m.cfg.vocab_size, count, seed=seed)
    run_on_engine(pool, requests, timeline)
    assert_matches_reference(m.params, m.cfg, requests)
    return m, pool, timeline


@pytest.mark.mesh16
def test_shared_expert_on_shared_devices_matches_reference(tmp_path):
    """cm768-ma's shape in small: 2 domains x 3 ranks, 8 routed dies and 2 shared-expert dies
    (each serving 2 of a domain's 3 ranks, one of them 1)."""
    need_devices(16)
    layout = tmp_path / "ma16-shared.yaml"
    layout.write_text("name: ma16-shared\nroles:\n  decode_attention:\n"
                      "    devices: {start: 0, count: 6}\n    domains: 2\n    dp: 3\n"
                      "  decode_experts:\n    devices: {start: 6, count: 10}\n"
                      "    slots_per_device: 1\n    shared_devices: 2\n")
    m, pool, timeline = traced_run("deepseek_v3", layout, count=8, seed=2)
    assert pool.layout.describe()["shared_experts_on"] == "shared_devices"
    assert pool.parts[1].shared.transport.rounds == 2
    shared = [e for e in timeline.events if e.role == "shared_expert"]
    assert {e.domain for e in shared} == {0, 1} and {e.layer for e in shared} == {1, 2}
    assert {e.stage[:9] for e in shared} == {"shared_l1", "shared_l2", "shared_a2", "shared_e2"}


@pytest.mark.mesh16
def test_rank_view_pages_are_the_ranks_own_shard():
    need_devices(16)
    m = tiny("deepseek_v3")
    pool = MAPool(m.params, m.cfg, MALayout.load(CPU16, m.cfg), GroupConfig(num_blocks=8))
    assert len(pool.groups) == 6 and [g.index for g in pool.groups] == list(range(6))
    view = pool.groups[4].runner  # domain 1, rank 1
    assert view.device == jax.devices()[4 + 4]
    pages = view.pages
    assert len(pages) == m.cfg.num_layers and pages[0]["c"].shape[0] == 8
    assert pages[0]["c"].devices() == {view.device}
    view.pages = [{"c": layer["c"] + 1.0} for layer in pages]
    whole = np.asarray(pool.domains[1].caches[0]["c"])
    assert (whole[8:16] == 1).all() and (whole[:8] == 0).all() and (whole[16:] == 0).all()
    assert sum(g.runner.compile_count for g in pool.groups) == 0
    kv = view.export_kv([2, 5])  # blocks of this rank only, e.g. for a PD arrival
    assert kv[0]["c"].shape[0] == 2 and (np.asarray(kv[0]["c"]) == 1).all()
    view.import_kv([0, 7], [{"c": layer["c"] * 3.0} for layer in kv])
    whole = np.asarray(pool.domains[1].caches[0]["c"])
    assert (whole[[8, 15]] == 3).all() and (whole[9:15] == 1).all() and (whole[:8] == 0).all()
    pool.groups[0].submit(requests_for(m.cfg.vocab_size, 1, seed=0)[0])
    with pytest.raises(RuntimeError, match="MAPool.step"):
        pool.groups[0].step()  # a rank's steps belong to its pool


def overlapping(events) -> list[tuple]:
    """Pairs of events whose intervals intersect."""
    ordered = sorted(events, key=lambda e: e.start)
    return [(a, b) for i, a in enumerate(ordered) for b in ordered[i + 1:] if b.start < a.end]


def test_serialised_schedule_is_reported_serialised(tmp_path):
    """The same pool and requests, stage by stage (``Timeline(serialize=True)``: each stage
    dispatched after the previous one was observed done): exact tokens, no two events
    overlap, so no micro-batch's attention overlaps another's experts; then pipelined again,
    every start observed; then untraced, with no marker at all."""
    layout = tmp_path / "ma8.yaml"
    layout.write_text("name: ma8\nroles:\n  decode_attention:\n    devices: {start: 0, count: 4}\n"
                      "    domains: 2\n    dp: 2\n  decode_experts:\n"
                      "    devices: {start: 4, count: 4}\n")
    m = tiny("llama")
    serial = Timeline(serialize=True)
    pool = MAPool(m.params, m.cfg, MALayout.load(str(layout), m.cfg), GROUP, timeline=serial)
    requests = requests_for(m.cfg.vocab_size, 8, seed=5)  # 2 rows per rank: 2 micro-batches
    run_on_engine(pool, requests, serial)
    assert_matches_reference(m.params, m.cfg, requests)
    events = serial.events
    assert any(len({e.micro_batch for e in b}) > 1 for b in expert_blocks(events))
    assert overlapping(events) == [] and not micro_batches_overlap(events)
    pipelined = Timeline()
    pool.timeline = pipelined
    requests = requests_for(m.cfg.vocab_size, 8, seed=6)
    run_on_engine(pool, requests, pipelined)
    assert_matches_reference(m.params, m.cfg, requests)
    assert len(pipelined.events) > 0
    assert all(e.observed_start and e.dispatch <= e.start <= e.end for e in pipelined.events)
    pool.timeline = None  # untraced: no marker program is dispatched
    markers_before = next(timeline_module._marker_ids)
    run_on_engine(pool, requests_for(m.cfg.vocab_size, 4, seed=7))
    assert next(timeline_module._marker_ids) == markers_before + 1


def test_dense_model_runs_its_ffn_on_the_expert_slice(tmp_path):
    """A dense model has no experts: the expert devices serve every layer's FFN instead."""
    layout = tmp_path / "ma8.yaml"
    layout.write_text("name: ma8\nroles:\n  decode_attention:\n    devices: {start: 0, count: 4}\n"
                      "    domains: 2\n    dp: 2\n  decode_experts:\n"
                      "    devices: {start: 4, count: 4}\n")
    m, pool, timeline = traced_run("llama", layout, count=6, seed=4)
    assert pool.layout.describe()["dense_ffn_on"] == "expert_devices"
    ffn = [e for e in timeline.events if e.role == "expert"]
    assert {e.layer for e in ffn} == set(range(m.cfg.num_layers))
    assert {e.domain for e in ffn} == {0, 1}
    assert not [e for e in timeline.events if e.stage.startswith("ffn") and e.role == "attention"]
    small = tmp_path / "ma-small.yaml"  # 4 ranks per domain but 2 FFN devices
    small.write_text("name: s\nroles:\n  decode_attention:\n    devices: {start: 0, count: 4}\n"
                     "    domains: 1\n    dp: 4\n  decode_experts:\n"
                     "    devices: {start: 4, count: 2}\n")
    with pytest.raises(ExpertSlotsError, match="one per attention rank"):
        MALayout.load(str(small), m.cfg)


@pytest.mark.slow
def test_cm768_ma_xdeepserve_layout_matches_reference():
    """xDeepServe's layout: 3 domains x 160 ranks, 256 routed dies, 32 shared-expert dies.
    Not in ``make test`` (about 2 minutes): run it with
    ``XDS_CPU_DEVICES=768 python -m pytest -m slow tests/serving/test_ma.py``."""
    need_devices(768)
    from xds_jax.loading.loader import load_model

    m = load_model("configs/models/deepseek-v3-tiny.json", dtype="float32")
    layout = MALayout.load("configs/deployments/cm768-ma.yaml", m.cfg)
    pool = MAPool(m.params, m.cfg, layout,
                  GroupConfig(num_blocks=4, max_num_seqs=2, max_num_batched_tokens=32),
                  capacity=16)
    assert layout.describe()["shared_experts_on"] == "shared_devices"
    requests = requests_for(m.cfg.vocab_size, 3, seed=3, max_len=12)
    for i, r in enumerate(requests):  # one rank in each domain
        pool.groups[160 * i].submit(r)
    while not all(r.finished for r in requests):
        assert pool.step()
    assert_matches_reference(m.params, m.cfg, requests)


def test_domain_kv_pages_can_be_updated_in_place():
    """A domain's pages are device-owned, so a donating program reuses their buffers (host-made
    zeros could alias numpy memory that XLA cannot reuse: every step would copy the pool)."""
    from serving.disagg.ma_runner import Domain
    from tests.helpers import tiny
    from xds_jax.multihost import zeros

    model = tiny("llama")
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("dp",))
    dom = Domain(0, mesh, model.params, model.cfg, num_blocks=8, block_size=16)
    write = jax.jit(lambda x: x.at[0].add(1), donate_argnums=0)
    for pages in (dom.caches[0]["k"], zeros((64, 4), np.float32, jax.devices()[0])):
        before = [shard.data.unsafe_buffer_pointer() for shard in pages.addressable_shards]
        after = jax.block_until_ready(write(pages))
        assert pages.is_deleted()
        assert [shard.data.unsafe_buffer_pointer() for shard in after.addressable_shards] == before
