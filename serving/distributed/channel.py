"""The control channel: process 0 talks to every other process over one TCP connection each.

Process 0 (the leader) listens on a free port and publishes its address in the
``jax.distributed`` key-value store; the others (followers) read it there and connect. Frames
are a 5-byte header (length, kind) and a payload: ``STEP`` and ``STOP`` go from the leader to
the followers, ``DRAIN`` (a follower got SIGTERM: stop the deployment) from a follower to the
leader, ``BEAT`` both ways. A heartbeat thread on each side sends ``BEAT`` every
``heartbeat_s`` (also while the main thread is busy compiling or inside a collective), and a
watchdog reports a peer whose connection closed or that stayed silent for ``timeout_s``
through ``on_lost(process_id, reason)``: a process that died or hangs is noticed in bounded
time even when the survivors are blocked in a collective that waits for it.
"""

from __future__ import annotations

import logging
import queue
import socket
import struct
import threading
import time
from collections.abc import Callable

from sharding.processes import DistributedConfig

log = logging.getLogger(__name__)

STEP, STOP, BEAT, DRAIN = 1, 2, 3, 4
_HEADER = struct.Struct("!IB")
ADDRESS_KEY = "xds/control_address"


class ChannelError(RuntimeError):
    """The control channel could not be set up, or a peer was lost."""


def _kv_client():
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None:
        raise ChannelError("jax.distributed is not initialised (sharding.processes.initialize)")
    return client


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = sock.recv(left)
        if not chunk:
            raise ConnectionError("connection closed")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


class _Peer:
    """One connection, its send lock and when it was last heard from."""

    def __init__(self, process_id: int, sock: socket.socket) -> None:
        self.process_id = process_id
        self.sock = sock
        self.lock = threading.Lock()
        self.last_seen = time.monotonic()

    def send(self, kind: int, payload: bytes = b"") -> None:
        with self.lock:
            self.sock.sendall(_HEADER.pack(len(payload), kind) + payload)

    def recv(self) -> tuple[int, bytes]:
        size, kind = _HEADER.unpack(_recv_exact(self.sock, _HEADER.size))
        payload = _recv_exact(self.sock, size) if size else b""
        self.last_seen = time.monotonic()
        return kind, payload


class ControlChannel:
    """Leader and followers of one engine (``connect`` builds the right side).

    Leader: ``broadcast(payload)`` sends a ``STEP`` to every follower; ``stop()`` sends
    ``STOP``; a follower's ``DRAIN`` calls ``on_drain(process_id)``. Follower: ``receive()``
    returns the next ``STEP`` payload, or None at ``STOP``; ``request_drain()`` sends ``DRAIN``.
    """

    def __init__(self, config: DistributedConfig, peers: list[_Peer],
                 on_lost: Callable[[int, str], None],
                 on_drain: Callable[[int], None] | None = None) -> None:
        self.config = config
        self.peers = peers
        self.on_lost = on_lost
        self.on_drain = on_drain
        self.steps: queue.Queue = queue.Queue()
        self.closing = threading.Event()
        self._lost = threading.Event()
        self.sent_frames = 0
        self.send_seconds = 0.0
        for peer in peers:
            threading.Thread(target=self._read, args=(peer,), daemon=True,
                             name=f"xds-control-read-{peer.process_id}").start()
        threading.Thread(target=self._beat, daemon=True, name="xds-control-beat").start()

    # -- set-up -------------------------------------------------------------------------------
    @classmethod
    def connect(cls, config: DistributedConfig, on_lost: Callable[[int, str], None],
                timeout_s: float = 300.0, store=None,
                on_drain: Callable[[int], None] | None = None) -> ControlChannel:
        """Process 0 listens and waits for the others; the others connect to it. ``store``
        (``key_value_set``, ``blocking_key_value_get``) is where the leader's address is
        published: by default the ``jax.distributed`` client's key-value store. ``on_drain``
        (leader): called from a reader thread when a follower asks to stop the deployment."""
        client = store if store is not None else _kv_client()
        if config.is_leader:
            server = socket.create_server(("", 0))
            server.settimeout(timeout_s)
            address = f"{config.host}:{server.getsockname()[1]}"
            client.key_value_set(ADDRESS_KEY, address)
            peers = []
            try:
                for _ in range(config.num_processes - 1):
                    sock, _ = server.accept()
                    sock.settimeout(None)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    (pid,) = struct.unpack("!I", _recv_exact(sock, 4))
                    peers.append(_Peer(pid, sock))
            except TimeoutError:
                raise ChannelError(f"only {len(peers)} of {config.num_processes - 1} processes "
                                   f"connected to {address} within {timeout_s:.0f} s") from None
            finally:
                server.close()
            log.info("control channel: %d followers connected on %s", len(peers), address)
            return cls(config, sorted(peers, key=lambda p: p.process_id), on_lost, on_drain)
        address = client.blocking_key_value_get(ADDRESS_KEY, int(timeout_s * 1000))
        host, _, port = address.rpartition(":")
        sock = socket.create_connection((host, int(port)), timeout=timeout_s)
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(struct.pack("!I", config.process_id))
        return cls(config, [_Peer(0, sock)], on_lost)

    # -- leader -------------------------------------------------------------------------------
    def broadcast(self, payload: bytes) -> None:
        """Send one step's message to every follower."""
        start = time.perf_counter()
        for peer in self.peers:
            try:
                peer.send(STEP, payload)
            except OSError as e:
                self._report(peer, f"send failed: {e}")
        self.sent_frames += 1
        self.send_seconds += time.perf_counter() - start

    def stop(self) -> None:
        """Tell the followers to leave (leader), or stop watching (follower); then close."""
        if self.closing.is_set():
            return
        self.closing.set()
        for peer in self.peers:
            try:
                if self.config.is_leader:
                    peer.send(STOP)
                peer.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    # -- follower -----------------------------------------------------------------------------
    def receive(self) -> bytes | None:
        """The next step's message from the leader; None once it said ``STOP``."""
        return self.steps.get()

    def request_drain(self) -> None:
        """Ask the leader to drain and stop the deployment (it answers with ``STOP``)."""
        for peer in self.peers:
            try:
                peer.send(DRAIN)
            except OSError as e:
                self._report(peer, f"send failed: {e}")

    # -- threads ------------------------------------------------------------------------------
    def _read(self, peer: _Peer) -> None:
        while True:
            try:
                kind, payload = peer.recv()
            except OSError as e:
                if not self.closing.is_set():
                    self._report(peer, f"connection closed ({e})")
                self.steps.put(None)
                return
            if kind == STEP:
                self.steps.put(payload)
            elif kind == STOP:
                self.closing.set()
                self.steps.put(None)
                return
            elif kind == DRAIN and self.on_drain is not None:
                self.on_drain(peer.process_id)

    def _beat(self) -> None:
        interval, timeout = self.config.heartbeat_s, self.config.timeout_s
        while not self.closing.wait(interval):
            now = time.monotonic()
            for peer in self.peers:
                if now - peer.last_seen > timeout:
                    self._report(peer, f"no heartbeat for {now - peer.last_seen:.1f} s")
                    continue
                try:
                    peer.send(BEAT)
                except OSError as e:
                    self._report(peer, f"send failed: {e}")

    def _report(self, peer: _Peer, reason: str) -> None:
        """The first lost peer is reported (once)."""
        if self._lost.is_set() or self.closing.is_set():
            return
        self._lost.set()
        self.on_lost(peer.process_id, reason)
