"""Deployments: which devices each serving role owns, and the meshes built on them.

A deployment YAML (``configs/deployments/*.yaml``, schema in ``docs/deployments.md``) gives
each role a disjoint range of device indices and its parallelism:

=================  ===================  ==============================================
role               mesh axes            parallelism fields
=================  ===================  ==============================================
prefill            ``(dp, tp)``         ``dp`` groups x ``tp``
decode             ``(dp, tp)``         ``dp`` groups (``tp`` defaults to 1), each holding
                                        every expert; or ``ep: N`` (N = count): N DP ranks
                                        with the routed experts' slots split over them
decode_attention   ``(domain, dp)``     ``domains`` x ``dp`` per domain, TP = 1
decode_experts     ``(ep,)``            ``slots_per_device``, ``redundant_slots``,
                                        ``shared_devices`` (the last ones of the range)
=================  ===================  ==============================================

``parse_deployment`` validates the text alone (no JAX); ``DeploymentSpec.check_model`` adds
the model checks; ``load_deployment`` also builds the meshes from ``jax.devices()``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROLES = ("prefill", "decode", "decode_attention", "decode_experts")
MESH_AXES = {
    "prefill": ("dp", "tp"),
    "decode": ("dp", "tp"),
    "decode_attention": ("domain", "dp"),
    "decode_experts": ("ep",),
}
# Optional per-group capacity of the roles that run DP groups (the engine's options otherwise).
CAPACITY_FIELDS = ("max_num_seqs", "max_num_batched_tokens", "kv_cache_gib")
EP_FIELDS = ("slots_per_device", "redundant_slots", "dispatch_dtype")  # decode, with ep
_ROLE_FIELDS = {
    "prefill": {"devices", "dp", "tp", *CAPACITY_FIELDS},
    "decode": {"devices", "dp", "tp", "ep", *EP_FIELDS, *CAPACITY_FIELDS},
    "decode_attention": {"devices", "domains", "dp", *CAPACITY_FIELDS},
    "decode_experts": {"devices", "slots_per_device", "redundant_slots", "shared_devices",
                       "dispatch_dtype"},
}
# Payload of A2E and the expert mesh's dispatch: the activations' dtype, or INT8 + scales.
DISPATCH_DTYPES = ("auto", "int8")
_TOP_FIELDS = {"name", "description", "memory_per_device_gib", "roles"}


class DeploymentError(ValueError):
    """A deployment cannot be used; the message names the file and field."""


class DeploymentSyntaxError(DeploymentError):
    """Not YAML, or not the expected structure."""


class DeploymentFieldError(DeploymentError):
    """A missing, unknown or ill-typed field, or inconsistent sizes within a role."""


class UnknownRoleError(DeploymentError):
    """A role name outside ``ROLES``."""


class OverlappingRangesError(DeploymentError):
    """Two roles claim the same device."""


class TooFewDevicesError(DeploymentError):
    """The deployment needs more devices than JAX has."""


class HeadsNotDivisibleError(DeploymentError):
    """Tensor parallelism does not divide the model's attention heads."""


class ExpertSlotsError(DeploymentError):
    """Fewer expert slots than the model's routed experts (or no experts to place)."""


@dataclass(frozen=True)
class DeviceRange:
    """Device indices ``[start, start + count)`` into ``jax.devices()``."""

    start: int
    count: int

    @property
    def stop(self) -> int:
        return self.start + self.count

    def indices(self) -> range:
        return range(self.start, self.stop)


