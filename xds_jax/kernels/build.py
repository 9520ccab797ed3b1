"""Build, cache and load xds-jax's C++ CPU kernels (XLA FFI handlers), once per process.

A kernel's source ships with the package (``xds_jax/kernels/*.cc`` and the ``*.h`` they
include); the first process that needs it compiles it with the system C++ compiler (``$CXX``,
default ``g++``) against the XLA FFI headers jaxlib ships, into ``$XDS_CACHE_DIR/kernels/``
(``~/.cache/xds_jax/kernels``), named by a hash of the sources, the headers' jaxlib version
and the compiler, so a changed source or jaxlib builds anew and no process reads a
half-written file; a cache directory that cannot be written (a container's read-only home)
builds under the temporary directory. The first load in a process builds every library not
yet cached at once, one compiler process each (all are needed as soon as a model runs on an
x86 CPU: 47 s one after another on a 2-core machine, ~24 s together), and a library is built
under a file lock, so processes started together (a test suite's, a multi-process launch's)
compile it once, the others waiting for it.
Where it cannot be built (no compiler, a failed build) or ``XDS_CPU_KERNELS=0`` is set,
``load`` returns None and the callers keep XLA's own ops: the kernels are a speed-up, never a
requirement.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import jax
import jaxlib

log = logging.getLogger(__name__)
SOURCE_DIR = Path(__file__).parent
# -fopenmp-simd: the `omp simd` loops vectorise (reductions included) without OpenMP's runtime
FLAGS = ["-O3", "-std=c++17", "-fopenmp-simd", "-shared", "-fPIC", "-Wno-return-type",
         "-Wno-attributes"]
_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | None] = {}
_built: dict[str, Path | Exception] = {}  # name -> its library, or why it could not be built


def enabled() -> bool:
    """False where ``XDS_CPU_KERNELS=0`` (or ``false``/``off``) turns the kernels off."""
    return os.environ.get("XDS_CPU_KERNELS", "1").strip().lower() not in ("0", "false", "off",
                                                                          "no")


def cache_dir() -> Path:
    return Path(os.environ.get("XDS_CACHE_DIR", Path.home() / ".cache" / "xds_jax")) / "kernels"


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def library_path(name: str, compiler: str) -> Path:
    """Where ``name``'s library is cached: hashed on its sources, jaxlib, the compiler and its
    flags."""
    source = b"".join(p.read_bytes() for p in [SOURCE_DIR / f"{name}.cc",
                                                *sorted(SOURCE_DIR.glob("*.h"))])
    key = hashlib.sha256(source + jaxlib.__version__.encode() + compiler.encode()
                         + " ".join(FLAGS).encode()).hexdigest()
    return cache_dir() / f"{name}-{key[:16]}.so"


def compile_library(name: str, compiler: str, out: Path) -> None:
    """Compile ``name.cc`` to the shared library ``out`` (atomically: a temporary file moved
    into place). Raises ``RuntimeError`` with the compiler's message on failure."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE_DIR / f"{name}.cc"),
           "-o", tmp]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load(name: str) -> ctypes.CDLL | None:
    """The kernel library ``name`` (built if needed), or None where it cannot be had (the
    reason logged once)."""
    with _lock:
        if name in _loaded:
            return _loaded[name]
        lib = None
        if enabled():
            try:
                lib = _build_and_open(name)
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                log.warning("CPU kernel %s unavailable, XLA's ops run instead: %s", name, e)
        _loaded[name] = lib
        return lib


def load_x86_cpu(name: str) -> ctypes.CDLL | None:
    """``load(name)`` where JAX runs on an x86-64 CPU (the kernels are AVX code); None
    elsewhere, where the callers keep XLA's ops (Arm, TPU, GPU)."""
    if jax.default_backend() != "cpu":
        return None
    if platform.machine().lower() not in ("x86_64", "amd64"):
        log.debug("CPU kernel %s: x86-64 only, %s runs XLA's ops", name, platform.machine())
        return None
    return load(name)


def library_names() -> list[str]:
    """Every kernel library the package ships (one per ``*.cc``)."""
    return sorted(p.stem for p in SOURCE_DIR.glob("*.cc"))


@contextmanager
def _file_lock(out: Path):
    """Hold an exclusive lock beside ``out`` (created with its directory) while building it:
    another process or thread building the same library waits, then finds it built."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f"{out.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def build(name: str, compiler: str) -> Path:
    """``name``'s library, compiled first if it is not cached (in the temporary directory where
    the cache directory cannot be written)."""
    path = library_path(name, compiler)
    if path.is_file():
        return path
    try:
        return _build_at(name, compiler, path)
    except OSError as e:  # a read-only cache (a container's home): build in /tmp instead
        fallback = Path(tempfile.gettempdir()) / "xds_jax-kernels" / path.name
        log.info("cache directory not writable (%s); building %s in %s", e, name, fallback)
        return _build_at(name, compiler, fallback)


def _build_at(name: str, compiler: str, path: Path) -> Path:
    """``path``, compiled under its lock unless another process built it meanwhile."""
    with _file_lock(path):
        if not path.is_file():
            log.info("building CPU kernel %s -> %s", name, path)
            compile_library(name, compiler, path)
    return path


def _build_all(compiler: str) -> None:
    """Build every library not built yet in this process, concurrently; each one's path or
    failure goes to ``_built``."""
    names = [n for n in library_names() if n not in _built]

    def one(name: str) -> Path | Exception:
        try:
            return build(name, compiler)
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            return e

    if names:
        with ThreadPoolExecutor(len(names), thread_name_prefix="xds-kernel-build") as pool:
            _built.update(zip(names, pool.map(one, names), strict=True))


def _build_and_open(name: str) -> ctypes.CDLL:
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError(f"no C++ compiler ({os.environ.get('CXX', 'g++')}) on PATH")
    if name not in _built:
        _build_all(compiler)
    built = _built.get(name)
    if built is None:
        raise RuntimeError(f"no kernel source {name}.cc in {SOURCE_DIR}")
    if isinstance(built, Exception):
        raise built
    return ctypes.CDLL(str(built))
