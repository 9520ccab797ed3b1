"""Where an MA deployment puts things, decided once: ``MALayout``.

Built by the deployment (``MALayout.from_deployment``) from the ``decode_attention`` and
``decode_experts`` roles and the model: the attention domains (meshes of DP ranks, TP = 1),
the routed-expert devices and their slot table (``ExpertMap``, with redundant replicas),
the shared-expert dies, the A2E mode and the trampoline map (which expert device each
attention rank of a domain talks to). Everything after it (services, the pipeline, the pool)
reads this object instead of re-deriving placement from the deployment.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from jax.sharding import Mesh

from collectives.expert_map import ExpertMap, build_expert_map
from collectives.transport import TrampolineMap
from sharding.deployment import (
    DISPATCH_DTYPES,
    Deployment,
    DeploymentFieldError,
    load_deployment,
)
from xds_jax.model.config import ModelConfig

A2E_MODES = ("trampoline", "direct")


@dataclasses.dataclass(frozen=True)
class MALayout:
    """The placement of one MA deployment.

    Attributes:
      name: the deployment's name.
      domain_meshes: one ``("dp",)`` mesh of attention ranks per domain.
      expert_devices: the routed-expert devices (the whole expert role for a dense model,
        whose FFN they serve).
      shared_devices: dies that run the shared experts (empty: attention ranks do).
      expert_map: slot table of the routed experts, or None for a dense model.
      a2e_mode: ``"trampoline"`` or ``"direct"`` (``collectives.a2e``).
      trampolines: attention rank of a domain -> expert device index (and hop round).
      dispatch_dtype: ``"int8"``: A2E hops and the expert mesh's dispatch carry INT8 rows
        with one scale each (combine and E2A stay in the activations' dtype); ``"auto"``.
    """

    name: str
    domain_meshes: tuple[Mesh, ...]
    expert_devices: tuple
    shared_devices: tuple
    expert_map: ExpertMap | None
    a2e_mode: str
    trampolines: TrampolineMap
    dispatch_dtype: str = "auto"

    @classmethod
    def from_deployment(cls, deployment: Deployment, cfg: ModelConfig, *,
                        a2e_mode: str = "trampoline",
                        dispatch_dtype: str | None = None) -> MALayout:
        """``dispatch_dtype`` (``"auto"`` / ``"int8"``) overrides the expert role's field."""
        deployment.spec.check_model(cfg)
        if a2e_mode not in A2E_MODES:
            raise ValueError(f"a2e_mode must be one of {A2E_MODES}, got {a2e_mode!r}")
        if dispatch_dtype not in (None, *DISPATCH_DTYPES):
            raise DeploymentFieldError(f"dispatch_dtype must be one of "
                                       f"{list(DISPATCH_DTYPES)}, got {dispatch_dtype!r}")
        attn, experts = deployment.role("decode_attention"), deployment.role("decode_experts")
        every = tuple(experts.mesh.devices.flat)
        routed = every[:experts.spec.routed_devices]
        expert_map = None
        if cfg.moe is not None:
            slots = experts.spec.resolved_slots_per_device(cfg.moe.num_experts)
            expert_map = build_expert_map(cfg.moe.num_experts, len(routed), slots)
        has_shared = cfg.moe is not None and cfg.moe.num_shared_experts > 0
        return cls(
            name=deployment.name,
            domain_meshes=tuple(attn.domain_mesh(d) for d in range(attn.spec.domains)),
            expert_devices=routed if cfg.moe is not None else every,
            shared_devices=every[len(routed):] if has_shared else (),
            expert_map=expert_map,
            a2e_mode=a2e_mode,
            trampolines=TrampolineMap.spread(attn.spec.dp, len(routed)),
            dispatch_dtype=dispatch_dtype or experts.spec.dispatch_dtype,
        )

    @classmethod
    def load(cls, path: str, cfg: ModelConfig, **options) -> MALayout:
        """From a deployment file (``configs/deployments/*.yaml``)."""
        return cls.from_deployment(load_deployment(path), cfg, **options)

    @property
    def num_domains(self) -> int:
        return len(self.domain_meshes)

    @property
    def ranks_per_domain(self) -> int:
        return self.domain_meshes[0].devices.size

    @property
    def num_ranks(self) -> int:
        return self.num_domains * self.ranks_per_domain

    def first_rank(self, domain: int) -> int:
        """Index (over all attention ranks) of the domain's rank 0."""
        return domain * self.ranks_per_domain

    def rank_devices(self, domain: int) -> list:
        return list(self.domain_meshes[domain].devices.flat)

    def expert_mesh(self) -> Mesh:
        """The routed-expert (or dense-FFN) devices as an ``("ep",)`` mesh."""
        return Mesh(np.array(self.expert_devices), ("ep",))

    def ffn_devices(self) -> list:
        """Dense models: the expert device serving each attention rank of a domain."""
        tmap = TrampolineMap.spread(self.ranks_per_domain, len(self.expert_devices))
        return [self.expert_devices[t] for t in tmap.target_of]

    def describe(self) -> dict:
        """Placement facts for logs and stats."""
        emap = self.expert_map
        return {
            "deployment": self.name, "domains": self.num_domains,
            "ranks_per_domain": self.ranks_per_domain, "a2e_mode": self.a2e_mode,
            "hop_rounds": self.trampolines.rounds,
            "expert_devices": len(self.expert_devices),
            "expert_slots": emap.num_slots if emap else 0,
            "redundant_slots": emap.num_redundant if emap else 0,
            "shared_experts_on": "shared_devices" if self.shared_devices else "attention",
            "dense_ffn_on": "attention" if emap else "expert_devices",
            "dispatch_dtype": self.dispatch_dtype,
        }
