"""EPLB options, as vLLM spells them: ``enable_eplb`` and ``eplb_config`` with
``window_size``, ``step_interval`` and ``num_redundant_experts``.

    LLM(model, deployment="configs/deployments/cm384.yaml", enable_eplb=True,
        eplb_config={"window_size": 50, "step_interval": 200, "num_redundant_experts": 32})
    xds serve ... --enable-eplb --eplb-config '{"window_size": 50}'

Checked twice: the fields alone when parsed (``EplbConfig.parse``), and against the model and
the deployment's expert slots when the engine is built (``EplbConfig.resolve``), so every bad
combination fails at start-up with a ``ConfigError`` naming the field.
"""

from __future__ import annotations

import dataclasses
import json

from xds_jax.errors import ConfigError

DEFAULT_WINDOW = 100  # steps per load window (one time slice)
DEFAULT_INTERVAL = 300  # steps between rebalances
FIELDS = ("window_size", "step_interval", "num_redundant_experts")


@dataclasses.dataclass(frozen=True)
class EplbConfig:
    """Expert load counting and rebalancing of an MA deployment.

    Attributes:
      enabled: rebalance (False: only count load, for ``stats()["expert_load"]``).
      window_size: steps per load window; counters are read back from the devices once per
        window, and each window is one time slice of the selection.
      step_interval: steps between rebalances (checked at window boundaries; the windows
        since the previous rebalance are the time slices).
      num_redundant_experts: extra replicas per MoE layer (None: every spare slot).
    """

    enabled: bool = False
    window_size: int = DEFAULT_WINDOW
    step_interval: int = DEFAULT_INTERVAL
    num_redundant_experts: int | None = None

    @classmethod
    def parse(cls, enable_eplb: bool = False, eplb_config: dict | str | None = None
              ) -> EplbConfig:
        """From the ``LLM`` kwargs / CLI flags (``eplb_config`` a dict or a JSON object)."""
        if isinstance(eplb_config, str):
            try:
                eplb_config = json.loads(eplb_config)
            except json.JSONDecodeError as error:
                raise ConfigError(f"eplb_config is not valid JSON: {error}") from None
        if not isinstance(eplb_config or {}, dict):
            raise ConfigError(f"eplb_config must be a JSON object, got {eplb_config!r}")
        raw = dict(eplb_config or {})
        unknown = sorted(set(raw) - set(FIELDS))
        if unknown:
            raise ConfigError(f"eplb_config: unknown fields {unknown}; known: {list(FIELDS)}")
        for name in FIELDS:
            value = raw.get(name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"eplb_config.{name} must be an integer, got {value!r}")
            low = 0 if name == "num_redundant_experts" else 1
            if value < low:
                raise ConfigError(f"eplb_config.{name} must be >= {low}, got {value}")
        return cls(enabled=bool(enable_eplb),
                   window_size=raw.get("window_size", DEFAULT_WINDOW),
                   step_interval=raw.get("step_interval", DEFAULT_INTERVAL),
                   num_redundant_experts=raw.get("num_redundant_experts"))

    def resolve(self, num_experts: int | None, num_slots: int | None,
                deployment: str = "the deployment") -> EplbConfig:
        """Check against the model (``num_experts`` None: dense) and the expert slots (None:
        not an MA deployment); fill ``num_redundant_experts`` with the spare slots."""
        if not self.enabled:
            return self
        if num_experts is None:
            raise ConfigError("enable_eplb: the model is dense (no routed experts to balance)")
        if num_slots is None:
            raise ConfigError(f"enable_eplb: {deployment} has no decode_experts role and no "
                              "decode role with ep: N; EPLB balances the expert slots of MA "
                              "or EP decode")
        spare = num_slots - num_experts
        r = spare if self.num_redundant_experts is None else self.num_redundant_experts
        if r > spare:
            raise ConfigError(
                f"eplb_config.num_redundant_experts = {r} is more than the {spare} spare "
                f"expert slots of {deployment} ({num_slots} slots for {num_experts} experts)")
        return dataclasses.replace(self, num_redundant_experts=r)
