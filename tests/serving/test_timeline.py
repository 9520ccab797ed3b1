"""Timeline: start/end resolution from dispatch, dependencies and streams; traces; summary."""

import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from serving.core.timeline import Timeline, _Pending, format_summary


def _hand_built(entries) -> Timeline:
    """A timeline whose events have given (dispatch, ready) times, no watcher involved."""
    tl = Timeline()
    for role, stage, stream, dispatch, ready, deps, meta in entries:
        tl._items.append(_Pending(role, stage, stream, dispatch, deps, meta, ready=ready))
    return tl


def test_start_is_the_latest_of_dispatch_dependencies_and_stream():
    tl = _hand_built([
        ("attention", "attn", "attn", 0.0, 2.0, (), {"layer": 0}),
        ("a2e", "send", "a2e", 0.1, 2.5, (0,), {"bytes": 100}),  # waits for attn (dep)
        ("expert", "moe", "expert", 0.2, 4.0, (1,), {"bytes": 0}),  # waits for send
        ("attention", "attn", "attn", 0.3, 3.0, (), {"layer": 1}),  # waits for the stream
        ("e2a", "recv", "e2a", 5.0, 5.5, (2,), {"bytes": 60}),  # dispatched late
    ])
    ev = tl.events
    assert [(e.start, e.end) for e in ev] == [(0.0, 2.0), (2.0, 2.5), (2.5, 4.0), (2.0, 3.0),
                                              (5.0, 5.5)]
    assert ev[0].layer == 0 and ev[1].bytes == 100


def test_summary_busy_span_idle_and_kv_waits():
    tl = _hand_built([
        ("expert", "moe", "expert", 0.0, 1.0, (), {}),
        ("expert", "moe", "expert", 3.0, 4.0, (), {}),
        ("a2e", "send", "a2e", 0.0, 0.5, (), {"bytes": 2**20}),
    ])
    tl.span("decode", "kv_wait", 1.0, 1.25)
    s = tl.summary()
    assert s["expert"]["busy_s"] == 2.0 and s["expert"]["span_s"] == 4.0
    assert s["expert"]["idle_fraction"] == 0.5
    assert s["a2e"]["bytes"] == 2**20 and s["a2e"]["time_s"] == 0.5
    assert s["decode"]["kv_wait_s"] == 0.25
    table = format_summary(s)
    assert "expert" in table and "50.0" in table and "1.000" in table


def test_real_jitted_work_is_timed_in_order_and_traced(tmp_path):
    f = jax.jit(lambda x: jnp.tanh(x @ x) @ x)
    x = jnp.ones((256, 256))
    tl = Timeline()
    first = tl.record("attention", "a", f(x), stream="s0", layer=0)
    y = f(x)
    second = tl.record("expert", "b", y, stream="s1", deps=[first], layer=0, bytes=7)
    tl.record("attention", "c", f(y), stream="s0", deps=[second], domain=1, micro_batch=0)
    a, b, c = tl.events
    assert a.dispatch <= a.start < a.end and b.start >= a.end and c.start >= max(a.end, b.end)
    assert all(e.end <= time.perf_counter() for e in (a, b, c))
    trace = json.loads(tl.save(tmp_path / "trace.json").read_text())
    xs = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert [e["name"] for e in xs] == ["a", "b", "c"]
    assert xs[2]["args"] == {"domain": 1, "micro_batch": 0, "bytes": 0}
    assert xs[1]["args"] == {"layer": 0, "bytes": 7}
    assert xs[0]["pid"] == xs[2]["pid"] != xs[1]["pid"] and xs[0]["tid"] == xs[2]["tid"]
    names = {e["args"]["name"] for e in trace["traceEvents"] if e["ph"] == "M"}
    assert {"attention", "expert", "s0", "s1"} <= names
    assert np.isfinite([e["ts"] + e["dur"] for e in xs]).all()
    tl.close()
    assert len(tl.events) == 3
    assert tl.record("expert", "d", f(x), stream="s1") == 3  # a closed timeline restarts
    assert len(tl.events) == 4


def test_disabled_timeline_records_nothing_and_starts_no_thread():
    tl = Timeline(enabled=False)
    assert tl.record("attention", "a", jnp.ones(3), stream="s") is None
    assert tl.span("decode", "kv_wait", 0.0, 1.0) is None
    assert tl.events == [] and tl._queues == {} and tl.summary() == {}
