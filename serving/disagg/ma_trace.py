"""Tracing of MA decode as a wrapper around the stage and service calls.

With a timeline, ``MAPool`` wraps each domain (``TracedDomain``) and each ``SliceService``
(``TracedService``) so that every call is recorded on the ``Timeline``
(``serving.core.timeline``) while the compute code stays free of tracing. Each call dispatches
the timeline's start markers on its inputs right before the stage (``Timeline.begin``), so its
start and end are observed on the devices. A ``Tracer`` remembers which event produced each
output array, so an event's dependencies are the events that produced its inputs, and its
``domain`` / ``micro_batch`` / ``layer`` come from them unless the call names its own (an A2E
hop belongs to the gate's micro-batch and layer, E2A to the experts'). Roles and streams:

- ``attention`` on ``attention/d{domain}``: embed, attn, ffn (MoE models' dense layers),
  gate, combine, head;
- a service's ``trace`` triple: A2E hop, compute, E2A hop (routed experts and the dense FFN:
  ``a2e``, ``expert``, ``e2a``; shared experts: ``shared_expert``), with the bytes each
  moved.
"""

from __future__ import annotations

import jax

from collectives.transport import SliceService
from serving.core.timeline import Timeline


class Tracer:
    """Records calls on a timeline; dependencies and metadata follow the arrays."""

    def __init__(self, timeline: Timeline) -> None:
        self.timeline = timeline
        self._made: dict[int, tuple[jax.Array, int | None, dict]] = {}

    def reset(self) -> None:
        """Forget the arrays of earlier passes."""
        self._made.clear()

    def call(self, role: str, stage: str, stream: str, fn, args: tuple, meta: dict,
             nbytes=0):
        """``fn(*args)``, recorded. ``stage`` and ``stream`` are formatted with the event's
        ``layer`` and ``domain``; ``meta`` entries set to None drop an inherited value;
        ``nbytes`` is a number or a function of the outputs."""
        deps, inherited = [], {}
        for a in jax.tree.leaves(args):
            hit = self._made.get(id(a))
            if hit is not None and hit[0] is a:
                if hit[1] not in deps:
                    deps.append(hit[1])
                inherited |= hit[2]
        merged = {k: v for k, v in (inherited | meta).items() if v is not None}
        begun = self.timeline.begin(args)
        out = fn(*args)
        leaves = [a for a in jax.tree.leaves(out) if isinstance(a, jax.Array)]
        names = {"layer": merged.get("layer"), "domain": merged.get("domain")}
        moved = nbytes(out) if callable(nbytes) else nbytes
        event = self.timeline.record(role, stage.format(**names), leaves,
                                     stream=stream.format(**names), deps=deps, begun=begun,
                                     bytes=moved, **merged)
        for a in leaves:
            self._made[id(a)] = (a, event, merged)
        return out


class TracedDomain:
    """A ``Domain`` whose stage calls are recorded (everything else passes through)."""

    def __init__(self, domain, tracer: Tracer) -> None:
        self.inner = domain
        self.tracer = tracer
        self.stream = f"attention/d{domain.index}"

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def _call(self, stage: str, fn, args: tuple, mb=None, **meta):
        if mb is not None:
            meta |= {"domain": mb.domain, "micro_batch": mb.index}
        return self.tracer.call("attention", stage, self.stream, fn, args, meta)

    def embed(self, mb):
        return self._call("embed", self.inner.embed, (mb,), mb, layer=None)

    def attention(self, layer: int, x_BSD, mb):
        return self._call("attn_l{layer}", self.inner.attention, (layer, x_BSD, mb), mb,
                          layer=layer)

    def ffn(self, layer: int, x_BSD):
        return self._call("ffn_l{layer}", self.inner.ffn, (layer, x_BSD), layer=layer)

    def gate(self, layer: int, x_BSD, mb, shared: bool = True, load_AE=None):
        return self._call("gate_l{layer}", self.inner.gate,
                          (layer, x_BSD, mb, shared, load_AE), mb, layer=layer)

    def combine(self, x_TD, routed_TD, shared_TD, mb):
        return self._call("combine_l{layer}", self.inner.combine,
                          (x_TD, routed_TD, shared_TD, mb), mb)

    def head(self, x_BSD, mb):
        return self._call("head", self.inner.head, (x_BSD, mb), mb, layer=None)


class TracedService:
    """A ``SliceService`` whose send, launch and receive are recorded."""

    def __init__(self, service: SliceService, tracer: Tracer) -> None:
        self.inner = service
        self.tracer = tracer

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def send(self, *arrays):
        role, stage, stream = self.inner.trace[0]
        return self.tracer.call(role, stage, stream, self.inner.send, arrays, {},
                                self.inner.send_bytes(arrays))

    def launch(self, layer: int, sent: tuple, capacity: int | None = None):
        role, stage, stream = self.inner.trace[1]
        return self.tracer.call(role, stage, stream, self.inner.launch,
                                (layer, sent, capacity), {"layer": layer},
                                self.inner.launch_bytes(sent, capacity))

    def receive(self, out):
        role, stage, stream = self.inner.trace[2]
        return self.tracer.call(role, stage, stream, self.inner.receive, (out,), {},
                                self.inner.receive_bytes)
