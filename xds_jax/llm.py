"""``LLM``: the offline library API, named and shaped like vLLM's.

    llm = LLM("smollm2")
    out = llm.generate(["The capital of France is"], SamplingParams(max_tokens=32, temperature=0))
    out[0].outputs[0].text
"""

from __future__ import annotations

import dataclasses
import itertools
import numbers
import time
from collections.abc import Sequence as Seq
from typing import Any

from xds_jax.compile_cache import enable_compilation_cache
from xds_jax.embedding import embed_prompts, score_prompts
from xds_jax.engine_config import DEFAULTS, VLLM_OPTIONS, EngineConfig, check_priority
from xds_jax.engine_setup import (
    context_length,
    engine_params,
    read_deployment_file,
    size_cpu_devices,
)
from xds_jax.errors import (
    ConfigError,
    InvalidPromptError,
    PromptTooLongError,
    SamplingParamsError,
)
from xds_jax.llm_inputs import no_lora, params_list, prompt_list
from xds_jax.loading.generation_config import directory_eos, sampling_defaults
from xds_jax.loading.loader import load_model, resolve
from xds_jax.memory_maps import make_room
from xds_jax.model.pooling import model_pooling
from xds_jax.outputs import (
    EmbeddingRequestOutput,
    RequestMetrics,
    RequestOutput,
    ScoringRequestOutput,
)
from xds_jax.sampling import structured
from xds_jax.sampling.beam_search import BeamSearchOutput, BeamSearchParams, run_beam_search
from xds_jax.sampling.params import SamplingParams, output_room
from xds_jax.sequence import Sequence, bad_word_ids, samples_outcome
from xds_jax.text.tokenizer import chat_template_options, open_final_message


