"""A decode step's input tokens on device (asynchronous scheduling, chained steps).

Under asynchronous scheduling (``serving.core.overlap``) step n + 1 is launched before step n's
tokens reach the host: a decode row whose input is the token step n samples takes it from that
step's device array by index (``take_inputs``), one small program per (launch size, rows)
pair, so few enough to compile ahead (``ModelRunner.precompile``). A chained step
(``num_scheduler_steps``) takes the step before's tokens whole (``as_decode_inputs``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.jit
def as_decode_inputs(tokens_B: jax.Array) -> jax.Array:
    """A chained decode step's ``[B, 1]`` inputs: the previous step's sampled tokens."""
    return tokens_B[:, None]


@jax.jit
def take_inputs(sampled_P: jax.Array, source_B: jax.Array, tokens_BS: jax.Array) -> jax.Array:
    """Decode inputs on device: row ``i`` takes the ``source_B[i]``-th token of one launch's
    ``sampled_P`` tokens, or keeps its input where -1. One program per (P, B) pair, whatever
    else the previous step launched, so they are few enough to compile ahead."""
    taken = sampled_P[jnp.maximum(source_B, 0)]
    return jnp.where(source_B[:, None] >= 0, taken[:, None], tokens_BS)


def inputs_key(tokens_P, tokens_BS) -> tuple:
    """The ``_shapes_seen`` key of the ``take_inputs`` program for these shapes (and tokens
    on the host or the device: two programs)."""
    return ("inputs", tokens_P.shape, tokens_BS.shape, isinstance(tokens_BS, jax.Array))


def in_flight(handle: list | None) -> tuple[tuple, dict[int, int]]:
    """The sampled token arrays of a launched step and, per sequence, the index of its token
    in their concatenation."""
    if not handle:
        return (), {}
    arrays, sources, offset = [], {}, 0
    for _, sampled in handle:
        if sampled is None:
            continue
        arrays.append(sampled.tokens_B)
        for row, seq in enumerate(sampled.seqs):
            if seq is not None:
                sources[seq.seq_id] = offset + row
        offset += len(sampled.seqs)
    return tuple(arrays), sources
