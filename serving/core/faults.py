"""Fault injection: specs parsed into frozen dataclasses, and the hooks where groups meet them.

A spec is ``kind:field=value:...``, e.g. ``group_crash:group=1:after_steps=3``. Groups (and
PD decode groups' KV pulls) consult the engine's ``FaultInjector`` at fixed points of a step,
so nothing is patched in: ``before_launch`` (a crash: the group's loop raises), ``stall``
(between launch and finish: the loop blocks), ``during_transfer`` (a KV pull fails before its
first chunk, or after ``after_chunks`` chunks landed) and, in an MA pool's step,
``before_dispatch`` (each hop to the expert slice: a lost expert rank or a transient
collective error). ``after_steps`` counts the target's steps from when the fault was armed
(``FaultInjector.add``, at engine build or later, e.g. after a warm-up).

What recovers how: ``docs/reliability.md``. ``expert_rank_down`` and ``collective_error``
need an MA layout (``serving.disagg.ma_recovery`` recovers from them).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

from xds_jax.errors import ConfigError

ROLES = ("prefill", "decode")


class FaultSpecError(ConfigError):
    """A fault spec is malformed: unknown kind or field, a missing or out-of-range value."""


class UnsupportedFaultError(ConfigError):
    """A valid fault spec this engine's layout cannot inject or recover from."""


class InjectedFault(RuntimeError):
    """Raised at a hook point by an armed fault."""


class GroupCrashed(InjectedFault):
    """A ``group_crash`` fault: the group's loop dies."""


class KVTransferFailed(InjectedFault):
    """A ``kv_transfer_fail`` fault: one KV pull fails (after ``after_chunks`` chunks)."""


class CollectiveFailed(InjectedFault):
    """A transient error of one MA hop (``collective_error``): the step is re-run."""


class ExpertRankLost(InjectedFault):
    """An ``expert_rank_down`` fault: expert device ``rank`` of the deployment's expert slice
    is gone for good."""

    def __init__(self, message: str, rank: int) -> None:
        super().__init__(message)
        self.rank = rank


# -- field values -----------------------------------------------------------------------------
def _count(minimum: int) -> Callable[[str, Any], int]:
    def check(name: str, value: Any) -> int:
        if isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                raise FaultSpecError(f"field {name!r} must be an integer, got {value!r}") from None
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise FaultSpecError(f"field {name!r} must be an integer >= {minimum}, got {value!r}")
        return value
    return check


def _seconds(name: str, value: Any) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise FaultSpecError(f"field {name!r} must be a number of seconds, got {value!r}") from None
    if not 0 < seconds < float("inf"):
        raise FaultSpecError(f"field {name!r} must be positive and finite, got {value!r}")
    return seconds


def _role(name: str, value: Any) -> str | None:
    if value is not None and value not in ROLES:
        raise FaultSpecError(f"field {name!r} must be one of {', '.join(ROLES)}, got {value!r}")
    return value


FIELDS: dict[str, Callable[[str, Any], Any]] = {
    "group": _count(0), "rank": _count(0), "after_steps": _count(0), "times": _count(1),
    "after_chunks": _count(0),
    "seconds": _seconds, "role": _role,
}


class _Spec:
    """Shared by the spec dataclasses: fields checked on construction, ``str`` is the spec."""

    kind: ClassVar[str]

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None or f.default is not None:  # None: an optional field unset
                object.__setattr__(self, f.name, FIELDS[f.name](f.name, value))

    def __str__(self) -> str:
        parts = [self.kind] + [f"{f.name}={getattr(self, f.name)}"
                               for f in dataclasses.fields(self)
                               if getattr(self, f.name) is not None]
        return ":".join(parts)


@dataclasses.dataclass(frozen=True)
class GroupCrash(_Spec):
    """The group's loop raises before the step that follows ``after_steps`` steps. ``group``:
    its index among ``role``'s groups, or the engine-wide ``DPGroup.index`` without a role."""

    kind: ClassVar[str] = "group_crash"
    group: int
    role: str | None = None
    after_steps: int = 0


@dataclasses.dataclass(frozen=True)
class GroupStall(_Spec):
    """The group's loop blocks ``seconds`` inside the step after ``after_steps`` steps
    (between launching the step and recording it), and in each of the ``times - 1`` steps
    after it (a slow group)."""

    kind: ClassVar[str] = "group_stall"
    group: int
    seconds: float
    role: str | None = None
    after_steps: int = 0
    times: int = 1


@dataclasses.dataclass(frozen=True)
class KVTransferFail(_Spec):
    """The next ``times`` PD KV pulls fail: into any decode group, or into decode group
    ``group`` (its index among the decode groups), where they hit one sequence's retries.
    ``after_chunks``: a pull fails once that many of its chunks have landed (0: before the
    first moves); pulls of fewer chunks go through."""

    kind: ClassVar[str] = "kv_transfer_fail"
    times: int = 1
    group: int | None = None
    after_chunks: int = 0


