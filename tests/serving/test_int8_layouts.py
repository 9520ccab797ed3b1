"""INT8 weights on every layout: TP prefill pools and DP decode (PD), colocated MoE, and the
MA split (routed experts on the expert slice with their scales), each giving the greedy
tokens of the single-device loop on the same int8 weights."""

import pytest
from jax.sharding import PartitionSpec as P

from serving.disagg.ma import MAPool
from serving.disagg.ma_layout import MALayout
from tests.collectives.cases import need_devices
from tests.helpers import GOLDEN, tiny
from tests.serving.test_engine import params_for, reference, workload
from tests.serving.test_ma import (
    CPU16,
    GROUP,
    assert_matches_reference,
    requests_for,
    run_on_engine,
)
from xds_jax import LLM
from xds_jax.model.out_major import weight_for
from xds_jax.model.quant import quantize_params

PD8 = "configs/deployments/cpu8-pd.yaml"


@pytest.mark.parametrize("name, deployment", [("llama", PD8), ("deepseek_v3", PD8),
                                              ("qwen3_moe", None)])
def test_int8_engine_matches_int8_reference(name, deployment):
    """cpu8-pd: prefill on two TP=2 groups (int8 q/k/v/o and MLP split by heads / width,
    scales with them), decode on four groups; colocated MoE with int8 experts."""
    llm = LLM(str(GOLDEN / name), dtype="float32", quantization="int8", deployment=deployment,
              max_num_seqs=8, max_num_batched_tokens=48, staged=deployment is not None,
              use_param_cache=False)
    assert weight_for(llm.params["layers"][0]["attn"], "o")[0].dtype == "int8"
    if deployment is not None:
        attn = llm.engine.groups[0].runner.params["layers"][0]["attn"]
        q = "q_b" if name == "deepseek_v3" else "q"  # MLA's query up-projection
        w, transposed = weight_for(attn, q)  # stored [out, in] on CPU (model.out_major)
        spec = tuple(w.sharding.spec) + (None, None)
        assert spec[:2] == (("tp", None) if transposed else (None, "tp"))
        assert attn[q + "_t" * transposed + "_scale"].sharding.spec == P("tp")
    prompts = workload(llm.cfg.vocab_size, 10, seed=5)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        [params_for(i) for i in range(len(prompts))])
    assert [o.outputs[0].token_ids for o in outs] == reference(llm, prompts)


@pytest.mark.mesh16
def test_int8_ma_matches_int8_reference():
    """cpu16-ma: int8 routed experts and their scales placed in the expert slots."""
    need_devices(16)
    m = tiny("deepseek_v3")
    params = quantize_params(m.params, "int8")
    pool = MAPool(params, m.cfg, MALayout.load(CPU16, m.cfg), GROUP)
    requests = requests_for(m.cfg.vocab_size, 8, seed=2)
    run_on_engine(pool, requests)
    assert_matches_reference(params, m.cfg, requests)
