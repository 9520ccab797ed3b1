"""Admission control: how much work the server holds at once, counted in sequences and tokens.

A request asks for ``slots`` sequences (prompts x ``n``: a request with ``n=64`` weighs as much
as 64 requests, as in vLLM) and ``tokens`` prompt tokens (each prompt once). ``admit`` takes both
or neither: above either limit it raises ``OverloadedError`` (HTTP 503 with ``Retry-After``),
and a request that could never fit, even alone, raises ``RequestTooLargeError`` (HTTP 400)
instead, so a client does not retry it forever. Plain Python, no JAX: tested exhaustively.
"""

from __future__ import annotations

import threading

from xds_jax.errors import XdsError

# The reasons a request is turned away, as the ``reason`` label of the rejection counter.
REJECT_REASONS = ("queued_reqs", "queued_tokens", "shutting_down")


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
    """

    def __init__(self, max_num_queued_reqs: int, max_num_queued_tokens: int):
        for name, value in (("max_num_queued_reqs", max_num_queued_reqs),
                            ("max_num_queued_tokens", max_num_queued_tokens)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.max_num_queued_reqs = max_num_queued_reqs
        self.max_num_queued_tokens = max_num_queued_tokens
        self.slots = self.tokens = self.requests = 0
        self._lock = threading.Lock()

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
        if self.slots + slots > self.max_num_queued_reqs:
            raise OverloadedError(
                "queued_reqs", f"the server is overloaded: {self.slots} sequences are in flight "
                f"and this request needs {slots} more (limit {self.max_num_queued_reqs}); "
                "retry later")
        if self.tokens + tokens > self.max_num_queued_tokens:
            raise OverloadedError(
                "queued_tokens", f"the server is overloaded: {self.tokens} prompt tokens are in "
                f"flight and this request adds {tokens} (limit {self.max_num_queued_tokens}); "
                "retry later")

    def admit(self, slots: int, tokens: int) -> Ticket:
        """Take ``slots`` sequences and ``tokens`` prompt tokens, or raise (taking nothing)."""
        with self._lock:
            self.check_room(slots, tokens)
            self.slots += slots
            self.tokens += tokens
            self.requests += 1
        return Ticket(self, slots, tokens)

    def _release(self, ticket: Ticket) -> None:
        with self._lock:
            if ticket.released:
                return
            ticket.released = True
            self.slots -= ticket.slots
            self.tokens -= ticket.tokens
            self.requests -= 1
