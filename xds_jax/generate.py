"""The single-device generation loop: the reference every serving path is checked against.

All sequences of one call run as one static batch. Each row owns a contiguous run of KV pages,
the prompt is prefilled in one step, then every row decodes one token a step until all are
finished. Shapes are bucketed (batch, prompt length, context) to bound compilations; the step
is one jitted program built from the stage functions, with the KV pages donated.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from xds_jax.model.config import ModelConfig
from xds_jax.model.packed_params import PackedParams, as_tree
from xds_jax.model.params import model_dtype
from xds_jax.model.reference import forward, last_token_outputs, new_caches
from xds_jax.sampling.rows import sample_rows
from xds_jax.sequence import Sequence

__all__ = ["LocalGenerator", "bucket", "model_step", "sample_rows"]


def bucket(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum)."""
    return 1 << max(0, math.ceil(math.log2(max(n, minimum))))


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("caches",))
def model_step(params: dict | PackedParams, tokens_BS: jax.Array, positions_BS: jax.Array,
               caches: list, block_tables_BN: jax.Array, last_B: jax.Array, *,
               cfg: ModelConfig):
    """One forward step; returns the logits ``[B, V]`` of each row's last real token, their
    greedy tokens ``[B]`` and the new caches. ``params``: the tree or, on one device, its
    packed form (``xds_jax.model.packed_params``: fewer leaves to dispatch)."""
    params = as_tree(params)
    x, caches = forward(params, cfg, tokens_BS, positions_BS, caches, block_tables_BN)
    return *last_token_outputs(params, cfg, x, last_B), caches


class LocalGenerator:
    """Runs batches of ``Sequence`` to completion on the default device."""

    def __init__(self, params: dict, cfg: ModelConfig, page_size: int = 16):
        self.params = params
        self.cfg = cfg
        self.page_size = page_size
        self.dtype = model_dtype(params)

    def run(self, seqs: list[Sequence]) -> None:
        """Generate until every sequence has finished (results are left in the sequences)."""
        if not seqs:
            return
        rows = bucket(len(seqs))
        slots: list[Sequence | None] = list(seqs) + [None] * (rows - len(seqs))
        context = bucket(max(s.num_tokens + (s.max_tokens or 0) for s in seqs), 128)
        n_pages = context // self.page_size
        caches = new_caches(self.cfg, rows * n_pages, self.page_size, self.dtype)
        tables = jnp.arange(rows * n_pages, dtype=jnp.int32).reshape(rows, n_pages)
        # Prefill every prompt in one padded step.
        width = bucket(max(len(s.prompt_ids) for s in seqs), 16)
        tokens = np.zeros((rows, width), np.int32)
        positions = np.full((rows, width), -1, np.int32)
        last = np.zeros((rows,), np.int32)
        for i, s in enumerate(seqs):
            n = len(s.prompt_ids)
            tokens[i, :n], positions[i, :n], last[i] = s.prompt_ids, np.arange(n), n - 1
        logits, greedy, caches = model_step(self.params, tokens, positions, caches, tables, last,
                                            cfg=self.cfg)
        sample_rows(logits, slots, self.cfg.vocab_size, greedy)
        zero_last = np.zeros((rows,), np.int32)
        while not all(s.finished for s in seqs):
            tokens = np.zeros((rows, 1), np.int32)
            positions = np.full((rows, 1), -1, np.int32)
            for i, s in enumerate(seqs):
                if not s.finished:
                    tokens[i, 0], positions[i, 0] = s.output_ids[-1], s.num_tokens - 1
            logits, greedy, caches = model_step(self.params, tokens, positions, caches, tables,
                                                zero_last, cfg=self.cfg)
            sample_rows(logits, slots, self.cfg.vocab_size, greedy)
