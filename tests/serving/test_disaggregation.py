"""Every disaggregated layout through the public API (``LLM(deployment=...)``): PD only, MA
only and PD + MA on 8, 16 and 384 virtual devices, a dense model and DeepSeek-V3-style MoEs,
greedy tokens of concurrent requests identical to each request alone on one device. (MA only
on 16 devices, straight through ``MAPool``, is in test_ma.py; PD details in test_pd.py.)"""

import jax
import numpy as np
import pytest

from serving.entrypoints.metrics import EngineCollector
from tests.helpers import GOLDEN
from xds_jax import LLM, SamplingParams
from xds_jax.generate import LocalGenerator
from xds_jax.sequence import Sequence

TINY_V3_256 = "configs/models/deepseek-v3-tiny.json"  # 256 routed experts, random weights


def layout(tmp_path, name: str, **roles) -> str:
    """A deployment file from ``role=(start, count, fields)`` entries."""
    lines = [f"name: {name}", "roles:"]
    for role, (start, count, fields) in roles.items():
        lines += [f"  {role}:", f"    devices: {{start: {start}, count: {count}}}"]
        lines += [f"    {k}: {v}" for k, v in fields.items()]
    path = tmp_path / f"{name}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def pd(tmp_path, prefill_groups, tp, decode_groups, start=0):
    return layout(tmp_path, "pd",
                  prefill=(start, prefill_groups * tp, {"dp": prefill_groups, "tp": tp}),
                  decode=(start + prefill_groups * tp, decode_groups, {"dp": decode_groups}))


def ma(tmp_path, domains, dp, experts, start=0, prefill=None, **expert_fields):
    roles = {}
    if prefill is not None:  # (groups, tp) in front of the MA slices
        groups, tp = prefill
        roles["prefill"] = (start, groups * tp, {"dp": groups, "tp": tp})
        start += groups * tp
    roles["decode_attention"] = (start, domains * dp, {"domains": domains, "dp": dp})
    roles["decode_experts"] = (start + domains * dp, experts, expert_fields)
    return layout(tmp_path, "pdma" if prefill else "ma", **roles)


def run_and_compare(model: str, deployment: str, count: int = 10, seed: int = 0,
                    max_tokens: int = 5, **options) -> LLM:
    llm = LLM(model, dtype="float32", deployment=deployment, max_num_seqs=8,
              max_num_batched_tokens=64, use_param_cache=False, **options)
    rng = np.random.default_rng(seed)
    # Prompts of 1..16 tokens: one prefill width bucket, so few programs compile (chunking
    # and long prompts are covered by test_engine.py and test_pd.py).
    prompts = [rng.integers(2, llm.cfg.vocab_size, int(rng.integers(1, 17))).tolist()
               for _ in range(count)]
    params = [SamplingParams(temperature=0, max_tokens=1 + (i % max_tokens), ignore_eos=True)
              for i in range(count)]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    gen = LocalGenerator(llm.params, llm.cfg)
    for i, (prompt, sp) in enumerate(zip(prompts, params, strict=True)):
        seq = Sequence(prompt, sp)
        gen.run([seq])
        assert outs[i].outputs[0].token_ids == seq.output_ids, f"request {i}"
    stats = llm.engine.stats()
    assert stats["num_running"] == stats["num_waiting"] == 0 and stats["kv_usage"] == 0
    return llm


# -- 8 devices ---------------------------------------------------------------------------------
def test_pd_on_8_devices_mla_moe():
    """The shipped cpu8-pd with DeepSeek-V3 (MLA latent KV through the channels, MoE on
    TP=2 prefill groups); the dense PD cases are in test_pd.py."""
    llm = run_and_compare(str(GOLDEN / "deepseek_v3"), "configs/deployments/cpu8-pd.yaml",
                          staged=True)
    stats = llm.engine.stats()
    assert stats["kv_transfers"] == 8  # requests 0 and 5 end at their first token
    # no timeline: only the always-measured KV pulls have a latency
    assert stats["collective_latency_s"] == {"kv_transfer": stats["kv_transfer_s"] / 8}


def test_pd_plus_ma_on_8_devices(tmp_path):
    """With a timeline, the engine's collective latencies (KV pulls, A2E / E2A hops) are the
    means of what was measured, and the metrics endpoint exports them."""
    dep = ma(tmp_path, domains=2, dp=1, experts=4, prefill=(1, 2))
    llm = run_and_compare(str(GOLDEN / "deepseek_v3"), dep, staged=True, trace=True)
    llm.engine.timeline.flush()  # stats read only the events already seen ready
    stats = llm.engine.stats()
    assert stats["kv_transfers"] == 8  # requests 0 and 5 end at their first token
    latency = stats["collective_latency_s"]
    assert latency["kv_transfer"] == stats["kv_transfer_s"] / stats["kv_transfers"] > 0
    for hop in ("a2e", "e2a"):
        events = [e for e in llm.engine.timeline.events if e.stage.startswith(f"{hop}_l")]
        assert events and all(e.observed_start for e in events)
        assert latency[hop] == pytest.approx(sum(e.duration for e in events) / len(events))
    families = {f.name: f for f in EngineCollector(llm.engine, "m").collect()}
    exported = {s.labels["collective"]: s.value
                for s in families["xds:collective_latency_seconds"].samples}
    assert exported == pytest.approx(latency) and set(exported) == {"kv_transfer", "a2e", "e2a"}


