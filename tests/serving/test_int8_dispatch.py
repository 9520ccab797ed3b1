"""INT8 dispatch in MA serving (``decode_experts.dispatch_dtype: int8``): logits stay within a
stated bound of the bf16 path, and the timeline's A2E and expert-mesh bytes shrink."""

import numpy as np
import pytest

from serving.core.engine import Engine
from serving.core.timeline import Timeline
from serving.disagg.ma import MAPool
from serving.disagg.ma_layout import MALayout
from sharding.deployment import DeploymentFieldError
from tests.collectives.cases import need_devices
from tests.helpers import GOLDEN
from tests.serving.test_disaggregation import ma
from tests.serving.test_ma import GROUP, requests_for
from xds_jax.loading.loader import load_model

# Per-row INT8 errs by at most max|x| / 254 per element, about bf16's own rounding (2^-8), so
# the bound: INT8 moves the logits of the bf16 path by at most twice what bf16 itself moves
# them from float32, and by at most 2% of the largest logit.
INT8_BOUND = 0.02


def step_logits(params, cfg, path: str, dtype: str, timeline=None) -> tuple[list, dict]:
    """Logits of the first two steps (prefill, then decode) of the same requests."""
    pool = MAPool(params, cfg, MALayout.load(path, cfg, dispatch_dtype=dtype), GROUP,
                  timeline=timeline)
    captured = []
    run = pool.pipeline.run

    def recording(per_domain):
        result = run(per_domain)
        captured.extend(np.asarray(logits, np.float32) for _, logits in result.logits)
        return result

    pool.pipeline.run = recording
    engine = Engine(None, cfg, groups=pool.groups, drivers=[pool])
    for r in requests_for(cfg.vocab_size, 8, seed=7):
        engine.submit(r)
    pool.step()
    pool.step()
    summary = timeline.summary() if timeline is not None else {}
    return captured, summary


def test_int8_dispatch_logits_within_bound_and_fewer_bytes(tmp_path):
    need_devices(8)
    path = ma(tmp_path, 2, 2, 4)
    m = load_model(GOLDEN / "deepseek_v3", dtype="bfloat16", use_cache=False)
    ref, bf16 = step_logits(m.params, m.cfg, path, "auto", Timeline())
    got, int8 = step_logits(m.params, m.cfg, path, "int8", Timeline())
    f32 = load_model(GOLDEN / "deepseek_v3", dtype="float32", use_cache=False)
    exact, _ = step_logits(f32.params, f32.cfg, path, "auto")
    assert len(ref) == len(got) == len(exact) >= 2

    def max_diff(xs, ys) -> float:
        return max(float(np.max(np.abs(a - b))) for a, b in zip(xs, ys, strict=True))

    err, bf16_err = max_diff(ref, got), max_diff(ref, exact)
    peak = max(float(np.max(np.abs(a))) for a in ref)
    print(f"max |dlogit|: int8 vs bf16 {err:.4f} ({err / peak:.2%} of max |logit| "
          f"{peak:.2f}); bf16 vs float32 {bf16_err:.4f}")
    assert err <= min(2 * bf16_err, INT8_BOUND * peak)
    for role in ("a2e", "expert"):
        ratio = int8[role]["bytes"] / bf16[role]["bytes"]
        print(f"{role} bytes int8 / bf16: {ratio:.3f}")
        assert ratio < 0.8
    assert int8["e2a"]["bytes"] == bf16["e2a"]["bytes"]  # combine stays bf16


def test_dispatch_dtype_is_checked(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(open(ma(tmp_path, 2, 2, 4)).read().replace(
        "decode_experts:\n", "decode_experts:\n    dispatch_dtype: int4\n"))
    m = load_model(GOLDEN / "deepseek_v3", dtype="float32", use_cache=False)
    with pytest.raises(DeploymentFieldError, match="dispatch_dtype must be one of"):
        MALayout.load(str(bad), m.cfg)
