"""Several processes, one device list: ``jax.distributed`` set up before JAX starts.

Each process owns a slice of the global device list (``jax.devices()``: every process's
devices, ordered by process), so a deployment's device ranges mean the same devices whatever
the number of processes. On TPU/GPU the devices are the hosts' own; on CPU each process
simulates its share of the deployment (``jax_num_cpu_devices`` = devices / processes) and
cross-process collectives go through gloo.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import threading
from typing import Any

from sharding.devices import DeviceSetupError, backends_started, size_dispatch_pool

log = logging.getLogger(__name__)

# For every process to join (a cluster's processes start unevenly); XDS_JOIN_TIMEOUT_S sets it
JOIN_TIMEOUT_S = 120


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Where this process stands among the processes of one engine.

    Attributes:
      coordinator: ``HOST:PORT`` of the ``jax.distributed`` coordinator (process 0 serves it).
      num_processes: processes in all.
      process_id: this process, ``0 .. num_processes - 1``; process 0 runs the control plane.
      heartbeat_s: seconds between the control channel's heartbeats.
      timeout_s: a peer silent this long (or gone) is reported failed.
    """

    coordinator: str
    num_processes: int
    process_id: int
    heartbeat_s: float = 1.0
    timeout_s: float = 10.0

    def __post_init__(self) -> None:
        host, _, port = self.coordinator.rpartition(":")
        if not host or not port.isdigit():
            raise DeviceSetupError(f"coordinator must be HOST:PORT, got {self.coordinator!r}")
        if not isinstance(self.num_processes, int) or self.num_processes < 1:
            raise DeviceSetupError(
                f"num_processes must be a positive integer, got {self.num_processes!r}")
        if not isinstance(self.process_id, int) or not 0 <= self.process_id < self.num_processes:
            raise DeviceSetupError(f"process_id must be in 0..{self.num_processes - 1}, got "
                                   f"{self.process_id!r}")
        if not 0 < self.heartbeat_s < self.timeout_s:
            raise DeviceSetupError(f"need 0 < heartbeat_s < timeout_s, got {self.heartbeat_s} "
                                   f"and {self.timeout_s}")

    @property
    def host(self) -> str:
        return self.coordinator.rpartition(":")[0]

    @property
    def is_leader(self) -> bool:
        return self.process_id == 0

    @classmethod
    def of(cls, value: DistributedConfig | dict[str, Any] | None) -> DistributedConfig | None:
        """From a config, a dict of its fields (``LLM(distributed={...})``), or None."""
        if value is None or isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise DeviceSetupError(f"distributed must be a dict or DistributedConfig, got "
                                   f"{type(value).__name__}")
        unknown = set(value) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise DeviceSetupError(f"distributed: unknown keys {sorted(unknown)}")
        return cls(**value)


def initialize(config: DistributedConfig, devices_needed: int = 0,
               collectives: bool = False) -> None:
    """Join the processes of ``config`` (``jax.distributed.initialize``) before JAX starts.

    ``devices_needed``: the deployment's device count; on CPU each process then simulates
    ``devices_needed / num_processes`` devices (an error if that does not divide). Calling it
    again in a process already set up this way does nothing. ``collectives``: as
    ``sharding.devices.configure_cpu_devices``.
    """
    import jax
    from jax._src import distributed

    state = distributed.global_state
    if state.client is not None:
        if (state.num_processes, state.process_id) != (config.num_processes, config.process_id):
            raise DeviceSetupError(
                f"this process already joined as {state.process_id} of {state.num_processes}")
        return
    if backends_started():
        raise DeviceSetupError("jax.distributed must start before JAX does: pass distributed= "
                               "to LLM (or the --coordinator flags) before any JAX computation")
    if devices_needed:
        if devices_needed % config.num_processes:
            raise DeviceSetupError(
                f"the deployment's {devices_needed} devices do not split evenly over "
                f"{config.num_processes} processes")
        if collectives:
            size_dispatch_pool(devices_needed // config.num_processes)
        jax.config.update("jax_num_cpu_devices", devices_needed // config.num_processes)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    log.info("process %d of %d joining %s", config.process_id, config.num_processes,
             config.coordinator)
    timeout = join_timeout()
    joined = threading.Event()
    threading.Thread(target=_exit_unjoined, args=(config, joined, timeout),
                     name="xds-join-watch", daemon=True).start()
    try:  # jax.distributed waits longer: the watcher has the last word
        jax.distributed.initialize(config.coordinator, config.num_processes, config.process_id,
                                   initialization_timeout=timeout + 10,
                                   heartbeat_timeout_seconds=max(int(config.timeout_s * 3), 10))
    finally:
        joined.set()


def join_timeout() -> int:
    """Seconds every process has to join: ``XDS_JOIN_TIMEOUT_S``, else ``JOIN_TIMEOUT_S``."""
    text = os.environ.get("XDS_JOIN_TIMEOUT_S", "").strip()
    if not text:
        return JOIN_TIMEOUT_S
    try:
        seconds = int(text)
    except ValueError:
        seconds = 0
    if seconds < 2:
        raise DeviceSetupError(f"XDS_JOIN_TIMEOUT_S must be a whole number of seconds >= 2, "
                               f"got {text!r}")
    return seconds


def _exit_unjoined(config: DistributedConfig, joined: threading.Event, seconds: float) -> None:
    """Exit with an error naming what to check where the processes have not all joined in
    ``seconds``: jax.distributed would abort the process just after, with a native stack
    trace and no word of which setting is wrong."""
    if joined.wait(seconds):
        return
    if config.process_id == 0:
        what = (f"process 0 waited {seconds:.0f} s at {config.coordinator} for the other "
                f"{config.num_processes - 1}: start each with the same --coordinator and "
                f"--num-processes {config.num_processes} and its own --process-id")
    else:
        what = (f"process {config.process_id} of {config.num_processes} could not join "
                f"{config.coordinator} within {seconds:.0f} s: is process 0 running there, "
                f"with --num-processes {config.num_processes}?")
    log.error("%s", what)
    print(f"xds: error: {what}", file=sys.stderr, flush=True)
    os._exit(1)


def process_count() -> int:
    """Processes joined by ``initialize`` (1 without it), read without starting JAX."""
    from jax._src import distributed

    state = distributed.global_state
    return state.num_processes if state.client is not None else 1


def native_stdout_to_stderr() -> None:
    """Send what native code prints on stdout (gloo's connection notices) to stderr, keeping
    Python's ``sys.stdout`` on the real stdout: a command's output stays exactly its own."""
    import os
    import sys

    sys.stdout.flush()
    real = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = os.fdopen(real, "w", buffering=1, encoding=sys.stdout.encoding,
                           errors=sys.stdout.errors)