def test_ma_only_on_8_devices(tmp_path):
    """One domain of 4 ranks on 4 expert devices (domain turns: test_ma.py on 16 devices)."""
    run_and_compare(str(GOLDEN / "qwen3_moe"), ma(tmp_path, domains=1, dp=4, experts=4))


# -- 16 devices --------------------------------------------------------------------------------
@pytest.mark.mesh16
def test_pd_on_16_devices_dense(tmp_path):
    llm = run_and_compare(str(GOLDEN / "llama"), pd(tmp_path, 2, 4, 8), staged=True)
    assert [len(g.runner.devices) for g in llm.engine.entry] == [4, 4]


@pytest.mark.mesh16
def test_pd_plus_ma_on_16_devices_shipped_layout():
    llm = run_and_compare(str(GOLDEN / "deepseek_v3"), "configs/deployments/cpu16-ma.yaml",
                          staged=True, trace=True)
    summary = llm.engine.timeline.summary()
    for role in ("prefill", "transfer", "attention", "a2e", "expert", "e2a"):
        assert summary[role]["events"] > 0, role
    assert summary["a2e"]["bytes"] > 0 and summary["transfer"]["bytes"] > 0


@pytest.mark.mesh16
def test_dense_model_on_pd_plus_ma_runs_its_ffn_on_the_expert_slice():
    llm = run_and_compare(str(GOLDEN / "llama"), "configs/deployments/cpu16-ma.yaml",
                          staged=True, trace=True)
    assert {e.stage[:3] for e in llm.engine.timeline.events if e.role == "expert"} == {"ffn"}


# -- 384 devices -------------------------------------------------------------------------------
@pytest.mark.mesh384
def test_pd_on_384_devices(tmp_path):
    assert len(jax.devices()) == 384
    dep = pd(tmp_path, 2, 4, 8, start=300)  # on the last devices of the pod
    llm = run_and_compare(str(GOLDEN / "llama"), dep, count=6, staged=True)
    assert [g.runner.devices for g in llm.engine.entry] == [jax.devices()[300:304],
                                                             jax.devices()[304:308]]


@pytest.mark.mesh384
def test_ma_only_on_384_devices(tmp_path):
    """Attention domains of 16 ranks and the experts at the far end of the pod."""
    dep = ma(tmp_path, domains=2, dp=16, experts=16, start=336)
    llm = run_and_compare(str(GOLDEN / "deepseek_v3"), dep, count=6, max_tokens=3)
    assert {g.runner.device for g in llm.engine.groups} == set(jax.devices()[336:368])


@pytest.mark.mesh384
def test_cm384_pd_plus_ma_with_256_experts():
    """All 384 devices: 24 TP=4 prefill groups, 3 attention domains of 64, 96 expert dies
    with 384 slots (256 experts + 128 redundant)."""
    llm = run_and_compare(TINY_V3_256, "configs/deployments/cm384.yaml", count=6,
                          max_tokens=3, staged=True)
    assert llm.engine.stats()["kv_transfers"] == 4  # max_tokens 1 ends on prefill
    pool = llm.engine.drivers[-1]
    assert pool.expert_map.num_slots == 384 and pool.expert_map.num_redundant == 128
    assert len(pool.domains) == 3 and len(pool.groups) == 192


# -- threaded (the server's engine): every group and pool in its own thread -------------------
def test_threaded_engine_streams_identical_tokens_and_aborts_cleanly(tmp_path):
    """PD + MA: prefill groups in their threads hand off to the MA pool in its own."""
    import asyncio
    import time

    from serving.core.async_engine import AsyncEngine, EngineArgs

    deployment = ma(tmp_path, domains=2, dp=1, experts=4, prefill=(1, 2))
    engine = AsyncEngine.from_args(EngineArgs(
        model=str(GOLDEN / "deepseek_v3"), dtype="float32", deployment=deployment,
        max_num_seqs=8, kv_cache_bytes=8 << 20))
    rng = np.random.default_rng(1)
    prompts = [rng.integers(2, engine.cfg.vocab_size, int(rng.integers(2, 17))).tolist()
               for _ in range(8)]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    async def one(i):
        got = []
        async for out in engine.generate(prompts[i], params, f"r{i}"):
            got = out.outputs[0].token_ids
        return got

    async def abandoned():  # the client goes away after two tokens: aborted everywhere
        stream = engine.generate(prompts[0], long, "gone")
        async for out in stream:
            if len(out.outputs[0].token_ids) >= 2:
                break
        await stream.aclose()

    async def run():
        return await asyncio.gather(*(one(i) for i in range(len(prompts))), abandoned())

    engine.start()
    try:
        results = asyncio.run(run())[:-1]
        for _ in range(200):  # the abort reaches the decode side asynchronously
            if engine.stats()["kv_usage"] == 0:
                break
            time.sleep(0.05)
        stats = engine.stats()
    finally:
        engine.shutdown()
    gen = LocalGenerator(engine.llm.params, engine.cfg)
    for prompt, got in zip(prompts, results, strict=True):
        seq = Sequence(prompt, params)
        gen.run([seq])
        assert got == seq.output_ids
    assert stats["kv_usage"] == 0 and stats["num_running"] == 0
