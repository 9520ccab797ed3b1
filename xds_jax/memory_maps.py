"""Room for compiled programs among the memory mappings Linux allows a process.

XLA:CPU maps three one-page regions (code, read-only data, data) for every kernel of a compiled
program: about 270 for one SmolLM2-135M step program (30 layers), ~100 for a toy of 30 small
layers. A compiled program lives as long as the jitted function that cached it, and the
engine's jitted functions (the step programs keyed by model configuration and shape, the
samplers) live for the process. So a server that keeps meeting new shapes (decode rows x
block-table widths, prefill rows x chunk widths x widths, once per DP group's devices) or a
process that builds many engines keeps adding mappings, and past ``vm.max_map_count`` (65,530
by default) XLA's next allocation segfaults: ~230 SmolLM2 programs, about as many as the
default buckets allow one group (decode rows x table widths and prefill rows x chunk widths x
table widths: ~200), so varied traffic can get there, and several groups sooner.

``make_room`` is called before a program of a new shape compiles (``ModelRunner``, the MA
runner, the prompt scorer) and when an ``LLM`` is built. Past half the limit it drops every
compiled program (``jax.clear_caches()``, safe while other threads run programs: an execution
holds its own reference), logged as a warning; the programs still in use compile again on
their next call, from the persistent compilation cache where it holds them. Where a clear does
not bring the count under half (mappings held by something else), it says so and clears again
only past halfway from there to the limit.
"""

from __future__ import annotations

import logging
import threading

import jax

log = logging.getLogger(__name__)

MAX_MAP_COUNT = "/proc/sys/vm/max_map_count"
SELF_MAPS = "/proc/self/maps"
HIGH_WATER = 0.5  # share of the limit past which compiled programs are dropped

_lock = threading.Lock()
_state = {"floor": 0, "clears": 0}


def map_limit() -> int | None:
    """The process's mapping limit (``vm.max_map_count``); None where it cannot be read."""
    try:
        with open(MAX_MAP_COUNT) as f:
            return int(f.read())
    except (OSError, ValueError):  # not Linux
        return None


def map_count() -> int | None:
    """The mappings this process holds now; None where it cannot be read."""
    try:
        with open(SELF_MAPS) as f:
            return sum(1 for _ in f)
    except OSError:
        return None


def clears() -> int:
    """How many times ``make_room`` dropped the compiled programs in this process."""
    return _state["clears"]


def make_room(why: str = "a new program") -> bool:
    """Drop every compiled program if the process holds more than ``HIGH_WATER`` of its
    mapping limit; True when it did."""
    limit = map_limit()
    if limit is None:
        return False
    with _lock:
        count = map_count()
        threshold = max(int(limit * HIGH_WATER), _state["floor"])
        if count is None or count <= threshold:
            return False
        jax.clear_caches()
        after = map_count() or 0
        _state["clears"] += 1
        log.warning("compiled programs hold %d of the %d memory mappings this process may have "
                    "(vm.max_map_count); dropped them all before %s (%d mappings after); those "
                    "still in use compile again", count, limit, why, after)
        if after > limit * HIGH_WATER:
            log.warning("%d mappings remain after dropping the compiled programs: something "
                        "else holds them; raise vm.max_map_count (sysctl) if the process "
                        "crashes", after)
            _state["floor"] = after + (limit - after) // 2
        else:
            _state["floor"] = 0
        return True


def room_for_more(share: float = 0.8) -> bool:
    """Whether the process's mappings are under ``share`` of the level past which
    ``make_room`` drops every program (programs compiled ahead stop there); True where the
    count cannot be read."""
    limit, count = map_limit(), map_count()
    return limit is None or count is None or count < share * limit * HIGH_WATER


class ProgramShapes:
    """The program shapes an owner (a runner, the prompt scorer) has launched since the
    compiled programs were last dropped: a shape's first launch compiles it."""

    def __init__(self) -> None:
        self._shapes: set = set()
        self._drops = _state["clears"]

    def __contains__(self, key) -> bool:
        self._forget_dropped()
        return key in self._shapes

    def __iter__(self):
        self._forget_dropped()
        return iter(set(self._shapes))

    def first_launch(self, key, what: str) -> bool:
        """Whether ``key``'s program (``what``, for the log) compiles now (never launched, or
        dropped since): then ``make_room`` for it first. Called at every launch, so it
        formats nothing unless the program compiles."""
        if key in self:
            return False
        make_room(f"compiling {what} {key}")
        self._forget_dropped()
        self._shapes.add(key)
        return True

    def _forget_dropped(self) -> None:
        if self._drops != _state["clears"]:  # every program was dropped: each compiles again
            self._shapes.clear()
            self._drops = _state["clears"]
