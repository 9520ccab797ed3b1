"""xds-jax: a JAX/XLA disaggregated inference engine for LLMs, after xDeepServe.

The library API follows vLLM: ``LLM``, ``SamplingParams``, ``RequestOutput``,
``BeamSearchParams`` (``LLM.beam_search``).

The names load on first use, so that importing a light submodule (the CLI's argument parser
reads ``xds_jax.sampling.params``) does not import JAX and the engine: ``xds --help`` answers
at once instead of after ~2.5 s.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {"LLM": "xds_jax.llm", "SamplingParams": "xds_jax.sampling.params",
            "RequestOutputKind": "xds_jax.sampling.params",
            "BeamSearchParams": "xds_jax.sampling.beam_search",
            "RequestOutput": "xds_jax.outputs", "CompletionOutput": "xds_jax.outputs",
            "Logprob": "xds_jax.outputs"}

__all__ = ["LLM", "SamplingParams", "BeamSearchParams", "RequestOutput", "CompletionOutput",
           "Logprob", "RequestOutputKind"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'xds_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:
    from xds_jax.llm import LLM
    from xds_jax.outputs import CompletionOutput, Logprob, RequestOutput
    from xds_jax.sampling.beam_search import BeamSearchParams
    from xds_jax.sampling.params import RequestOutputKind, SamplingParams
