"""Admission control: how much work the server holds at once, counted in sequences and tokens.

A request asks for ``slots`` sequences (prompts x ``n``: a request with ``n=64`` weighs as much
as 64 requests, as in vLLM) and ``tokens`` prompt tokens (each prompt once). ``admit`` takes both
or neither: above either limit it raises ``OverloadedError`` (HTTP 503 with ``Retry-After``),
and a request that could never fit, even alone, raises ``RequestTooLargeError`` (HTTP 400)
instead, so a client does not retry it forever. Plain Python, no JAX: tested exhaustively.

``Retry-After`` comes from the measured drain rate: the sequences and prompt tokens released
in the last ``DRAIN_WINDOW_S`` seconds (or since the first admission, if sooner) give a rate,
and the wait is how long the excess over the limit takes to drain at that rate, in whole
seconds within ``[1, RETRY_AFTER_MAX_S]``. While nothing has drained in the window the wait is
the window itself (nothing finished for that long: expect at least as long again), so a
server that has just started asks for 1 s.
"""

from __future__ import annotations

import collections
import math
import threading
import time

from xds_jax.errors import XdsError

# The reasons a request is turned away, as the ``reason`` label of the rejection counter.
REJECT_REASONS = ("queued_reqs", "queued_tokens", "shutting_down")
DRAIN_WINDOW_S = 30.0  # releases older than this do not count towards the drain rate
RETRY_AFTER_MAX_S = 60  # the longest Retry-After the server answers


class OverloadedError(XdsError):
    """The server holds as much work as it may; retry later (HTTP 503)."""

    def __init__(self, reason: str, message: str, retry_after_s: int = 1):
        super().__init__(message)
        self.reason, self.retry_after_s = reason, retry_after_s


class RequestTooLargeError(XdsError):
    """A request larger than a whole admission limit (HTTP 400 naming ``field``)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class Ticket:
    """One admitted request's share of the limits; ``release`` (idempotent) gives it back."""

    def __init__(self, admission: Admission, slots: int, tokens: int):
        self._admission, self.slots, self.tokens = admission, slots, tokens
        self.released = False

    def release(self) -> None:
        self._admission._release(self)


class Admission:
    """The limits and what is admitted now. Thread-safe (the server's event loop admits; a
    ticket may be released from anywhere).

    Args:
      max_num_queued_reqs: most sequences in flight (running or waiting in the engine).
      max_num_queued_tokens: most prompt tokens of the requests in flight.
      clock: seconds, monotonic (tests give their own).
    """

    def __init__(self, max_num_queued_reqs: int, max_num_queued_tokens: int,
                 clock=time.monotonic):
        for name, value in (("max_num_queued_reqs", max_num_queued_reqs),
                            ("max_num_queued_tokens", max_num_queued_tokens)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.max_num_queued_reqs = max_num_queued_reqs
        self.max_num_queued_tokens = max_num_queued_tokens
        self.slots = self.tokens = self.requests = 0
        self._lock = threading.RLock()  # admit holds it while check_room measures
        self._clock = clock
        self._started: float | None = None  # the first admission
        self._released: collections.deque = collections.deque()  # (time, slots, tokens)

    def check_fits(self, slots: int, tokens: int = 0) -> None:
        """Raise ``RequestTooLargeError`` if a request this large could never be admitted."""
        if slots > self.max_num_queued_reqs:
            raise RequestTooLargeError(
                "n", f"this request asks for {slots} sequences (prompts x n) but the server "
                f"admits at most {self.max_num_queued_reqs} at once (--max-num-queued-reqs)")
        if tokens > self.max_num_queued_tokens:
            raise RequestTooLargeError(
                "prompt", f"this request has {tokens} prompt tokens but the server admits at "
                f"most {self.max_num_queued_tokens} at once (--max-num-queued-tokens)")

    def check_room(self, slots: int, tokens: int = 0) -> None:
        """Raise ``OverloadedError`` unless ``slots`` and ``tokens`` fit next to the work in
        flight now (``RequestTooLargeError`` if they never would)."""
        self.check_fits(slots, tokens)
        excess_slots = self.slots + slots - self.max_num_queued_reqs
        excess_tokens = self.tokens + tokens - self.max_num_queued_tokens
        if excess_slots > 0:
            raise OverloadedError(
                "queued_reqs", f"the server is overloaded: {self.slots} sequences are in flight "
                f"and this request needs {slots} more (limit {self.max_num_queued_reqs}); "
                "retry later", self.retry_after_s(excess_slots, 0))
        if excess_tokens > 0:
            raise OverloadedError(
                "queued_tokens", f"the server is overloaded: {self.tokens} prompt tokens are in "
                f"flight and this request adds {tokens} (limit {self.max_num_queued_tokens}); "
                "retry later", self.retry_after_s(0, excess_tokens))

    def retry_after_s(self, excess_slots: int, excess_tokens: int) -> int:
        """Whole seconds until ``excess_slots`` sequences and ``excess_tokens`` prompt tokens
        should have drained at the rate measured over the window (module docstring)."""
        now = self._clock()
        with self._lock:
            while self._released and self._released[0][0] < now - DRAIN_WINDOW_S:
                self._released.popleft()
            started = now if self._started is None else self._started
            window = min(DRAIN_WINDOW_S, now - started)
            slots = sum(r[1] for r in self._released)
            tokens = sum(r[2] for r in self._released)
        if not slots:  # nothing drained for the whole window: expect as long again
            wait = window
        else:
            wait = excess_slots * window / slots
            if excess_tokens:
                wait = max(wait, excess_tokens * window / tokens if tokens else window)
        return min(max(math.ceil(wait), 1), RETRY_AFTER_MAX_S)

    def admit(self, slots: int, tokens: int) -> Ticket:
        """Take ``slots`` sequences and ``tokens`` prompt tokens, or raise (taking nothing)."""
        with self._lock:
            self.check_room(slots, tokens)
            if self._started is None:
                self._started = self._clock()
            self.slots += slots
            self.tokens += tokens
            self.requests += 1
        return Ticket(self, slots, tokens)

    def _release(self, ticket: Ticket) -> None:
        with self._lock:
            if ticket.released:
                return
            ticket.released = True
            self._released.append((self._clock(), ticket.slots, ticket.tokens))
            self.slots -= ticket.slots
            self.tokens -= ticket.tokens
            self.requests -= 1
