"""``xds launch --num-processes N -- <xds command and its flags>``: one machine, N processes.

Starts N copies of the command with ``--coordinator 127.0.0.1:<free port> --num-processes N
--process-id I``, as a cluster's job scheduler would on N hosts. Process 0's stdout and stderr
are this command's; the others write to ``<log-dir>/process-I.log``. When a process exits with
a non-zero status (or is killed), the others get ``--grace`` seconds to notice and report it
(process 0 fails the requests in flight), then are terminated; the launcher names the process
that failed first, shows the end of its log and exits with its status (128 + signal number
for a signal). SIGTERM to the launcher goes to process 0 (``xds serve`` drains its requests and
shuts the engine down, which releases the others): a clean stop exits 0. Once process 0 has
exited 0 the others get ``--grace`` seconds to follow it before they are terminated. The
processes die with the launcher (on Linux, by the parent-death signal: SIGKILL), so a
``kill -9`` of it leaves nothing running.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

POLL_S = 0.1
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class LaunchError(Exception):
    """Bad ``xds launch`` usage."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xds launch", description="Run an xds command (serve, generate, chat) as N local "
        "jax.distributed processes sharing its deployment's devices; process 0 prints.",
        epilog="example: xds launch --num-processes 2 -- generate --model "
        "configs/models/deepseek-v3-tiny.json --deployment configs/deployments/cpu16-ma.yaml "
        "--temperature 0 Hello")
    parser.add_argument("--num-processes", type=int, default=2, metavar="N",
                        help="processes to start (default: %(default)s)")
    parser.add_argument("--log-dir", metavar="DIR",
                        help="where processes 1..N-1 write their output (default: a new "
                        "temporary directory, removed when every process succeeds)")
    parser.add_argument("--grace", type=float, default=15.0, metavar="SECONDS",
                        help="after a process fails, how long the others get to exit by "
                        "themselves before they are terminated (default: %(default)s)")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="the xds command and its flags, after --")
    return parser


def child_argv(command: list[str], coordinator: str, num_processes: int,
               process_id: int) -> list[str]:
    """``python -m serving.entrypoints.cli <cmd> --coordinator ... <flags>``."""
    return [sys.executable, "-m", "serving.entrypoints.cli", command[0],
            "--coordinator", coordinator, "--num-processes", str(num_processes),
            "--process-id", str(process_id), *command[1:]]


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the child killed when this process dies, even by SIGKILL
    (Linux ``prctl(PR_SET_PDEATHSIG)``); None where that is not available."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def set_death_signal() -> None:
        if prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            return  # the child runs on, as it would without this
        if os.getppid() != parent:  # the parent died before the signal was set
            os._exit(128 + signal.SIGKILL)

    return set_death_signal


def spawn(argv: list[str], env: dict[str, str], **kwargs) -> subprocess.Popen:
    """``subprocess.Popen`` of one process, which dies with this one (``die_with_parent``)."""
    return subprocess.Popen(argv, env=env, preexec_fn=die_with_parent(), **kwargs)


def describe(status: int) -> str:
    if status < 0:
        return f"was killed by {signal.Signals(-status).name}"
    return f"exited with status {status}"


def exit_code(status: int) -> int:
    return 128 - status if status < 0 else status


def tail(path: str, lines: int = 20) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def launch(command: list[str], num_processes: int, log_dir: str | None = None,
           grace: float = 15.0) -> int:
    """Run ``command`` as ``num_processes`` processes; the exit code of the launch."""
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise LaunchError("give the xds command to run after --, e.g. -- generate ...")
    if command[0] not in ("serve", "generate", "chat"):
        raise LaunchError(f"xds launch runs serve, generate or chat, not {command[0]!r}")
    if num_processes < 1:
        raise LaunchError(f"--num-processes must be positive, got {num_processes}")
    if not grace >= 0:
        raise LaunchError(f"--grace must be 0 or more seconds, got {grace}")
    temporary = log_dir is None  # removed when every process succeeds (nothing to read)
    log_dir = log_dir or tempfile.mkdtemp(prefix="xds-launch-")
    os.makedirs(log_dir, exist_ok=True)
    coordinator = f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if k != "XDS_CPU_DEVICES"}
    procs, logs = [], []
    for i in range(num_processes):
        argv = child_argv(command, coordinator, num_processes, i)
        if i == 0:
            procs.append(spawn(argv, env))
            logs.append(None)
            continue
        path = os.path.join(log_dir, f"process-{i}.log")
        with open(path, "w") as out:
            procs.append(spawn(argv, env, stdout=out, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL))
        logs.append(path)
        print(f"xds launch: process {i} is pid {procs[i].pid} (log {path})", file=sys.stderr,
              flush=True)
    signal.signal(signal.SIGTERM, lambda signum, frame: _stop_leader(procs[0]))
    try:
        status = watch(procs, logs, grace)
        if status == 0 and temporary:
            shutil.rmtree(log_dir, ignore_errors=True)
        return status
    except KeyboardInterrupt:
        _terminate(procs, 5.0)
        return 130


def _stop_leader(leader: subprocess.Popen) -> None:
    """SIGTERM: process 0 stops (a server drains first); the others follow it out."""
    if leader.poll() is None:
        leader.send_signal(signal.SIGTERM)


def watch(procs: list, logs: list, grace: float) -> int:
    """Wait for every process; on the first failure, name it and stop the rest."""
    leader_done = None
    while True:
        statuses = [p.poll() for p in procs]
        failed = next((i for i, s in enumerate(statuses) if s not in (None, 0)), None)
        if failed is not None:
            break
        if all(s == 0 for s in statuses):
            return 0
        if statuses[0] == 0:
            leader_done = leader_done or time.monotonic()
            if time.monotonic() - leader_done > grace:
                left = [i for i, s in enumerate(statuses) if s is None]
                print(f"xds launch: process 0 finished but processes {left} did not follow "
                      f"within {grace:g} s; terminating them", file=sys.stderr, flush=True)
                _terminate(procs, 5.0)
                return 1
        time.sleep(POLL_S)
    status = statuses[failed]
    print(f"xds launch: process {failed} (pid {procs[failed].pid}) {describe(status)}",
          file=sys.stderr, flush=True)
    if logs[failed]:
        print(f"xds launch: the end of {logs[failed]}:\n{tail(logs[failed])}", file=sys.stderr,
              flush=True)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        time.sleep(POLL_S)
    _terminate(procs, 5.0)
    return exit_code(status) or 1


def _terminate(procs: list, wait_s: float) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + wait_s
    for p in procs:
        try:
            p.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        return launch(args.command, args.num_processes, args.log_dir, args.grace)
    except LaunchError as error:
        print(f"xds launch: error: {error}", file=sys.stderr)
        return 2