@dataclass(frozen=True)
class RoleSpec:
    """One role's devices and parallelism (fields not used by the role keep defaults)."""

    name: str
    devices: DeviceRange
    dp: int = 1
    tp: int = 1
    domains: int = 1
    ep: int = 1  # decode: routed experts parallel over this many devices (1: none)
    slots_per_device: int | None = None
    redundant_slots: int = 0
    shared_devices: int = 0
    dispatch_dtype: str = "auto"  # decode_experts: "int8" quantizes A2E and the dispatch
    max_num_seqs: int | None = None  # per DP group of this role
    max_num_batched_tokens: int | None = None
    kv_cache_gib: float | None = None

    @property
    def capacity(self) -> dict:
        """The capacity fields this role sets, as engine options (``kv_cache_bytes``)."""
        out = {k: getattr(self, k) for k in ("max_num_seqs", "max_num_batched_tokens")
               if getattr(self, k) is not None}
        if self.kv_cache_gib is not None:
            out["kv_cache_bytes"] = int(self.kv_cache_gib * (1 << 30))
        return out

    @property
    def mesh_axes(self) -> tuple[str, ...]:
        return MESH_AXES[self.name]

    @property
    def mesh_shape(self) -> tuple[int, ...]:
        if self.name in ("prefill", "decode"):
            return (self.dp, self.tp)
        if self.name == "decode_attention":
            return (self.domains, self.dp)
        return (self.devices.count,)

    @property
    def expert_parallel(self) -> bool:
        """A decode role whose routed experts are split over its devices."""
        return self.name == "decode" and self.ep > 1

    @property
    def routed_devices(self) -> int:
        """Expert role: devices holding routed-expert slots."""
        return self.devices.count - self.shared_devices

    def expert_slots(self, num_experts: int | None = None) -> int:
        """Routed expert slots; without ``slots_per_device`` they are sized for the model."""
        if self.slots_per_device is not None:
            return self.routed_devices * self.slots_per_device
        if num_experts is None:
            return 0
        return self.routed_devices * self.resolved_slots_per_device(num_experts)

    def resolved_slots_per_device(self, num_experts: int) -> int:
        if self.slots_per_device is not None:
            return self.slots_per_device
        return math.ceil((num_experts + self.redundant_slots) / self.routed_devices)


@dataclass(frozen=True)
class DeploymentSpec:
    """A parsed, validated deployment (no devices attached)."""

    name: str
    roles: dict[str, RoleSpec]
    description: str = ""
    memory_per_device_gib: float = 16.0
    source: str = "<dict>"

    @property
    def num_devices(self) -> int:
        return max(r.devices.stop for r in self.roles.values())

    @property
    def is_ma(self) -> bool:
        """MoE-attention disaggregation: decode split into attention and expert slices."""
        return "decode_attention" in self.roles

    def check_model(self, model) -> None:
        """Model-dependent checks: TP divides heads, enough expert slots (or, for a dense
        model on an MA layout, an FFN device per attention rank)."""
        for role in self.roles.values():
            where = f"{self.source}: roles.{role.name}"
            if role.tp > 1 and model.num_heads % role.tp:
                raise HeadsNotDivisibleError(
                    f"{where}.tp = {role.tp} does not divide the model's {model.num_heads} "
                    "attention heads")
            kv = model.num_kv_heads
            if model.mla is None and role.tp > 1 and kv % role.tp and role.tp % kv:
                raise HeadsNotDivisibleError(
                    f"{where}.tp = {role.tp} neither divides nor is a multiple of the "
                    f"model's {kv} KV heads")
        experts = self.roles.get("decode_experts") or next(  # a dense model's EP decode: DP
            (r for r in self.roles.values() if r.expert_parallel and model.moe), None)
        if experts is not None:
            where = f"{self.source}: roles.{experts.name}"
            if model.moe is None:  # a dense model: the expert devices serve its FFN
                attn = self.roles.get("decode_attention")
                if attn is not None and experts.devices.count < attn.dp:
                    raise ExpertSlotsError(
                        f"{where}: a dense model's FFN runs on the expert devices, one per "
                        f"attention rank of a domain: {experts.devices.count} devices for "
                        f"{attn.dp} ranks")
                return
            need = model.moe.num_experts
            slots = experts.expert_slots(need)
            if slots < need:
                raise ExpertSlotsError(
                    f"{where}.slots_per_device: {experts.routed_devices} routed devices x "
                    f"{experts.slots_per_device} = {slots} expert slots, fewer than the "
                    f"model's {need} experts")
            if slots < need + experts.redundant_slots:
                raise ExpertSlotsError(
                    f"{where}.redundant_slots = {experts.redundant_slots} does not fit: "
                    f"{slots} slots for {need} experts")


