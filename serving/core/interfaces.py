"""The small typed interfaces between the engine's layers.

The control plane talks to **groups** (places requests, reads their load), the engine's loops
step **drivers** (a colocated group drives itself; an MA domain pool drives many attention
groups as one SPMD program), and a group's step runs on a **runner** (the colocated
``ModelRunner`` or an MA rank's view of its domain). Groups receive work only through typed
inbox **messages**, dispatched by type (``DPGroup.deliver``); a disaggregated layout adds its
own (``serving.disagg.pd.Arrival``). A **router** moves started requests between groups
(PD). Nothing here imports JAX.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from serving.core.request import Request
    from serving.core.scheduler import ScheduledSeq, SchedulerOutput


class EngineMisuseError(RuntimeError):
    """The engine's parts were wired or called wrongly (a bug, e.g. a runner asked to do what
    its driver does). A group never blames a request for it: the step is undone and the
    error goes up."""


# -- inbox messages ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class AddRequest:
    """Queue a new request's sequences."""

    request: Request


@dataclasses.dataclass(frozen=True)
class AbortRequest:
    """Drop a request wherever it is in this group (unknown ids are ignored)."""

    request_id: str


# -- the runner: one step's compute, and the group's KV pages --------------------------------
@runtime_checkable
class Runner(Protocol):
    """Runs a scheduled batch on the group's devices and appends the sampled tokens; owns the
    group's KV pages, which leave or enter only through ``export_kv``/``import_kv``."""

    compile_count: int
    # Optional: ``overlaps_steps`` (a property, False when absent) says the runner takes
    # ``launch(scheduled, after=handle)``: the handle of a step launched but not finished yet,
    # whose sampled tokens the new step's decode rows take on device (asynchronous scheduling,
    # ``serving.core.overlap``).

    def launch(self, scheduled: list[ScheduledSeq]) -> Any:
        """Dispatch the step asynchronously; returns a handle for ``finish``."""

    def finish(self, handle: Any) -> None:
        """Wait for the step, append sampled tokens (and logprobs) to the sequences."""

    @property
    def kv_sharding(self) -> Any:
        """Where pages given to ``import_kv`` must lie (block axis first): a sharding."""

    def export_kv(self, block_ids: Sequence[int]) -> Any:
        """A copy of the KV pages of ``block_ids`` (per layer, ``[len(block_ids), ...]``)."""

    def import_kv(self, block_ids: Sequence[int], pages: Any) -> None:
        """Write KV pages received from elsewhere into ``block_ids`` (the pool stays donated
        through steps; nothing recompiles and ``compile_count`` is unchanged)."""

    def spec_stats(self) -> dict[str, Any]:
        """Speculative-decoding counters (``spec_*``; ``{}`` for a runner that does not
        draft), summed over groups into ``Engine.stats()``."""


# -- the group: what the control plane and a driver see ---------------------------------------
@runtime_checkable
class Group(Protocol):
    """A self-contained DP group: scheduler, KV blocks, runner, outputs to callers."""

    index: int
    role: str
    healthy: bool

    def submit(self, request: Request) -> None: ...

    def abort(self, request_id: str) -> None: ...

    def load(self) -> Any:
        """A ``GroupLoad``: running, waiting, KV use, health, capacity."""

    def has_work(self) -> bool: ...

    def plan(self) -> SchedulerOutput | None:
        """First half of a step: take inbox messages and schedule; None when idle."""

    def complete(self, out: SchedulerOutput) -> None:
        """Second half: record the step whose tokens were appended, emit outputs."""

    def fail(self, reason: str) -> None:
        """Mark the group unhealthy and end every request it holds (aborted): the groups of
        a pool whose step raised."""

    def fence(self) -> bool:
        """Take the group out of service (unhealthy, refusing messages); False if it was."""

    def evacuate(self, timeout: float = -1) -> list | None:
        """Fence it and hand back its work as ``Resume`` messages, its pool reset; None if a
        step held its state past ``timeout`` seconds (``serving.core.fencing``)."""

    def rejoin(self) -> None:
        """Back in service, empty, after an evacuation."""

    def wait_for_work(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds until a message arrives; True if one did."""


# -- the driver: what an engine loop steps ----------------------------------------------------
@runtime_checkable
class Driver(Protocol):
    """Something the engine steps: a group driving itself, or a pool of groups run as one
    program (an MA domain pool). The engine owns the loop: ``step`` while there is work,
    ``Group.wait_for_work`` on its groups when idle, ``Group.fail`` on them if a step raises."""

    @property
    def groups(self) -> list[Group]:
        """The groups this driver steps (itself for a colocated group)."""

    def step(self) -> bool:
        """Run one step; False when there was nothing to do."""

    def has_work(self) -> bool: ...

    def stats(self) -> dict[str, Any]:
        """Driver-level counters, merged into ``Engine.stats()`` (a group driving itself has
        none: ``{}``)."""

    def expert_stats(self) -> dict[str, Any]:
        """Per-expert load of the last window (``{"expert_load": {layer: [tokens per
        expert]}}``) and expert-balancing counters, merged unprefixed into
        ``Engine.stats()``; ``{}`` for drivers with no expert slice."""


# -- the router: moves requests between groups after they start -------------------------------
@runtime_checkable
class Router(Protocol):
    """Moves requests from the groups they entered to the groups that finish them (the PD
    hand-off, ``serving.disagg.pd_router.PDRouter``); the engine reads its counters, tells it which
    groups go out of service and come back, and gives it ``on_lost``: where sequences whose
    hand-off failed go to be started again (``Engine.resume``)."""

    on_lost: Any

    def group_lost(self, group: Group) -> None: ...

    def group_back(self, group: Group) -> None: ...

    def stats(self) -> dict[str, float]: ...
