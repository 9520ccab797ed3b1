"""JAX's persistent compilation cache, so a restart does not recompile every step program.

On by default under ``$XDS_CACHE_DIR/jit`` (``~/.cache/xds_jax/jit``); ``XDS_NO_CACHE=1`` turns it
off (with the parameter cache), ``XDS_NO_COMPILE_CACHE=1`` only it. Only programs that took a
while to compile are stored.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import jax

log = logging.getLogger(__name__)
_enabled = False


def enable_compilation_cache() -> Path | None:
    """Point JAX at the on-disk cache once per process; returns its directory (or None)."""
    global _enabled
    if os.environ.get("XDS_NO_CACHE") or os.environ.get("XDS_NO_COMPILE_CACHE"):
        return None
    root = Path(os.environ.get("XDS_CACHE_DIR", Path.home() / ".cache" / "xds_jax")) / "jit"
    if not _enabled:
        try:
            root.mkdir(parents=True, exist_ok=True)
            jax.config.update("jax_compilation_cache_dir", str(root))
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.3)
            jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
        except OSError as e:  # a read-only home directory only costs compile time
            log.warning("compilation cache disabled: %s", e)
            return None
        _enabled = True
    return root
