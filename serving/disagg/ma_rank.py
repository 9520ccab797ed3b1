"""An MA attention rank as its DP group sees it: a ``Runner`` over its share of a domain.

The group schedules and keeps its KV block bookkeeping; its steps run inside its domain's
SPMD programs (``MAPool.step``), so ``launch`` / ``finish`` refuse with a message that says
so. KV moves in and out of the rank's own shard of the domain's page arrays
(``export_kv`` / ``import_kv``, e.g. a PD arrival from a prefill group; when the pool drafts,
the MTP block's pages are the last layer, as a ``SpecRunner``'s are).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from serving.core.interfaces import EngineMisuseError
from serving.core.spec_state import SpecState
from serving.disagg.ma_runner import Domain


class RankStepError(EngineMisuseError):
    """An MA rank was asked to run its own step."""


class RankView:
    """Rank ``rank`` of ``domain``: its pages, device and compile count (the domain's
    programs are counted on its rank 0 only, so a sum over groups counts each once)."""

    donate_pages = False  # its pages are shards of the domain's arrays: writers must copy

    def __init__(self, domain: Domain, rank: int, spec: SpecState | None = None):
        self.domain = domain
        self.rank = rank
        self.device = domain.devices[rank]
        self.spec = spec  # speculative decoding: pending hiddens and counters (ma_spec)

    @property
    def compile_count(self) -> int:
        return self.domain.compile_count if self.rank == 0 else 0

    def launch(self, scheduled: list):
        raise RankStepError(
            f"MA attention rank {self.rank} of domain {self.domain.index}: its steps run in "
            "the domain's SPMD programs (MAPool.step, the engine's MA driver), not by "
            "DPGroup.step")

    def finish(self, handle) -> None:
        self.launch([])

    def spec_stats(self) -> dict:
        return self.spec.stats() if self.spec is not None else {}

    @property
    def pending(self) -> dict:
        """Sequence id -> ``Pending`` hidden (a PD arrival's is put here); only when the
        rank drafts."""
        if self.spec is None:
            raise AttributeError("this MA rank does not draft: it has no pending hiddens")
        return self.spec.pending

    # -- KV in and out ------------------------------------------------------------------------
    @property
    def kv_sharding(self) -> jax.Device:
        """Where pages given to ``import_kv`` must lie: this rank's device."""
        return self.device

    @property
    def pages(self) -> list[dict]:
        """The rank's per-layer pages ``[P, page, ...]`` (shards of the domain's arrays,
        valid until the domain's next step donates them)."""
        return self.domain.rank_pages(self.rank)

    @pages.setter
    def pages(self, pages: list[dict]) -> None:
        self.domain.set_rank_pages(self.rank, pages)

    def export_kv(self, block_ids: Sequence[int]) -> list[dict]:
        """Pages of ``block_ids``, per layer and kind ``[len(block_ids), page, ...]``."""
        ids = jax.device_put(np.asarray(block_ids, np.int32), self.device)
        return [{k: jnp.take(v, ids, axis=0) for k, v in layer.items()} for layer in self.pages]

    def import_kv(self, block_ids: Sequence[int], pages: list[dict]) -> None:
        """Write ``pages`` (as ``export_kv`` returns them) into ``block_ids`` of this rank
        (nothing to write on a process that does not hold the rank's device)."""
        if self.device.process_index != jax.process_index():
            return
        ids = jax.device_put(np.asarray(block_ids, np.int32), self.device)
        self.pages = [{k: v.at[ids].set(jax.device_put(new[k], self.device))
                       for k, v in layer.items()}
                      for layer, new in zip(self.pages, pages, strict=True)]
