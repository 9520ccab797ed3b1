"""xds-jax: a JAX/XLA disaggregated inference engine for LLMs, after xDeepServe.

The library API follows vLLM: ``LLM``, ``SamplingParams``, ``RequestOutput``,
``BeamSearchParams`` (``LLM.beam_search``).
"""

from xds_jax.llm import LLM
from xds_jax.outputs import CompletionOutput, Logprob, RequestOutput
from xds_jax.sampling.beam_search import BeamSearchParams
from xds_jax.sampling.params import RequestOutputKind, SamplingParams

__all__ = ["LLM", "SamplingParams", "BeamSearchParams", "RequestOutput", "CompletionOutput",
           "Logprob", "RequestOutputKind"]
