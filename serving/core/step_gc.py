"""Python's garbage collector kept out of engine steps: automatic collection is off while the
engine runs, and it collects between steps instead (a collection inside a step stalls every
sequence of the batch; xDeepServe's proactive GC)."""

from __future__ import annotations

import gc

GC_YOUNG_EVERY = 64  # steps between generation-0 collections
GC_FULL_EVERY = 2048  # steps between full collections


class StepGC:
    """Collect garbage only at step boundaries."""

    def __init__(self) -> None:
        self._steps = 0
        self._was_enabled = gc.isenabled()

    def __enter__(self) -> StepGC:
        gc.disable()
        return self

    def __exit__(self, *exc) -> None:
        if self._was_enabled:
            gc.enable()

    def after_step(self) -> None:
        self._steps += 1
        if self._steps % GC_FULL_EVERY == 0:
            gc.collect()
        elif self._steps % GC_YOUNG_EVERY == 0:
            gc.collect(0)
