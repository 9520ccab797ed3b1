"""Timeline: start times observed by markers on the devices, ends by the watcher, not inferred
from dispatch order or dependencies; a schedule serialised on the devices is reported as
serialised; traces; summary."""

import json
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from serving.core import timeline as timeline_module
from serving.core.timeline import Start, Timeline, _Pending, format_summary


def _hand_built(entries) -> Timeline:
    """A timeline whose events have given (dispatch, observed start, ready) times, no device
    involved (observed start None: no marker ran)."""
    tl = Timeline()
    for role, stage, stream, dispatch, observed, ready, deps, meta in entries:
        begun = Start(dispatch, observed=observed)
        tl._items.append(_Pending(role, stage, stream, dispatch, deps, meta, ready=ready,
                                  begun=begun))
    return tl


def test_start_is_the_observed_marker_time_never_inferred():
    tl = _hand_built([
        ("attention", "attn", "attn", 0.0, 0.5, 2.0, (), {"layer": 0}),
        ("a2e", "send", "a2e", 0.1, 1.0, 2.5, (0,), {"bytes": 100}),  # began before dep ended
        ("attention", "attn", "attn", 0.3, None, 3.0, (), {"layer": 1}),  # no marker: dispatch
        ("e2a", "recv", "e2a", 5.0, 6.0, 5.5, (1,), {"bytes": 60}),  # marker late: clamped
    ])
    ev = tl.events
    assert [(e.start, e.end) for e in ev] == [(0.5, 2.0), (1.0, 2.5), (0.3, 3.0), (5.5, 5.5)]
    assert [e.observed_start for e in ev] == [True, True, False, True]
    assert ev[0].layer == 0 and ev[1].bytes == 100 and ev[1].deps == (0,)


def test_collective_latency_is_the_mean_per_collective_of_ready_events():
    tl = _hand_built([
        ("a2e", "a2e_l1", "a2e/d0", 0.0, 1.0, 2.0, (), {}),
        ("a2e", "a2e_l2", "a2e/d1", 0.0, 1.0, 4.0, (), {}),
        ("shared_expert", "shared_e2a_l1", "shared/e2a/d0", 0.0, None, 0.5, (), {}),
        ("expert", "moe_l1", "expert", 0.0, 0.0, 9.0, (), {}),  # compute, not a collective
        ("e2a", "e2a_l1", "e2a/d0", 0.0, 1.0, None, (), {}),  # not seen ready yet
    ])
    tl.span("transfer", "kv_transfer", 1.0, 1.25)
    assert tl.collective_latency() == {"a2e": 2.0, "shared_e2a": 0.5, "kv_transfer": 0.25}


def _pair_mesh(first: int) -> NamedSharding:
    """Rows split over two devices: a two-device program runs on XLA:CPU's thread pool, off
    the dispatching thread (a one-device program runs inline at dispatch)."""
    mesh = Mesh(np.array(jax.devices()[first:first + 2]), ("x",))
    return NamedSharding(mesh, PartitionSpec("x"))


def _held(x, gate: threading.Event):
    """``x`` passed through a program that cannot finish before ``gate`` is set."""
    def wait(v):
        gate.wait()
        return v

    def body(v):
        return io_callback(wait, jax.ShapeDtypeStruct(v.shape, v.dtype), v)

    spec = x.sharding.spec
    return jax.jit(jax.shard_map(body, mesh=x.sharding.mesh, in_specs=spec, out_specs=spec))(x)


def test_stage_starts_when_its_input_is_ready_not_when_queued():
    """Stage b is queued while a is held back, on other devices and with no ``deps``; its
    input comes from a through a copy the timeline does not see. b starts once the devices
    have its input, after a was released, not when it was queued (where inferring from
    dispatch, dependencies and streams would put it)."""
    gate = threading.Event()
    work = jax.jit(lambda v: jnp.tanh(v @ v.T) @ v)
    x = jax.device_put(jnp.ones((256, 128)), _pair_mesh(0))
    tl = Timeline()
    begun = tl.begin(x)
    jax.block_until_ready(begun.markers)  # a's marker has run before anything is held
    held = _held(x, gate)
    a = tl.record("expert", "a", held, stream="s0", begun=begun)
    y = jax.device_put(held, _pair_mesh(2))
    begun = tl.begin(y)
    b = tl.record("attention", "b", work(y), stream="s1", begun=begun)
    released = time.perf_counter()
    gate.set()
    ea, eb = tl.events
    assert ea.observed_start and eb.observed_start and (a, b) == (0, 1)
    assert ea.start < released < ea.end
    assert eb.dispatch < released < eb.start <= eb.end
    assert tl.summary()["attention"]["busy_s"] == eb.end - eb.start
    assert not timeline_module._starts  # every marker ran and was collected


def test_serialize_runs_each_stage_alone():
    """``serialize=True``: every stage is dispatched after the previous one was observed done,
    so no two events overlap, whatever the streams."""
    work = jax.jit(lambda v: jnp.tanh(v @ v.T) @ v)
    xs = [jax.device_put(jnp.ones((128, 64)) * i, _pair_mesh(2 * i)) for i in range(3)]
    tl = Timeline(serialize=True)
    for i, x in enumerate(xs * 2):
        tl.record("expert" if i % 2 else "attention", f"s{i}", work(x), stream=f"s{i % 3}",
                  begun=tl.begin(x))
    events = sorted(tl.events, key=lambda e: e.start)
    assert all(e.observed_start for e in events)
    assert all(b.start >= a.end for a, b in zip(events, events[1:], strict=False))


def test_summary_busy_span_idle_and_kv_waits():
    tl = _hand_built([
        ("expert", "moe", "expert", 0.0, 0.0, 1.0, (), {}),
        ("expert", "moe", "expert", 2.5, 3.0, 4.0, (), {}),
        ("a2e", "send", "a2e", 0.0, None, 0.5, (), {"bytes": 2**20}),
    ])
    tl.span("decode", "kv_wait", 1.0, 1.25)
    s = tl.summary()
    assert s["expert"]["busy_s"] == 2.0 and s["expert"]["span_s"] == 4.0
    assert s["expert"]["idle_fraction"] == 0.5
    assert s["a2e"]["bytes"] == 2**20 and s["a2e"]["time_s"] == 0.5
    assert s["decode"]["kv_wait_s"] == 0.25
    table = format_summary(s)
    assert "expert" in table and "50.0" in table and "1.000" in table


def test_real_jitted_work_is_timed_and_traced(tmp_path):
    f = jax.jit(lambda x: jnp.tanh(x @ x.T) @ x)
    x = jax.device_put(jnp.ones((256, 128)), _pair_mesh(0))
    tl = Timeline()
    first = tl.record("attention", "a", f(x), stream="s0", begun=tl.begin(x), layer=0)
    y = f(x)
    second = tl.record("expert", "b", y, stream="s1", deps=[first], layer=0, bytes=7)
    tl.record("attention", "c", f(y), stream="s0", deps=[second], begun=tl.begin(y), domain=1,
              micro_batch=0)
    a, b, c = tl.events
    assert a.observed_start and not b.observed_start and c.observed_start
    assert a.dispatch <= a.start <= a.end and b.start == b.dispatch and c.start >= c.dispatch
    assert all(e.end <= time.perf_counter() for e in (a, b, c))
    assert c.deps == (second,)
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
    assert tl.begin(jnp.ones(3)) is None and not timeline_module._starts
    assert tl.record("attention", "a", jnp.ones(3), stream="s") is None
    assert tl.span("decode", "kv_wait", 0.0, 1.0) is None
    assert tl.events == [] and tl._queues == {} and tl.summary() == {}