@dataclasses.dataclass(frozen=True)
class ExpertRankDown(_Spec):
    """Expert device ``rank`` (its index in the deployment's routed-expert slice) is lost in
    the MA step after ``after_steps`` steps; the pool scales the expert slice down."""

    kind: ClassVar[str] = "expert_rank_down"
    rank: int
    after_steps: int = 0


@dataclasses.dataclass(frozen=True)
class CollectiveError(_Spec):
    """A transient collective error at an MA hop, ``times`` attempts in a row from the step
    after ``after_steps`` steps; the pool rolls the step back and re-runs it."""

    kind: ClassVar[str] = "collective_error"
    after_steps: int = 0
    times: int = 1


FaultSpec = GroupCrash | GroupStall | KVTransferFail | ExpertRankDown | CollectiveError
KINDS: dict[str, type] = {cls.kind: cls for cls in (GroupCrash, GroupStall, KVTransferFail,
                                                    ExpertRankDown, CollectiveError)}


def parse_fault(spec: str | FaultSpec) -> FaultSpec:
    """A spec ``kind:field=value:...`` as its dataclass (a dataclass is returned as is)."""
    if isinstance(spec, tuple(KINDS.values())):
        return spec
    if not isinstance(spec, str):
        raise FaultSpecError(f"a fault spec is a string like 'group_crash:group=1:after_steps=3'"
                             f", got {type(spec).__name__}")
    kind, *items = spec.strip().split(":")
    cls = KINDS.get(kind)
    if cls is None:
        raise FaultSpecError(f"fault {spec!r}: unknown kind {kind!r} (kinds: "
                             f"{', '.join(KINDS)})")
    names = [f.name for f in dataclasses.fields(cls)]
    values: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise FaultSpecError(f"fault {spec!r}: {item!r} is not field=value")
        if name not in names:
            raise FaultSpecError(f"fault {spec!r}: {kind} has no field {name!r} (fields: "
                                 f"{', '.join(names)})")
        if name in values:
            raise FaultSpecError(f"fault {spec!r}: field {name!r} given twice")
        values[name] = value
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in values
               and f.default is dataclasses.MISSING]
    if missing:
        raise FaultSpecError(f"fault {spec!r}: field {missing[0]!r} is required")
    try:
        return cls(**values)
    except FaultSpecError as e:
        raise FaultSpecError(f"fault {spec!r}: {e}") from None


def parse_faults(specs: Iterable[str | FaultSpec]) -> tuple[FaultSpec, ...]:
    return tuple(parse_fault(s) for s in specs)


# -- injection --------------------------------------------------------------------------------
@dataclasses.dataclass
class _Armed:
    spec: FaultSpec
    target: Any  # the group the fault hits; None: any group
    baseline: int  # the target's steps when armed
    left: int  # injections still to come


