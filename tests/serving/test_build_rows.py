"""``build_rows`` (and the token reads it and the block manager use): scheduled sequences
padded into a step's host arrays, checked against a hand-worked batch (a prefill chunk, a
decode row, a decode row whose input is on device)."""

from __future__ import annotations

import types

import numpy as np

from serving.core.scheduled import ScheduledSeq
from serving.core.step_rows import build_rows
from xds_jax.sampling.params import SamplingParams
from xds_jax.sequence import Sequence


def _seq(prompt, outputs=()):
    seq = Sequence(list(prompt), SamplingParams(max_tokens=50))
    seq.output_ids.extend(outputs)
    return seq


def test_ids_between_reads_across_prompt_and_output():
    seq = _seq([1, 2, 3], [4, 5])
    for start in range(6):
        for stop in range(start, 6):
            assert seq.ids_between(start, stop) == seq.all_ids[start:stop]


def test_a_token_view_slices_as_its_tokens_and_placeholders_would():
    seq = _seq([1, 2, 3], [4, 5])
    for pad in (0, 2):
        whole = seq.all_ids + [-1] * pad
        view = seq.token_view(pad)
        assert len(view) == len(whole)
        for start in range(-2, len(whole) + 1):
            for stop in (None, *range(start, len(whole) + 2)):
                assert view[start:stop] == whole[start:stop], (pad, start, stop)


def test_rows_of_a_prefill_chunk_and_decodes():
    a = _seq(range(10, 30))  # a chunk of 5 prompt tokens from 8, not its last
    b = _seq([7, 8, 9], [40, 41])  # decodes its last output
    c = _seq([5, 6], [50])  # decodes; its input token is in flight (index 3 on device)
    scheduled = [ScheduledSeq(a, 8, 5, [3, 4, 5, 6], False),
                 ScheduledSeq(b, 4, 1, [9, 2], True),
                 ScheduledSeq(c, 2, 1, [7], True)]
    rows = build_rows(scheduled, rows_min=4, width_min=4, block_size=4,
                      sources={c.seq_id: 3})
    assert rows.tokens_BS.tolist() == [[18, 19, 20, 21, 22, 0, 0, 0], [41, 0, 0, 0, 0, 0, 0, 0],
                                       [0] * 8, [0] * 8]
    assert rows.positions_BS.tolist() == [[8, 9, 10, 11, 12, -1, -1, -1],
                                          [4] + [-1] * 7, [2] + [-1] * 7, [-1] * 8]
    assert rows.tables_BN.shape == (4, 32)  # 128 context tokens in blocks of 4
    assert rows.tables_BN[:, :4].tolist() == [[3, 4, 5, 6], [9, 2, 0, 0], [7, 0, 0, 0],
                                              [0, 0, 0, 0]]
    assert not rows.tables_BN[:, 4:].any()
    assert rows.last_B.tolist() == [4, 0, 0, 0]
    assert rows.sampling_seqs == [None, b, c, None]
    assert rows.source_B.tolist() == [-1, -1, 3, -1]
    assert all(a.dtype == np.int32 for a in (rows.tokens_BS, rows.positions_BS,
                                              rows.tables_BN, rows.last_B, rows.source_B))


def test_blocks_is_the_tables_least_width():
    seq = types.SimpleNamespace(seq_id=1, ids_between=lambda a, b: list(range(a, b)))
    item = types.SimpleNamespace(seq=seq, start=0, num_tokens=5, block_table=[7, 8],
                                 is_last_chunk=True)
    assert build_rows([item], 1, 4, 4, blocks=64).tables_BN.shape == (1, 64)
    assert build_rows([item], 1, 4, 4).tables_BN.shape == (1, 32)  # 128 tokens' bucket
    longer = types.SimpleNamespace(**{**vars(item), "block_table": list(range(40))})
    assert build_rows([longer], 1, 4, 4, blocks=16).tables_BN.shape == (1, 64)
