"""``sharding.devices``: XLA:CPU's dispatch pool is sized so that a collective whose
participants become ready while the host has 32+ launches queued behind it still gets a pool
thread for every participant (the cause of an MA step's rare SIGABRT)."""

import os
import subprocess
import sys
import textwrap

STARVE = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from sharding.devices import configure_cpu_devices

    configure_cpu_devices(8, collectives=True)
    d = jax.devices()
    mz, ma, mb = (Mesh(np.array(x), ("x",)) for x in (d[:2], d, d[2:]))
    smap = lambda f, m: jax.jit(jax.shard_map(f, mesh=m, in_specs=P("x"), out_specs=P("x")))
    slow = smap(lambda v: jax.lax.fori_loop(0, 300, lambda i, y: jnp.tanh(y @ y), v), mz)
    psum = smap(lambda v: jax.lax.psum(v, "x"), ma)
    inc = smap(lambda v: v + 1, mb)
    z = jax.device_put(np.full((1024, 512), 1 / 512, np.float32), NamedSharding(mz, P("x")))
    a = jax.device_put(np.ones((8, 4), np.float32), NamedSharding(ma, P("x")))
    b = jax.device_put(np.zeros((6, 4), np.float32), NamedSharding(mb, P("x")))
    jax.block_until_ready((slow(z), psum(a), inc(b)))
    z, a = slow(z), psum(a)  # the all-reduce waits for the slow program (one launch at a time)
    for _ in range(40):  # queued behind it: devices 2..7 reach 32 computations in flight
        b = inc(b)
    jax.block_until_ready((z, a, b))
""")


def test_launches_queued_behind_a_collective_leave_its_participants_a_thread():
    """XLA:CPU runs every device's part of a multi-device launch on one pool of
    max(PJRT_NPROC or cores, devices) threads, and a launch blocks its pool thread while its
    device has 32 computations in flight. With 8 threads for 8 devices (a 2-core host), the
    queued launches take the threads the all-reduce's participants need: it never completes,
    and the rendezvous terminate timeout aborts the process (SIGABRT)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PJRT_NPROC", "NPROC", "XDS_CPU_DEVICES")}
    env["XLA_FLAGS"] = "--xla_cpu_collective_call_terminate_timeout_seconds=10"
    done = subprocess.run([sys.executable, "-c", STARVE], env=env, capture_output=True,
                          text=True, timeout=300, cwd=os.getcwd())
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_pool_gets_two_threads_a_device_and_keeps_a_larger_setting(monkeypatch):
    from sharding.devices import size_dispatch_pool

    monkeypatch.delenv("PJRT_NPROC", raising=False)
    size_dispatch_pool(8)
    assert os.environ["PJRT_NPROC"] == str(max(16, os.cpu_count() or 1))
    monkeypatch.setenv("PJRT_NPROC", "4096")
    size_dispatch_pool(8)
    assert os.environ["PJRT_NPROC"] == "4096"


def test_only_layouts_that_queue_collectives_size_the_pool(monkeypatch):
    """The pool is also XLA:CPU's intra-op pool (more threads than cores cost a one-device
    decode step ~6%), so only MA and expert-parallel layouts ask for it."""
    import jax

    from sharding.deployment import read_deployment
    from sharding.devices import configure_cpu_devices, queues_collectives

    n = len(jax.devices())
    monkeypatch.delenv("PJRT_NPROC", raising=False)
    configure_cpu_devices(n)  # JAX has started: the count stays, the pool is not asked for
    assert "PJRT_NPROC" not in os.environ
    configure_cpu_devices(n, collectives=True)
    assert int(os.environ["PJRT_NPROC"]) >= 2 * n
    layouts = {name: queues_collectives(read_deployment(f"configs/deployments/{name}.yaml"))
               for name in ("single", "cpu8-pd", "cpu10-pd-tp3", "cpu8-pd-ep", "cpu16-ma")}
    assert layouts == {"single": False, "cpu8-pd": False, "cpu10-pd-tp3": False,
                       "cpu8-pd-ep": True, "cpu16-ma": True}
    assert not queues_collectives(None)
