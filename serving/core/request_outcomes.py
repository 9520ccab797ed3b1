"""How a request submitted to ``AsyncEngine`` can end besides finishing: the errors its
caller gets (``request_failure`` turns a request the engine failed into one), and what
``abort`` returns."""

from __future__ import annotations

import copy

from xds_jax.errors import XdsError
from xds_jax.outputs import RequestOutput


class RequestFailedError(XdsError, RuntimeError):
    """The engine failed this one request (it kept serving the others)."""


def request_failure(request_id: str, out: RequestOutput) -> Exception:
    """What a request the engine failed raises to its caller: an error the engine names
    (an ``XdsError``: no group left to run it, a peer process lost, a grammar past its limits)
    as itself, so the server answers its kind; any other as ``RequestFailedError``."""
    if isinstance(out.failure, XdsError):
        return copy.copy(out.failure)
    return RequestFailedError(f"request {request_id} failed: {out.error}")


class Aborted:
    """What ``AsyncEngine.abort`` returns: the abort is done; ``await`` on it returns at once
    (vLLM's ``abort`` is a coroutine)."""

    def __await__(self):
        return iter(())


class EngineDeadError(XdsError, RuntimeError):
    """The engine was shut down: it takes no more requests (vLLM's name)."""


class DuplicateRequestError(XdsError, ValueError):
    """A request id that names a request still running (vLLM refuses it too)."""