class LLM:
    """Load a model and generate from prompts or chats.

    Args:
      model: a registered name (``"smollm2"``), a Hugging Face directory, a ``.gguf`` file, or a
        ``config.json`` file (random weights, for simulation).
      engine: ``"flowserve"`` (default: the paged continuous-batching engine),
        ``"reference"`` (the single-device loop every path is checked against), or any object
        with ``run(list[Sequence])``.
      config: an ``EngineConfig``; or give its fields as keyword ``options`` (``dtype``,
        ``max_model_len``, ``deployment``, ``max_num_seqs``, ``kv_cache_bytes``, ``staged``,
        ``async_scheduling``, ``num_scheduler_steps``, ``trace``, ...; see
        ``xds_jax.engine_config``). With ``trace``, ``llm.engine.timeline``
        records a per-step timeline (``summary()``, ``save(path)`` as a Chrome trace).
        ``faults=["group_crash:group=1:after_steps=3", ...]`` injects faults
        (``docs/reliability.md``); ``llm.engine.stats()`` counts them and the recoveries.
    """

    def __init__(self, model: str = DEFAULTS.model, engine: Any = "flowserve", *,
                 config: EngineConfig | None = None, **options):
        if config is not None and options:
            raise ConfigError(f"pass either config or options, not both: {sorted(options)}")
        try:
            config = config or EngineConfig(model=model, **options)
        except TypeError as e:  # an unknown keyword: name it
            if "unexpected keyword" not in str(e):  # an option whose type no check foresaw
                raise ConfigError(f"LLM: an option has the wrong type ({e})") from None
            hints = [f"{name}: {VLLM_OPTIONS[name]}" for name in options if name in VLLM_OPTIONS]
            raise ConfigError(f"LLM: {e}; the options are EngineConfig's fields"
                              + "".join(f" ({hint})" for hint in hints)) from None
        if config.enable_eplb or config.eplb_config is not None:
            from serving.disagg.eplb_config import EplbConfig  # bad options fail before loading

            EplbConfig.parse(config.enable_eplb, config.eplb_config)
        if config.faults:  # their text, checked before the model loads (the layout: later)
            if engine != "flowserve":
                raise ConfigError("faults are injected into the flowserve engine only, got "
                                  f"engine={engine!r}")
            from serving.core.faults import parse_faults

            config = config.replace(faults=parse_faults(config.faults))
        enable_compilation_cache()
        make_room("building an engine")  # programs of engines built before may hold them
        self.config = config = read_deployment_file(config)
        size_cpu_devices(config)
        # The model's default sampling (generation_config.json), checked before weights load.
        self.sampling_defaults = sampling_defaults(
            config.generation_config, resolve(config.model), config.override_generation_config)
        loaded = load_model(config.model, dtype=config.dtype, seed=config.seed,
                            use_cache=config.use_param_cache, quantization=config.quantization)
        self.model_name, self.cfg = loaded.name, loaded.cfg
        # loaded's own tree let go: fuse_query's copies replace its Q and K/V
        self.params, loaded.params = engine_params(loaded, config, resolve(config.model)), None
        self.tokenizer = loaded.tokenizer
        # What ends an output unless ignore_eos: the tokenizer's EOS (and its generation
        # config's), the model's eos_token_id(s) (vLLM: the generation config's, or else
        # config.json's, beside the tokenizer's) and those of a --generation-config directory.
        self.eos_token_ids = frozenset(self.cfg.eos_token_ids).union(
            self.tokenizer.eos_token_ids if self.tokenizer is not None else (),
            directory_eos(config.generation_config))
        self.max_model_len = context_length(self.cfg, self.params, config)
        if isinstance(engine, str) and engine not in ("flowserve", "reference"):
            raise ConfigError(f"engine must be 'flowserve' or 'reference', got {engine!r}")
        if engine == "reference":
            from xds_jax.generate import LocalGenerator

            engine = LocalGenerator(self.params, self.cfg)
        elif engine == "flowserve":
            # The public API wires the serving engine; model modules never import serving.
            from serving.disagg.deploy import build_engine

            engine = build_engine(self.params, self.cfg, self.max_model_len, config)
            engine = _join_processes(engine, config, self.make_sequences)
        self.engine = engine
        self._request_ids = itertools.count()
        self._scoring = None
        self._pooling: tuple[str, bool] | None = None

    @property
    def is_leader(self) -> bool:
        """False on a process other than 0 of several (``distributed=``): it ``follow``s."""
        return not hasattr(self.engine, "follow")

    def follow(self) -> int:
        """On a process other than 0: run the steps process 0 sends until it shuts down."""
        if self.is_leader:
            raise ConfigError("follow() is for processes other than 0; process 0 generates")
        return self.engine.follow()

    def get_tokenizer(self):
        return self.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """The ``SamplingParams`` that ``generate`` uses when given none: the model's
        generation config (``sampling_defaults``, vLLM's ``--generation-config``) over the
        engine's defaults."""
        return SamplingParams(**self.sampling_defaults)

    # -- inputs -------------------------------------------------------------------------------
    def prompt_ids_of(self, prompt: Any) -> tuple[str | None, list[int]]:
        """A prompt's text (None if given as token ids) and token ids: a string, or a dict
        with ``prompt`` or ``prompt_token_ids`` (vLLM's prompt forms); ``InvalidPromptError``
        for anything else."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                ids = prompt["prompt_token_ids"]
                if not isinstance(ids, list | tuple) or not all(
                    isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in ids
                ):
                    raise InvalidPromptError("prompt_token_ids must be a list of integers")
                return prompt.get("prompt"), [int(t) for t in ids]
            if "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise InvalidPromptError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if not isinstance(prompt, str):
            raise InvalidPromptError(f"a prompt must be a str or dict, got {type(prompt).__name__}")
        if self.tokenizer is None:
            raise InvalidPromptError(
                f"model {self.model_name!r} has no tokenizer; pass {{'prompt_token_ids': [...]}}"
            )
        return prompt, self.tokenizer.encode(prompt, add_special_tokens=True)

    def check_prompt(self, ids: list[int], params: SamplingParams) -> None:
        """Raise ``InvalidPromptError``/``PromptTooLongError`` for a prompt that cannot run
        (``SamplingParamsError`` for parameters this model cannot honour)."""
        if not ids:
            raise InvalidPromptError("the prompt is empty")
        bad = [t for t in ids if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise InvalidPromptError(
                f"prompt token ids {bad[:5]} are outside the vocabulary "
                f"(0..{self.cfg.vocab_size - 1})"
            )
        for field, given in (("stop_token_ids", params.stop_token_ids),
                             ("logit_bias", params.logit_bias),
                             ("allowed_token_ids", params.allowed_token_ids or ())):
            outside = [t for t in given if t >= self.cfg.vocab_size]
            if outside:
                raise SamplingParamsError(
                    f"{field} {outside[:5]} are outside the vocabulary "
                    f"(0..{self.cfg.vocab_size - 1})"
                )
        if params.bad_words:  # needs a tokenizer: fails here, not in a step
            bad_word_ids(params.bad_words, self.tokenizer)
        if params.stop and self.tokenizer is None:
            raise SamplingParamsError("stop strings need a tokenizer (this model has none, so "
                                      "its output has no text): use stop_token_ids")
        if params.structured_outputs is not None:  # an invalid schema fails here, not later
            structured.check(params.structured_outputs, self.tokenizer)
        more = output_room(params.max_tokens)  # 0: scoring only
        need = len(ids) + more
        if len(ids) + min(more, 1) > self.max_model_len:  # the prompt alone fills it
            raise PromptTooLongError(
                f"this model's maximum context length is {self.max_model_len} tokens, but the "
                f"prompt has {len(ids)} tokens"
                + (" (the context holds the prompt and at least one new token)" if more else "")
            )
        if need > self.max_model_len:
            raise PromptTooLongError(
                f"this model's maximum context length is {self.max_model_len} tokens, but the "
                f"prompt has {len(ids)} tokens and max_tokens asks for {more} more "
                f"({need} in all)"
            )

    def fit_output(self, ids: list[int], params: SamplingParams) -> SamplingParams:
        """``params`` with ``max_tokens`` lowered to what the context leaves after the prompt,
        as vLLM's offline API stops an output at the context (the server refuses such a
        request instead, as vLLM's does); a prompt that fills the context is still refused
        (``check_prompt``)."""
        room = self.max_model_len - len(ids)
        if params.max_tokens is None or room < 1 or params.max_tokens <= room:
            return params
        return dataclasses.replace(params, max_tokens=room,
                                   min_tokens=min(params.min_tokens, room))

    def truncate_prompt(self, ids: list[int], params: SamplingParams) -> list[int]:
        """vLLM's ``truncate_prompt_tokens``: the prompt's last k tokens (-1: as many as the
        context holds, less one to generate unless ``max_tokens`` is 0; the output then stops
        where the context ends, ``fit_output``); k above the context length is a
        ``SamplingParamsError``."""
        keep = params.truncate_prompt_tokens
        if keep is None:
            return ids
        if keep == -1:
            keep = self.max_model_len - (params.max_tokens != 0)
        if keep > self.max_model_len:
            raise SamplingParamsError(f"truncate_prompt_tokens must be -1 or in "
                                      f"1..{self.max_model_len} (the context length), got {keep}")
        return ids[-keep:]

    def make_sequences(self, prompt_ids: list[int], params: SamplingParams,
                       priority: int = 0, cache_salt: str | None = None) -> list[Sequence]:
        """The ``n`` sequences of one request (seeded requests get seeds seed, seed+1, ...);
        ``priority`` orders them under the priority scheduling policy (lower first); they
        share cached KV blocks only with sequences of the same ``cache_salt``; the samples
        after the first wait for its prompt's KV (``fork_of``)."""
        priority = check_priority(priority, self.config.scheduling_policy)
        seqs = [Sequence(prompt_ids, params, index=i, seed=seed, tokenizer=self.tokenizer,
                         eos_token_ids=self.eos_token_ids, max_model_len=self.max_model_len,
                         priority=priority, cache_salt=cache_salt)
                for i, seed in enumerate(params.sample_seeds())]
        for seq in seqs[1:]:
            seq.fork_of = seqs[0]
        return seqs

    # -- API ----------------------------------------------------------------------------------
    def generate(self, prompts: Any, sampling_params: SamplingParams | Seq | None = None,
                 use_tqdm: bool = False, priority: list[int] | None = None,
                 lora_request: Any = None) -> list[RequestOutput]:
        """Complete each prompt. ``prompts``: a str, a ``{"prompt_token_ids": [...]}`` or
        ``{"prompt": str}`` dict (``"cache_salt"``: share cached KV only with prompts of the
        same salt, vLLM's), or a list of them. One ``SamplingParams`` for all, or one each.
        ``priority``: one per prompt (lower first; needs ``scheduling_policy="priority"``).
        ``lora_request``: vLLM's, None only (no LoRA adapters here)."""
        no_lora(lora_request)
        prompts = prompt_list(prompts)
        each = params_list(sampling_params, len(prompts), self.get_default_sampling_params)
        priorities = [0] * len(prompts) if priority is None else list(priority)
        if len(priorities) != len(prompts):
            raise InvalidPromptError(f"got {len(priorities)} priorities for {len(prompts)} "
                                     "prompts; pass one each")
        requests = []
        for prompt, params, rank in zip(prompts, each, priorities, strict=True):
            text, ids = self.prompt_ids_of(prompt)
            ids = self.truncate_prompt(ids, params)
            params = self.fit_output(ids, params)
            self.check_prompt(ids, params)
            salt = prompt.get("cache_salt") if isinstance(prompt, dict) else None
            requests.append((text, ids, self.make_sequences(ids, params, rank, salt)))
        arrival = time.monotonic()
        self.engine.run([s for _, _, seqs in requests for s in seqs if not s.finished])
        done = time.monotonic()
        outputs = []
        for (text, ids, seqs), params in zip(requests, each, strict=True):
            firsts, lasts, scheduled = ([t for s in seqs if (t := getattr(s, name)) is not None]
                                        for name in ("first_token_time", "last_token_time",
                                                     "first_scheduled_time"))
            outputs.append(RequestOutput(
                request_id=str(next(self._request_ids)), prompt=text, prompt_token_ids=ids,
                outputs=[s.output() for s in seqs], finished=True,
                metrics=RequestMetrics(arrival_time=arrival, finished_time=done,
                                       first_token_time=min(firsts, default=None),
                                       last_token_time=max(lasts, default=None),
                                       first_scheduled_time=min(scheduled, default=None)),
                **samples_outcome(seqs),
                prompt_logprobs=self._prompt_logprobs(ids, params),
            ))
        return outputs

    def beam_search(self, prompts: Any, params: BeamSearchParams,
                    use_tqdm: bool = False) -> list[BeamSearchOutput]:
        """vLLM's ``LLM.beam_search``: for each prompt (as ``generate`` takes them) the best
        ``params.beam_width`` continuations, best first (``xds_jax.sampling.beam_search``)."""
        return run_beam_search(self, prompts, params)

    def embed(self, prompts: Any, pooling: str | None = None, normalize: bool | None = None,
              truncate_prompt_tokens: int | None = None,
              use_tqdm: bool = False) -> list[EmbeddingRequestOutput]:
        """vLLM's ``LLM.embed``: each prompt's embedding from the model's final hidden states
        (``xds_jax/embedding.py``; ``pooling`` "last", "mean" or "cls" and ``normalize``
        default to what the model directory's sentence-transformers files name, else last
        token, normalised), computed apart from generation on an entry group's devices."""
        return embed_prompts(self, prompts, pooling, normalize, truncate_prompt_tokens)

    def score(self, data_1: Any, data_2: Any, truncate_prompt_tokens: int | None = None,
              use_tqdm: bool = False) -> list[ScoringRequestOutput]:
        """vLLM's ``LLM.score`` for an embedding model: the cosine similarity of the
        embeddings of each pair, ``data_1`` one prompt against each of ``data_2``'s or two
        lists of equal length, pairwise (prompts as ``generate`` takes them)."""
        return score_prompts(self, data_1, data_2, truncate_prompt_tokens)

    @property
    def pooling(self) -> tuple[str, bool]:
        """The model's own pooling and normalisation (``xds_jax.model.pooling.model_pooling``)."""
        if self._pooling is None:
            self._pooling = model_pooling(resolve(self.config.model))
        return self._pooling

    @property
    def scoring(self):
        """The serving engine's prompt scorers, on its entry groups' devices (built on first
        use: prompt log-probabilities and embeddings)."""
        if self._scoring is None:
            from serving.core.prompt_scoring import PromptScoring

            self._scoring = PromptScoring(self.engine, self.params, self.cfg, self.tokenizer)
        return self._scoring

    def _prompt_logprobs(self, ids: list[int], params: SamplingParams):
        if params.prompt_logprobs is None:
            return None
        return self.scoring.score(ids, params.prompt_logprobs)

    def chat(self, messages: list, sampling_params: SamplingParams | Seq | None = None,
             use_tqdm: bool = False, lora_request: Any = None, chat_template: str | None = None,
             chat_template_content_format: str = "auto", add_generation_prompt: bool = True,
             continue_final_message: bool = False, tools: list[dict] | None = None,
             chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        """Reply to one conversation (a list of ``{"role", "content"}``) or to a list of them.
        As vLLM's ``LLM.chat``, its arguments in its order: ``chat_template`` replaces the
        model's, ``tools`` reach the template, ``continue_final_message`` (with
        ``add_generation_prompt=False``) continues the last message instead of opening a new
        turn; text content parts are joined whatever ``chat_template_content_format`` says."""
        no_lora(lora_request)
        if chat_template_content_format not in ("auto", "string", "openai"):
            raise ConfigError("chat_template_content_format must be 'auto', 'string' or "
                              f"'openai', got {chat_template_content_format!r}")
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = []
        for conversation in conversations:
            text, ids = self.chat_prompt(conversation, add_generation_prompt,
                                         chat_template_kwargs, chat_template=chat_template,
                                         continue_final_message=continue_final_message,
                                         tools=tools)
            prompts.append({"prompt": text, "prompt_token_ids": ids})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def chat_prompt(self, conversation: list, add_generation_prompt: bool = True,
                    chat_template_kwargs: dict | None = None, *,
                    chat_template: str | None = None, continue_final_message: bool = False,
                    tools: list[dict] | None = None) -> tuple[str, list[int]]:
        """The prompt text and token ids ``chat`` sends for one conversation."""
        if self.tokenizer is None:
            raise InvalidPromptError(f"model {self.model_name!r} has no tokenizer for chat")
        add_prompt, kwargs = chat_template_options(add_generation_prompt, chat_template_kwargs)
        if continue_final_message and add_prompt:
            raise InvalidPromptError("continue_final_message needs add_generation_prompt=False")
        if tools:
            kwargs = {"tools": tools, **kwargs}
        if chat_template is not None:
            kwargs["chat_template"] = chat_template
        text = self.tokenizer.apply_chat_template(
            conversation, add_generation_prompt=add_prompt, **kwargs)
        if continue_final_message:
            text = open_final_message(text, conversation)
        # The template already holds BOS where the model wants it.
        return text, self.tokenizer.encode(text, add_special_tokens=False)


def _join_processes(engine, config: EngineConfig, make_sequences):
    """With several processes: process 0's engine steps every process in lockstep; the
    others' follow it (``serving.distributed.lockstep``)."""
    from sharding.processes import DistributedConfig

    dist = DistributedConfig.of(config.distributed)
    if dist is None or dist.num_processes == 1:
        return engine
    from serving.distributed.lockstep import attach

    return attach(engine, dist, make_sequences)
