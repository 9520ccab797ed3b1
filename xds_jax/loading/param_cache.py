"""Orbax cache of converted parameters, keyed by the source files, their sizes and mtimes.

Dequantising a GGUF or restacking experts happens once; later loads restore the converted tree.
Set ``XDS_CACHE_DIR`` to move the cache (default ``~/.cache/xds_jax``) or ``XDS_NO_CACHE=1``
to turn it off. Entries whose sources changed (a file rewritten, another reading of its config)
are never restored again, so the cache keeps the most recently used entries within
``XDS_PARAM_CACHE_GIB`` (default 32) and drops the others after each save.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import jax

log = logging.getLogger(__name__)
FORMAT_VERSION = "1"
DEFAULT_LIMIT_GIB = 32.0


def cache_root() -> Path:
    return Path(os.environ.get("XDS_CACHE_DIR", Path.home() / ".cache" / "xds_jax")) / "params"


def cache_key(files: list[Path], tag: str) -> str:
    h = hashlib.sha256(f"{FORMAT_VERSION}:{tag}".encode())
    for f in sorted(Path(p).resolve() for p in files):
        st = f.stat()
        h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def cached(files: list[Path], tag: str, build: Callable[[], dict], enabled: bool = True) -> dict:
    """Restore the tree for ``files`` from the cache, or ``build`` it and save it."""
    if not enabled or os.environ.get("XDS_NO_CACHE"):
        return build()
    import orbax.checkpoint as ocp

    target = cache_root() / cache_key(files, tag)
    if target.is_dir():
        try:
            tree = ocp.StandardCheckpointer().restore(target)
            log.info("restored converted parameters from %s", target)
            os.utime(target)  # used now: the last entry pruning drops
            return _lists_back(tree)
        except Exception as e:  # a stale or partial cache entry is rebuilt, never fatal
            log.warning("ignoring unreadable parameter cache %s: %s", target, e)
            shutil.rmtree(target, ignore_errors=True)
    params = build()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(target, params)
        checkpointer.wait_until_finished()
    except Exception as e:  # a read-only or full disk must not stop serving
        log.warning("could not cache converted parameters at %s: %s", target, e)
        shutil.rmtree(target, ignore_errors=True)
    prune(keep=target)
    return params


def limit_bytes() -> int:
    """The cache's size limit (``XDS_PARAM_CACHE_GIB``, default ``DEFAULT_LIMIT_GIB``)."""
    text = os.environ.get("XDS_PARAM_CACHE_GIB")
    try:
        gib = float(text) if text else DEFAULT_LIMIT_GIB
    except ValueError:
        log.warning("XDS_PARAM_CACHE_GIB=%r is not a number; using %s", text, DEFAULT_LIMIT_GIB)
        gib = DEFAULT_LIMIT_GIB
    return int(gib * (1 << 30))


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def prune(keep: Path | None = None) -> list[Path]:
    """Drop the least recently used entries until the cache fits ``limit_bytes()`` (``keep``,
    the entry just written, stays whatever its size); returns what was dropped."""
    root = cache_root()
    if not root.is_dir():
        return []
    entries = sorted((p for p in root.iterdir()  # never another process's save under way
                      if p.is_dir() and ".orbax-checkpoint-tmp" not in p.name),
                     key=lambda p: p.stat().st_mtime)
    sizes = {p: _size(p) for p in entries}
    total, limit, dropped = sum(sizes.values()), limit_bytes(), []
    for entry in entries:
        if total <= limit:
            break
        if keep is not None and entry.resolve() == keep.resolve():
            continue
        shutil.rmtree(entry, ignore_errors=True)
        total -= sizes[entry]
        dropped.append(entry)
    if dropped:
        log.info("parameter cache over %.1f GiB: dropped %d least recently used entries",
                 limit / (1 << 30), len(dropped))
    return dropped


def _lists_back(tree):
    """Orbax may restore lists as dicts keyed '0', '1', ...; turn them back into lists."""
    if isinstance(tree, dict):
        if tree and all(k.isdigit() for k in tree):
            return [_lists_back(tree[str(i)]) for i in range(len(tree))]
        return {k: _lists_back(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return [_lists_back(v) for v in tree]
    return tree if isinstance(tree, jax.Array) else jax.numpy.asarray(tree)
