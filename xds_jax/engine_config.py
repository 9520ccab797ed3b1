"""``EngineConfig``: everything that shapes an engine, with its defaults in one place.

``LLM(model, **options)`` takes its fields as keyword arguments, the server's ``EngineArgs``
extends it, and the ``xds`` command line builds its engine flags from its fields (defaults
and all), as nano-vllm's ``Config``. Groups derive their capacity from it
(``serving.core.engine.group_config_for``), overridden per role by a deployment file.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
from typing import TYPE_CHECKING

from xds_jax.errors import ConfigError, SamplingParamsError

if TYPE_CHECKING:
    from sharding.deployment import DeploymentSpec
    from sharding.processes import DistributedConfig


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """The model, its layout on devices, and each DP group's capacity.

    Attributes:
      model: a registered name (``"smollm2"``), a Hugging Face directory, a ``.gguf`` file,
        or a ``config.json`` file (random weights, for simulation).
      dtype: ``"float32"``, ``"bfloat16"``, ``"float16"``, or ``"auto"``/None: the
        checkpoint's dtype, except float16 on CPU, which runs as float32 (XLA:CPU has no
        float16 matmul; ``xds_jax.loading.loader.auto_dtype``).
      quantization: ``"int8"``: weight-only INT8 linear layers, experts, embedding and LM head
        with one scale per output channel, quantised at load time (``docs/quantization.md``);
        None: weights as ``dtype``.
      max_model_len: context limit in tokens, prompt plus output; None: the model's; ``"auto"``
        (or -1, as vLLM takes them): the longest a DP group's KV pool of ``kv_cache_bytes``
        holds, at most the model's.
      seed: seed of random weights when ``model`` is a bare config.
      num_dp_groups: colocated DP groups, one per device, when there is no ``deployment``.
      deployment: a deployment file (``configs/deployments/*.yaml``), or its spec already
        parsed by the entry point (``sharding.read_deployment``): colocated DP groups,
        prefill/decode pools (PD) and/or attention/expert slices (MA).
      max_num_seqs: most sequences per DP group and step.
      max_num_batched_tokens: token budget of one step of a DP group, prefill chunks included.
      block_size: tokens per KV block.
      kv_cache_bytes: size of a DP group's paged KV pool (capped at ``max_num_seqs`` full
        contexts; at least one).
      enable_prefix_caching: reuse cached KV blocks of shared prompt prefixes.
      scheduling_policy: ``"fcfs"`` (first come, first served) or ``"priority"``: each DP
        group's queues ordered by the requests' ``priority`` (lower first, then arrival), the
        lowest-priority sequence preempted when blocks run out, and a waiting request
        preempting running ones of strictly lower priority to start (vLLM's
        ``--scheduling-policy``; ``serving.core.scheduler``). Under ``"fcfs"`` a request's
        priority must be 0.
      async_scheduling: schedule and launch a DP group's step n + 1 while step n runs on the
        device, its decode inputs taken from step n's sampled tokens on device (vLLM's
        ``--async-scheduling``); the host's appends, stop checks and detokenization overlap
        the device. Colocated and PD decode groups; speculative and MA ranks step one at a
        time. None (the default, as vLLM's): on unless ``num_scheduler_steps`` chains steps
        (the two are alternative ways to hide the host's per-step work; True with a chain
        runs asynchronously, one step a launch).
      num_scheduler_steps: decode steps a DP group launches per scheduler step (vLLM's
        multi-step scheduling): the same decode program back to back, each step's inputs the
        last one's sampled tokens on the device, into KV slots reserved up front; the host's
        per-step work (schedule, read, append, stop checks, detokenize, emit) is paid once
        per chain. Tokens reach the client once per chain, a request arriving meanwhile
        waits for the chain to end, and a sequence that stops mid-chain drops the tokens
        after. Rows whose sampling reads every output token (penalties, a grammar) run one
        step at a time; ``async_scheduling`` and speculative decoding (which chains its own
        steps: ``speculative_config.num_chained_steps``) take one. 1: none chained.
      staged: run steps as separately jitted stage programs (faster to compile, slower to
        run) instead of one fused program.
      micro_batches: micro-batches per attention domain and step in MA deployments.
      trace: record a timeline of the disaggregated stages and KV transfers.
      use_param_cache: cache converted parameters on disk (Orbax).
      distributed: this process's place among several ``jax.distributed`` processes
        (``sharding.processes.DistributedConfig``, or a dict of its fields: ``coordinator``,
        ``num_processes``, ``process_id``); None for one process.
      speculative_config: ``{"method": "mtp", "num_speculative_tokens": k}`` (vLLM's
        spelling): draft ``k`` tokens a decode step with the checkpoint's MTP block (or the
        head shipped for it, ``xds_jax/assets/mtp``) and verify them in one target step
        (``docs/speculative.md``); None: no speculation. Optional keys:
        ``disable_by_batch_size`` (steps of more rows do not draft) and
        ``num_chained_steps`` (greedy steps launched back to back, default 4; 1: none).
      enable_eplb, eplb_config: rebalance an MA deployment's expert slice while serving
        (``{"window_size", "step_interval", "num_redundant_experts"}``, a dict or a JSON
        object, vLLM's spelling); ``eplb_config`` alone sets the window of
        ``stats()["expert_load"]``. See docs/eplb.md.
      dispatch_dtype: ``"int8"`` sends MA's A2E hops and the expert dispatch of MA and EP
        decode as INT8 rows with a scale each (``"auto"``: the activations' dtype; refused
        where no dispatch runs); None: the deployment's field.
      faults: fault specs to inject (``"group_crash:group=1:after_steps=3"``, ...; parsed
        and checked against the layout by ``serving.core.faults``; ``docs/reliability.md``).
      heartbeat_timeout_s: a group of a started (threaded) engine that has not beaten for
        this long is taken out of service and its work moved; None: not watched.
      kv_transfer_retries: PD KV pulls retried after a failure before the sequence is
        prefilled again.
      generation_config: where the model's default sampling parameters come from (vLLM's
        option): ``"auto"`` its directory's ``generation_config.json``, ``"vllm"`` none (the
        engine's defaults), or a directory holding one. ``override_generation_config``: fields
        set on top (``{"temperature": 0.5, "max_new_tokens": 512}``; a dict or JSON text).
        See ``xds_jax.loading.generation_config``.
    """

    model: str = "smollm2"
    dtype: str | None = None
    quantization: str | None = None
    max_model_len: int | str | None = None
    seed: int = 0
    num_dp_groups: int = 1
    deployment: str | DeploymentSpec | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    block_size: int = 16
    kv_cache_bytes: int = 1 << 30
    enable_prefix_caching: bool = True
    scheduling_policy: str = "fcfs"
    staged: bool = False
    async_scheduling: bool | None = None
    num_scheduler_steps: int = 1
    micro_batches: int = 2
    trace: bool = False
    use_param_cache: bool = True
    distributed: DistributedConfig | dict | None = None
    speculative_config: dict | None = None
    enable_eplb: bool = False
    eplb_config: dict | str | None = None
    dispatch_dtype: str | None = None
    faults: tuple = ()
    heartbeat_timeout_s: float | None = 60.0
    kv_transfer_retries: int = 1
    generation_config: str = "auto"
    override_generation_config: dict | str | None = None

    def __post_init__(self) -> None:
        for name in ("num_dp_groups", "max_num_seqs", "max_num_batched_tokens", "block_size",
                     "kv_cache_bytes", "micro_batches"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        steps = self.num_scheduler_steps
        if (not isinstance(steps, int) or isinstance(steps, bool)
                or not 1 <= steps <= MAX_SCHEDULER_STEPS):
            raise ConfigError(f"num_scheduler_steps must be an integer in "
                              f"1..{MAX_SCHEDULER_STEPS} (decode steps chained per scheduler "
                              f"step; 1: none chained), got {steps!r}")
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ConfigError(f"scheduling_policy must be one of "
                              f"{', '.join(map(repr, SCHEDULING_POLICIES))}, got "
                              f"{self.scheduling_policy!r}")
        limit = self.max_model_len
        if limit not in (None, "auto", -1) and (isinstance(limit, bool)
                                                or not isinstance(limit, int) or limit < 1):
            raise ConfigError(f"max_model_len must be a positive integer, 'auto' (or -1) or "
                              f"None, got {limit!r}")
        for name in ("enable_prefix_caching", "staged", "trace", "use_param_cache",
                     "enable_eplb"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.async_scheduling is not None and not isinstance(self.async_scheduling, bool):
            raise ConfigError(f"async_scheduling must be true, false or None (on unless "
                              f"num_scheduler_steps chains steps), got "
                              f"{self.async_scheduling!r}")
        if not (self.deployment is None or isinstance(self.deployment, str | os.PathLike)
                or hasattr(self.deployment, "num_devices")):
            raise ConfigError(f"deployment must be a deployment file's path or a "
                              f"DeploymentSpec, got {self.deployment!r}")
        if self.deployment is not None and self.num_dp_groups != 1:
            raise ConfigError(f"num_dp_groups ({self.num_dp_groups}) and a deployment: the "
                              "deployment sets its DP groups (roles.*.dp); give one of them")
        _check_speculative(self.speculative_config)
        if self.quantization not in (None, "int8"):
            raise ConfigError(f"quantization must be 'int8' or None, got {self.quantization!r}")
        if self.dispatch_dtype not in (None, "auto", "int8"):
            raise ConfigError(f"dispatch_dtype must be 'auto' or 'int8', got "
                              f"{self.dispatch_dtype!r}")
        faults = self.faults
        if not isinstance(faults, list | tuple | set | type(None)):
            faults = (faults,)  # one spec (anything else is refused below)
        faults = tuple(faults or ())
        if not all(isinstance(f, str) or dataclasses.is_dataclass(f) for f in faults):
            raise ConfigError(f"faults must be fault specs (strings like "
                              f"'group_crash:group=1:after_steps=3'), got {self.faults!r}")
        object.__setattr__(self, "faults", faults)
        timeout = self.heartbeat_timeout_s
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(
                timeout, int | float) or not 0 < timeout < float("inf")):
            raise ConfigError(f"heartbeat_timeout_s must be a positive number of seconds or "
                              f"None, got {timeout!r}")
        if not isinstance(self.generation_config, str) or not self.generation_config:
            raise ConfigError(f"generation_config must be 'auto', 'vllm' or a directory, got "
                              f"{self.generation_config!r}")
        retries = self.kv_transfer_retries
        if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
            raise ConfigError(f"kv_transfer_retries must be an integer >= 0, got {retries!r}")

    @property
    def num_speculative_tokens(self) -> int:
        """Draft tokens per decode step (0: no speculative decoding)."""
        spec = self.speculative_config
        return int(spec["num_speculative_tokens"]) if spec else 0

    @property
    def spec_disable_by_batch_size(self) -> int | None:
        """Decode steps of more rows than this do not draft (None: the platform's default,
        ``serving.core.spec_decode.default_disable_by_batch_size``)."""
        spec = self.speculative_config
        return spec.get("disable_by_batch_size") if spec else None

    @property
    def spec_chained_steps(self) -> int:
        """Greedy speculative steps launched back to back (``serving.core.spec_decode``)."""
        spec = self.speculative_config or {}
        return spec.get("num_chained_steps") or DEFAULT_CHAINED_STEPS

    def replace(self, **changes) -> EngineConfig:
        """A copy with ``changes`` (validated again)."""
        return dataclasses.replace(self, **changes)


# vLLM's LLM options that have another name or no counterpart here: what to use instead.
VLLM_OPTIONS = {
    "tensor_parallel_size": "decode DP groups run with TP=1 (xDeepServe's layout); tensor "
                            "parallelism runs in a PD prefill pool, set in a deployment file "
                            "(deployment=..., roles.prefill.tp); for more devices use "
                            "num_dp_groups",
    "data_parallel_size": "use num_dp_groups",
    "pipeline_parallel_size": "pipeline parallelism is not supported; see deployment",
    "gpu_memory_utilization": "the KV cache is sized by kv_cache_bytes (per DP group)",
    "enforce_eager": "programs are always compiled (XLA); nothing to turn off",
    "trust_remote_code": "no model code is loaded from checkpoints; supported architectures "
                         "are built in",
    "tokenizer": "the tokenizer is read from the model directory or GGUF file",
}
SCHEDULING_POLICIES = ("fcfs", "priority")  # serving.core.scheduler orders its queues by them


def check_priority(priority, policy: str) -> int:
    """A request's ``priority`` (an integer, lower scheduled first) checked against the
    engine's scheduling policy: under ``"fcfs"`` only 0 (vLLM refuses others too)."""
    if isinstance(priority, bool) or not isinstance(priority, numbers.Integral):
        raise SamplingParamsError(f"priority must be an integer, got {priority!r}")
    if priority != 0 and policy != "priority":
        raise SamplingParamsError(
            f"priority {priority} needs priority scheduling (scheduling_policy='priority', "
            f"--scheduling-policy priority); this engine schedules first come, first served")
    return int(priority)


MAX_SPECULATIVE_TOKENS = 4  # xds_jax.model.mtp holds the same limit (no JAX imported here)
# Greedy speculative steps launched back to back, each from the last one's results on the
# device (``serving.core.spec_decode.SpecRunner``): the host's per-step work (reading the run,
# appending, launching: ~2 ms against a ~28 ms SmolLM2 step on CPU) overlaps the device but
# for the first launch and the last read. Tokens reach the client once per chain.
DEFAULT_CHAINED_STEPS = 4
MAX_CHAINED_STEPS = 16
MAX_SCHEDULER_STEPS = 64


def _check_speculative(spec) -> None:
    if spec is None:
        return
    if not isinstance(spec, dict):
        raise ConfigError(f"speculative_config must be a dict, got {type(spec).__name__}")
    unknown = set(spec) - {"method", "num_speculative_tokens", "disable_by_batch_size",
                           "num_chained_steps"}
    if unknown:
        raise ConfigError(f"speculative_config: unknown keys {sorted(unknown)}; it takes "
                          "'method', 'num_speculative_tokens', 'disable_by_batch_size' and "
                          "'num_chained_steps'")
    if spec.get("method", "mtp") != "mtp":
        raise ConfigError(f"speculative_config.method must be 'mtp', got {spec['method']!r}")
    k = spec.get("num_speculative_tokens")
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
        raise ConfigError("speculative_config.num_speculative_tokens must be an integer in "
                          f"1..{MAX_SPECULATIVE_TOKENS}, got {k!r}")
    limit = spec.get("disable_by_batch_size")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool)
                              or limit < 0):
        raise ConfigError("speculative_config.disable_by_batch_size must be an integer >= 0 "
                          f"(decode steps of more rows do not draft) or null, got {limit!r}")
    chained = spec.get("num_chained_steps")
    if chained is not None and (not isinstance(chained, int) or isinstance(chained, bool)
                                or not 1 <= chained <= MAX_CHAINED_STEPS):
        raise ConfigError("speculative_config.num_chained_steps must be an integer in "
                          f"1..{MAX_CHAINED_STEPS} (greedy speculative steps launched back to "
                          f"back; 1: none chained) or null, got {chained!r}")


DEFAULTS = EngineConfig()