class FaultInjector:
    """Armed faults of one engine and the hooks its groups call (thread-safe).

    Built by the engine over its ``groups``, ``drivers`` and PD ``router`` (None when not
    PD), which ``add`` checks each spec against. ``injected`` counts faults that fired.
    """

    def __init__(self, groups: Iterable = (), drivers: Iterable = (), router: Any = None):
        self._groups = list(groups)
        self._drivers = list(drivers)
        self._router = router
        self._lock = threading.Lock()
        self._armed: list[_Armed] = []
        self._released = threading.Event()  # set at shutdown: stalls end at once
        self.injected = 0
        self.fired: list[tuple[float, str]] = []  # (time.monotonic(), spec) of each injection

    # -- arming -------------------------------------------------------------------------------
    def add(self, spec: str | FaultSpec) -> FaultSpec:
        """Arm a fault now (``after_steps`` counts from here); refuses what this layout
        cannot inject or recover from, with ``UnsupportedFaultError``."""
        spec, target = self._resolve(spec)
        with self._lock:
            self._armed.append(_Armed(spec, target, target.steps if target else 0,
                                      getattr(spec, "times", 1)))
        return spec

    def check(self, spec: str | FaultSpec) -> FaultSpec:
        """``add``'s checks against this layout, without arming the fault."""
        return self._resolve(spec)[0]

    def _resolve(self, spec: str | FaultSpec) -> tuple[FaultSpec, Any]:
        """The parsed spec and what it strikes (None: the first transfer, any group)."""
        spec = parse_fault(spec)
        pools = [d for d in self._drivers if list(d.groups) != [d]]  # MA pools
        target = None
        if isinstance(spec, ExpertRankDown | CollectiveError):
            if not pools:
                raise UnsupportedFaultError(
                    f"fault {spec}: {spec.kind} needs an MA layout (decode_attention and "
                    "decode_experts roles); this engine has none")
            target = pools[0]
            if isinstance(spec, ExpertRankDown):
                try:
                    target.check_scale_down(spec.rank)
                except ConfigError as e:
                    raise UnsupportedFaultError(f"fault {spec}: {e}") from None
        elif isinstance(spec, KVTransferFail):
            if self._router is None:
                raise UnsupportedFaultError(
                    f"fault {spec}: kv_transfer_fail needs a PD layout (prefill and decode "
                    "roles); this engine has no KV transfers")
            if any(g in pool.groups for pool in pools for g in self._router.decode):
                raise UnsupportedFaultError(
                    f"fault {spec}: KV transfer faults into MA attention groups are not "
                    "supported yet")
            if spec.group is not None:
                if spec.group >= len(self._router.decode):
                    raise UnsupportedFaultError(
                        f"fault {spec}: field 'group': decode group {spec.group} does not "
                        f"exist ({len(self._router.decode)} decode groups)")
                target = self._router.decode[spec.group]
        else:
            target = self._target(spec)
        return spec, target

    @property
    def pending(self) -> list[FaultSpec]:
        """The armed faults still to fire (all their ``times``)."""
        with self._lock:
            return [armed.spec for armed in self._armed if armed.left > 0]

    def _target(self, spec: GroupCrash | GroupStall) -> Any:
        if spec.role is None:
            found = [g for g in self._groups if g.index == spec.group]
            if not found:
                raise UnsupportedFaultError(
                    f"fault {spec}: field 'group': no group {spec.group} (groups "
                    f"{[g.index for g in self._groups]}); or give a role")
        else:
            of_role = [g for g in self._groups if g.role == spec.role]
            if not of_role:
                roles = sorted({g.role for g in self._groups})
                raise UnsupportedFaultError(f"fault {spec}: field 'role': this layout has no "
                                            f"{spec.role} groups (roles: {', '.join(roles)})")
            if spec.group >= len(of_role):
                raise UnsupportedFaultError(
                    f"fault {spec}: field 'group': {spec.role} group {spec.group} does not "
                    f"exist ({len(of_role)} {spec.role} groups)")
            found = [of_role[spec.group]]
        target = found[0]
        if not any(d is target for d in self._drivers):
            raise UnsupportedFaultError(
                f"fault {spec}: group {target.index} is an MA attention group (its pool steps "
                "it); faults of MA groups are not supported yet")
        return target

    # -- hooks --------------------------------------------------------------------------------
    def _fire(self, kind: type, group: Any, due=lambda spec: True) -> FaultSpec | None:
        """The first armed fault of ``kind`` due now for ``group`` (and ``due(spec)``),
        spent by one."""
        if not self._armed:  # the common case: nothing armed, no lock taken
            return None
        with self._lock:
            for armed in self._armed:
                if not isinstance(armed.spec, kind) or armed.left <= 0 or not due(armed.spec):
                    continue
                if armed.target is not None and (
                        armed.target is not group or group.steps - armed.baseline
                        < getattr(armed.spec, "after_steps", 0)):
                    continue
                armed.left -= 1
                self.injected += 1
                self.fired.append((time.monotonic(), str(armed.spec)))
                return armed.spec
        return None

    def before_launch(self, group: Any) -> None:
        """A group is about to launch a step: raise ``GroupCrashed`` if its crash is due."""
        spec = self._fire(GroupCrash, group)
        if spec is not None:
            raise GroupCrashed(f"injected fault {spec}")

    def stall(self, group: Any) -> float:
        """Between launch and finish: block the group's loop if its stall is due (ended
        early by ``release``). Returns the seconds it blocked for (0 when none was due)."""
        spec = self._fire(GroupStall, group)
        if spec is None:
            return 0.0
        self._released.wait(spec.seconds)
        return spec.seconds

    def during_transfer(self, group: Any, landed: int) -> None:
        """A decode group's KV pull has ``landed`` chunks so far (0: about to start): raise
        ``KVTransferFailed`` if a failure after that many chunks is due."""
        spec = self._fire(KVTransferFail, group, lambda s: s.after_chunks == landed)
        if spec is not None:
            raise KVTransferFailed(f"injected fault {spec} (pull into decode group "
                                   f"{group.index}, {landed} chunks landed)")

    def before_dispatch(self, pool: Any) -> None:
        """An MA pool's step is about to hop to the expert slice: raise ``ExpertRankLost`` or
        ``CollectiveFailed`` if such a fault is due."""
        spec = self._fire(ExpertRankDown, pool)
        if spec is not None:
            raise ExpertRankLost(f"injected fault {spec}", spec.rank)
        spec = self._fire(CollectiveError, pool)
        if spec is not None:
            raise CollectiveFailed(f"injected fault {spec}")

    def release(self) -> None:
        """End every stall now and let no later one block (engine shutdown)."""
        self._released.set()


NO_FAULTS = FaultInjector()  # what a group consults until an engine gives it its injector
