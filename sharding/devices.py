"""Platform and virtual-device setup, done once before JAX initialises its backends.

On CPU, XLA can simulate N devices in one process (``jax_num_cpu_devices``). The count is
fixed at backend start, so this must run before the first ``jax.devices()`` call.
"""

from __future__ import annotations

import os

MAX_CPU_DEVICES = 768


class DeviceSetupError(RuntimeError):
    """The requested device setup cannot be applied."""


def configure_cpu_devices(count: int | None = None, collectives: bool = False) -> int:
    """Ask JAX for ``count`` virtual CPU devices (default: ``$XDS_CPU_DEVICES`` or leave as is).

    Returns the device count requested, or 0 when nothing was changed. A process already
    running on an accelerator is left alone; on CPU this must be called before JAX starts. One
    of several ``jax.distributed`` processes keeps the share ``sharding.processes`` gave it.
    ``collectives``: the process will queue many multi-device programs (an MA or expert-
    parallel decode): the dispatch pool is sized for them (``size_dispatch_pool``).
    """
    if _joined_processes():
        return 0
    if count is None:
        env = os.environ.get("XDS_CPU_DEVICES")
        if not env:
            return 0
        try:
            count = int(env)
        except ValueError as e:
            raise DeviceSetupError(f"XDS_CPU_DEVICES must be an integer, got {env!r}") from e
    if not 1 <= count <= MAX_CPU_DEVICES:
        raise DeviceSetupError(
            f"virtual CPU device count must be in 1..{MAX_CPU_DEVICES}, got {count}"
        )
    import jax

    if collectives:
        size_dispatch_pool(count)
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError as e:  # backends already initialised
        have = len(jax.devices("cpu"))
        if have != count:
            raise DeviceSetupError(
                f"JAX already started with {have} CPU devices; {count} must be set before the "
                "first JAX computation (set XDS_CPU_DEVICES in the environment)"
            ) from e
    return count


def queues_collectives(deployment) -> bool:
    """Whether a deployment (a ``DeploymentSpec``; None: one group, no layout) decodes by
    queueing many multi-device programs a step (MA's hops, expert-parallel dispatch and
    combine), so the CPU dispatch pool must be sized for them (``size_dispatch_pool``)."""
    if deployment is None:
        return False
    return deployment.is_ma or any(r.expert_parallel for r in deployment.roles.values())


def size_dispatch_pool(devices: int) -> None:
    """Give XLA:CPU's dispatch pool two threads per virtual device (``PJRT_NPROC``, read when
    the CPU client is created; a larger value already set is kept).

    The CPU client runs every device's part of a multi-device launch on one pool of
    max(``PJRT_NPROC`` or cores, devices) threads, and a launch blocks its pool thread while
    its device already has 32 computations in flight. With one thread per device (8 on a
    2-core host) an MA step, which queues dozens of programs on the expert devices without
    waiting, let the next program's blocked launches take every thread a queued collective's
    participants needed: the rendezvous never completed and XLA aborted the process after its
    40 s terminate timeout (once in CI; 3 in 12 runs of the EPLB test on their own). Only one
    collective runs at a time, so at most N threads wait in a rendezvous and at most N
    launches block: 2N threads always leave a participant one.

    Only where such programs run (``queues_collectives``): the pool is also
    XLA:CPU's intra-op pool, and 16 threads for 8 devices on 2 cores made a one-device
    SmolLM2 decode step ~6% slower at batch 1 (27.1-28.2 ms against 28.6-30.8, quiet
    machine, alternating processes)."""
    want = max(2 * devices, os.cpu_count() or 1)
    have = os.environ.get("PJRT_NPROC", "")
    if not have.isdigit() or int(have) < want:
        os.environ["PJRT_NPROC"] = str(want)


def backends_started() -> bool:
    """Whether JAX has initialised its backends (after which the device count is fixed)."""
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()


def ensure_cpu_devices(needed: int, collectives: bool = False) -> int:
    """Size the virtual CPU mesh for a layout of ``needed`` devices, if JAX has not started.

    The count is the largest of ``needed``, ``$XDS_CPU_DEVICES`` and what was configured
    before, so a process set up for more keeps them. Once JAX has started nothing changes
    (a deployment that needs more devices than there are then fails with an error that says
    how to start over). Returns the count in force, or 0 when it could not be changed. Only the
    CPU backend reads this setting: on TPU/GPU the real devices are used.
    """
    import jax

    if backends_started() or _joined_processes():
        return 0
    env = os.environ.get("XDS_CPU_DEVICES")
    count = max(needed, int(env) if env and env.isdigit() else 0,
                jax.config.jax_num_cpu_devices)
    if count <= 1:
        return 0
    return configure_cpu_devices(min(count, MAX_CPU_DEVICES), collectives)


def _joined_processes() -> bool:
    """Whether this process joined others (``sharding.processes.initialize``): its CPU device
    count is then its share of the deployment, already set."""
    from jax._src import distributed

    return distributed.global_state.client is not None
