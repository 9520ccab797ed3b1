"""How to build an ``AsyncEngine``: the engine's configuration and its admission limits."""

from __future__ import annotations

import dataclasses

from xds_jax.engine_config import EngineConfig
from xds_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class EngineArgs(EngineConfig):
    """How to build an ``AsyncEngine`` (the server's and CLI's options): the engine's
    configuration and the admission limits (``serving.core.admission``).

    Attributes:
      max_num_queued_reqs: most sequences in flight, running or waiting (a request counts
        prompts x ``n``); more are answered 503.
      max_num_queued_tokens: most prompt tokens of the requests in flight; more are
        answered 503.
    """

    max_num_queued_reqs: int = 256
    max_num_queued_tokens: int = 1 << 20

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("max_num_queued_reqs", "max_num_queued_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