@dataclass(frozen=True)
class Role:
    """A role's spec with its mesh built on real devices."""

    spec: RoleSpec
    mesh: object  # jax.sharding.Mesh
    devices: tuple = field(default=())

    @property
    def name(self) -> str:
        return self.spec.name

    def domain_mesh(self, domain: int):
        """Attention role: the 1-D ``("dp",)`` mesh of one DP domain."""
        from jax.sharding import Mesh

        return Mesh(self.mesh.devices[domain], ("dp",))

    def routed_mesh(self):
        """Expert role: the ``("ep",)`` mesh of the routed-expert devices only."""
        from jax.sharding import Mesh

        return Mesh(self.mesh.devices[: self.spec.routed_devices], ("ep",))


@dataclass(frozen=True)
class Deployment:
    """A validated deployment with one mesh per role."""

    spec: DeploymentSpec
    roles: dict[str, Role]

    @property
    def name(self) -> str:
        return self.spec.name

    def role(self, name: str) -> Role:
        if name not in self.roles:
            raise UnknownRoleError(f"deployment {self.name!r} has no role {name!r}; it has "
                                   f"{sorted(self.roles)}")
        return self.roles[name]

    def mesh(self, name: str):
        return self.role(name).mesh


def _int(value, where: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise DeploymentFieldError(f"{where} must be an integer, got {value!r}")
    if value < minimum:
        raise DeploymentFieldError(f"{where} must be >= {minimum}, got {value}")
    return value


def _role(name: str, raw, src: str) -> RoleSpec:
    where = f"{src}: roles.{name}"
    if name not in ROLES:
        raise UnknownRoleError(f"{where}: unknown role {name!r}; roles are {', '.join(ROLES)}")
    if not isinstance(raw, dict):
        raise DeploymentSyntaxError(f"{where} must be a mapping")
    unknown = set(raw) - _ROLE_FIELDS[name]
    if unknown:
        raise DeploymentFieldError(f"{where}: unknown field(s) {sorted(unknown)}; "
                                   f"allowed: {sorted(_ROLE_FIELDS[name])}")
    dev = raw.get("devices")
    if not isinstance(dev, dict) or set(dev) != {"start", "count"}:
        raise DeploymentFieldError(f"{where}.devices must be {{start: N, count: M}}, got {dev!r}")
    devices = DeviceRange(_int(dev["start"], f"{where}.devices.start", 0),
                          _int(dev["count"], f"{where}.devices.count", 1))
    kw = {k: _int(raw[k], f"{where}.{k}", 0 if k in ("redundant_slots", "shared_devices") else 1)
          for k in raw if k not in ("devices", "kv_cache_gib", "dispatch_dtype")}
    if "dispatch_dtype" in raw:
        if raw["dispatch_dtype"] not in DISPATCH_DTYPES:
            raise DeploymentFieldError(f"{where}.dispatch_dtype must be one of "
                                       f"{list(DISPATCH_DTYPES)}, got {raw['dispatch_dtype']!r}")
        kw["dispatch_dtype"] = raw["dispatch_dtype"]
    if "kv_cache_gib" in raw:
        gib = raw["kv_cache_gib"]
        if isinstance(gib, bool) or not isinstance(gib, int | float) or gib <= 0:
            raise DeploymentFieldError(f"{where}.kv_cache_gib must be a positive number, "
                                       f"got {gib!r}")
        kw["kv_cache_gib"] = float(gib)
    kw.setdefault("dp", kw.get("ep", 1))  # every device of an EP decode role is a DP rank
    spec = RoleSpec(name, devices, **kw)
    n = devices.count
    if name == "decode" and spec.ep > 1 and (spec.ep != n or spec.tp != 1):
        raise DeploymentFieldError(f"{where}.ep = {spec.ep}: expert parallelism spans the role's "
                                   f"devices, each a DP rank (tp = 1): ep must equal "
                                   f"devices.count ({n}), got tp {spec.tp}")
    if name == "decode" and spec.ep == 1 and set(raw) & set(EP_FIELDS):
        raise DeploymentFieldError(
            f"{where}: slots_per_device, redundant_slots and dispatch_dtype describe expert "
            f"parallelism; set ep: {n} (or drop them: each decode group holds every expert)")
    if name in ("prefill", "decode") and spec.dp * spec.tp != n:
        raise DeploymentFieldError(
            f"{where}: dp {spec.dp} x tp {spec.tp} = {spec.dp * spec.tp} != devices.count {n}")
    if name == "decode_attention" and spec.domains * spec.dp != n:
        raise DeploymentFieldError(f"{where}: domains {spec.domains} x dp {spec.dp} = "
                                   f"{spec.domains * spec.dp} != devices.count {n}")
    if name == "decode_experts" and spec.shared_devices >= n:
        raise DeploymentFieldError(f"{where}.shared_devices = {spec.shared_devices} leaves no "
                                   f"device for routed experts out of {n}")
    return spec


def parse_deployment(raw, source: str = "<dict>") -> DeploymentSpec:
    """Validate a deployment mapping (the parsed YAML) without touching devices."""
    if not isinstance(raw, dict):
        raise DeploymentSyntaxError(f"{source}: expected a mapping at the top level")
    unknown = set(raw) - _TOP_FIELDS
    if unknown:
        raise DeploymentFieldError(f"{source}: unknown field(s) {sorted(unknown)}; "
                                   f"allowed: {sorted(_TOP_FIELDS)}")
    if not isinstance(raw.get("name"), str):
        raise DeploymentFieldError(f"{source}: name must be a string")
    if not isinstance(raw.get("roles"), dict) or not raw["roles"]:
        raise DeploymentFieldError(f"{source}: roles must be a non-empty mapping")
    roles = {name: _role(name, r, source) for name, r in raw["roles"].items()}
    has_ma = {"decode_attention", "decode_experts"} & set(roles)
    if "decode" in roles and has_ma:
        raise DeploymentFieldError(f"{source}: roles.decode (colocated) and "
                                   f"roles.{sorted(has_ma)[0]} (MA) cannot be combined")
    if has_ma and len(has_ma) != 2:
        raise DeploymentFieldError(f"{source}: MA needs both roles.decode_attention and "
                                   "roles.decode_experts")
    if "decode" not in roles and not has_ma:
        raise DeploymentFieldError(f"{source}: roles needs decode, or decode_attention + "
                                   "decode_experts")
    ordered = sorted(roles.values(), key=lambda r: r.devices.start)
    for a, b in zip(ordered, ordered[1:], strict=False):
        if b.devices.start < a.devices.stop:
            raise OverlappingRangesError(
                f"{source}: roles.{a.name} devices [{a.devices.start}, {a.devices.stop}) "
                f"overlap roles.{b.name} devices [{b.devices.start}, {b.devices.stop})")
    mem = raw.get("memory_per_device_gib", 16.0)
    if isinstance(mem, bool) or not isinstance(mem, int | float) or mem <= 0:
        raise DeploymentFieldError(f"{source}: memory_per_device_gib must be a positive number")
    return DeploymentSpec(raw["name"], roles, str(raw.get("description", "")), float(mem),
                          source)


def read_deployment(path: str | Path) -> DeploymentSpec:
    """Parse and validate a deployment YAML file (no devices needed)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise DeploymentError(f"cannot read deployment {path}: {e.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise DeploymentSyntaxError(f"{path}: not valid YAML: {e}") from None
    return parse_deployment(raw, str(path))


def build_deployment(spec: DeploymentSpec, devices=None, model=None) -> Deployment:
    """Attach meshes built from ``devices`` (default ``jax.devices()``) to a spec."""
    import jax
    import numpy as np
    from jax.sharding import Mesh

    if model is not None:
        spec.check_model(model)
    devices = list(jax.devices() if devices is None else devices)
    if spec.num_devices > len(devices):
        raise TooFewDevicesError(
            f"{spec.source}: needs {spec.num_devices} devices, JAX has {len(devices)} "
            f"(on CPU the virtual device count is fixed when JAX starts: build the first "
            f"LLM of the process with this deployment, which sizes the mesh itself, or set "
            f"XDS_CPU_DEVICES={spec.num_devices} in the environment before starting Python)")
    roles = {}
    for r in spec.roles.values():
        devs = tuple(devices[i] for i in r.devices.indices())
        mesh = Mesh(np.array(devs, dtype=object).reshape(r.mesh_shape), r.mesh_axes)
        roles[r.name] = Role(r, mesh, devs)
    return Deployment(spec, roles)


def load_deployment(path: str | Path, *, devices=None, model=None) -> Deployment:
    """Read, validate (with ``model`` when given) and build a deployment's role meshes."""
    return build_deployment(read_deployment(path), devices=devices, model=model)
