"""``LLM.generate``'s arguments as vLLM's offline API takes them: prompts, sampling
parameters (one for all, or one each) and ``lora_request``, each checked with an error that
names it."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from xds_jax.errors import ConfigError, InvalidPromptError, SamplingParamsError
from xds_jax.sampling.params import SamplingParams


def prompt_list(prompts: Any) -> list:
    """``generate``'s prompts as a list (one str or dict: a list of it)."""
    if isinstance(prompts, str | dict):
        return [prompts]
    if not isinstance(prompts, Iterable):
        raise InvalidPromptError(f"prompts must be a str, a dict or a list of them, got "
                                 f"{type(prompts).__name__}")
    return list(prompts)


def params_list(sampling_params: Any, count: int,
                default: Callable[[], SamplingParams]) -> list[SamplingParams]:
    """One ``SamplingParams`` per prompt: ``default()`` each where None, the one given for
    all, or the list given (one each)."""
    if sampling_params is None:
        return [default() for _ in range(count)]
    if isinstance(sampling_params, SamplingParams):
        return [sampling_params] * count
    if isinstance(sampling_params, Mapping) or not isinstance(sampling_params, Iterable):
        raise SamplingParamsError(f"sampling_params must be a SamplingParams or a list of "
                                  f"them, got {type(sampling_params).__name__}")
    params = list(sampling_params)
    if len(params) != count:
        raise InvalidPromptError(
            f"got {len(params)} SamplingParams for {count} prompts; pass one or one each"
        )
    wrong = next((p for p in params if not isinstance(p, SamplingParams)), None)
    if wrong is not None:
        raise SamplingParamsError(f"sampling_params must be SamplingParams, got a "
                                  f"{type(wrong).__name__} in the list")
    return params


def no_lora(lora_request: Any) -> None:
    """vLLM's ``lora_request`` argument: None is accepted, an adapter is refused by name."""
    if lora_request is not None:
        raise ConfigError("lora_request: LoRA adapters are not supported by xds-jax; pass "
                          "None or leave it out")
