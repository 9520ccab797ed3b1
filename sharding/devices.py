"""Platform and virtual-device setup, done once before JAX initialises its backends.

On CPU, XLA can simulate N devices in one process (``jax_num_cpu_devices``). The count is
fixed at backend start, so this must run before the first ``jax.devices()`` call.
"""

from __future__ import annotations

import os

MAX_CPU_DEVICES = 768


class DeviceSetupError(RuntimeError):
    """The requested device setup cannot be applied."""


def configure_cpu_devices(count: int | None = None) -> int:
    """Ask JAX for ``count`` virtual CPU devices (default: ``$XDS_CPU_DEVICES`` or leave as is).

    Returns the device count requested, or 0 when nothing was changed. A process already
    running on an accelerator is left alone; on CPU this must be called before JAX starts.
    """
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
