"""Building the CPU kernel libraries (``xds_jax.kernels.build``): all at once on first need,
each once however many processes or threads ask, failures kept per library. A stand-in
compiler (a script) records what it is asked to build; the real one is tested by every
kernel test."""

import stat
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from xds_jax.kernels import build

# The stand-in: writes the output file, logs the source it compiled, and (when told to) waits
# until as many compilers as there are libraries are running at once, or fails after 60 s.
FAKE = """#!{python}
import os, sys, time
from pathlib import Path
args = sys.argv[1:]
out, source = Path(args[args.index("-o") + 1]), Path(args[args.index("-o") - 1])
log = Path(os.environ["FAKE_LOG"])
with open(log / "compiled", "a") as f:
    f.write(source.stem + "\\n")
if source.stem in os.environ.get("FAKE_FAIL", "").split(","):
    sys.exit("error: " + source.stem + " does not compile")
(log / ("running-" + source.stem)).touch()
wait_for = int(os.environ.get("FAKE_TOGETHER", "0"))
deadline = time.monotonic() + 60
while len(list(log.glob("running-*"))) < wait_for:
    if time.monotonic() > deadline:
        sys.exit("compilers ran one after another")
    time.sleep(0.01)
time.sleep(float(os.environ.get("FAKE_SECONDS", "0")))
out.write_bytes(b"not a library")
"""


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A stand-in compiler, a fresh cache and a fresh process state; returns (compiler, log
    directory)."""
    compiler = tmp_path / "fake-g++"
    compiler.write_text(FAKE.format(python=sys.executable))
    compiler.chmod(compiler.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "log"
    log.mkdir()
    monkeypatch.setenv("FAKE_LOG", str(log))
    monkeypatch.setenv("XDS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(build, "_built", {})
    return str(compiler), log


def _compiled(log: Path) -> list[str]:
    return sorted((log / "compiled").read_text().split())


def test_the_first_build_compiles_every_library_at_once(fake, monkeypatch):
    compiler, log = fake
    names = build.library_names()
    assert {"few_row_matmul", "paged_attention", "prefill_attention", "materialize",
            "swiglu"} <= set(names)
    monkeypatch.setenv("FAKE_TOGETHER", str(len(names)))  # each waits for all to be running
    build._build_all(compiler)
    assert _compiled(log) == names
    for name in names:
        assert build._built[name] == build.library_path(name, compiler)
        assert build._built[name].read_bytes() == b"not a library"
    build._build_all(compiler)  # built: nothing compiles again
    assert _compiled(log) == names


def test_a_failed_library_keeps_its_error_and_the_others_build(fake, monkeypatch):
    compiler, log = fake
    monkeypatch.setenv("FAKE_FAIL", "swiglu")
    build._build_all(compiler)
    assert isinstance(build._built["swiglu"], RuntimeError)
    assert "swiglu does not compile" in str(build._built["swiglu"])
    assert all(build._built[n].is_file() for n in build.library_names() if n != "swiglu")


def test_concurrent_builders_of_one_library_compile_it_once(fake, monkeypatch):
    """Threads stand in for processes: the lock is a file lock, taken per open file, so two
    threads' locks exclude each other as two processes' do."""
    compiler, log = fake
    monkeypatch.setenv("FAKE_SECONDS", "0.5")  # long enough for the others to find it running
    paths = []
    threads = [threading.Thread(target=lambda: paths.append(build.build("swiglu", compiler)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert _compiled(log) == ["swiglu"]
    assert len(set(paths)) == 1 and paths[0].read_bytes() == b"not a library"


def test_load_builds_all_then_opens_the_asked_one(fake, monkeypatch, caplog):
    """``load`` through the stand-in: every library compiled in one go, the asked one's
    (unloadable) file reported, XLA's ops kept; an unknown name named."""
    compiler, log = fake
    monkeypatch.setenv("CXX", compiler)
    monkeypatch.setattr(build, "_loaded", {})
    assert build.load("materialize") is None  # "not a library": dlopen fails, logged
    assert _compiled(log) == build.library_names()
    assert "CPU kernel materialize unavailable" in caplog.text
    assert build.load("no_such_kernel") is None
    assert "no kernel source no_such_kernel.cc" in caplog.text
    assert _compiled(log) == build.library_names()


def test_an_unwritable_cache_builds_in_the_temporary_directory(fake, tmp_path, monkeypatch):
    compiler, log = fake
    (tmp_path / "not-a-dir").write_text("")
    monkeypatch.setenv("XDS_CACHE_DIR", str(tmp_path / "not-a-dir" / "cache"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    build._build_all(compiler)
    fallback = tmp_path / "tmp" / "xds_jax-kernels"
    for name in build.library_names():
        assert build._built[name] == fallback / build.library_path(name, compiler).name
        assert build._built[name].read_bytes() == b"not a library"
    assert _compiled(log) == build.library_names()
