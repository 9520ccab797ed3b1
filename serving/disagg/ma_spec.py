"""MTP speculative decoding under MA decode: drafts on the attention ranks, one verify pass.

A speculative decode pass of every domain is ``k + 1`` passes of the ``LayerPipeline``, all
dispatched without a host wait:

1. the MTP block (pipeline "layer" ``cfg.num_layers``) over each row's pending (target
   hidden, next token) pairs, ``W`` wide; its output at the last pair drafts ``d_1``;
2. ``k - 1`` one-token MTP passes, each from the block's own hidden and the previous draft
   (drafts stay on device: the next pass's tokens and the verify tokens are built there);
3. the target over ``[t[n - 1], d_1 .. d_k]`` at positions ``n - 1 .. n - 1 + k``: one
   pipeline pass of ``k + 1`` tokens per row, so the expert slice sees ``k + 1`` tokens per
   sequence (``CapacityPolicy`` keys capacity by rows x tokens, so this shape gets its own).

The MTP block's attention and its KV pages (one more page array per domain, indexed by the
target's block tables) live on the attention ranks. Its routed experts go through the expert
slice like the target's MoE layers (placed there as one more layer): attention ranks hold no
routed experts in MA, and DeepSeek-V3's MTP layer has as many as a target layer (~11 B
parameters), more than an attention die should hold for a few tokens a step. Its shared
expert (and a dense block's FFN) runs on the attention ranks, as a MoE model's dense layers
do. Every MTP pass and the verify pass count in the EPLB load (the MTP block's experts are
layer ``num_layers`` of the counter and of the rebalancer).

Prefill passes on the attention ranks run the MTP block over their (hidden, next prompt token)
pairs afterwards, so its KV covers the prompt; PD arrivals bring those pages with the target's
(``RankView.import_kv``). On the host, each rank's ``SpecState`` holds pending hiddens and
counters; ``emit_decode`` verifies a micro-batch's rows (greedy prefix, or rejection sampling)
and appends them (stop strings, ``max_tokens``, logprobs as usual).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from serving.core.spec_decode import drafts_this_step
from serving.core.spec_state import DraftRows, SpecState, emit_decode, prefill_pairs
from serving.disagg.ma_pipeline import LayerPipeline, PassResult
from serving.disagg.ma_runner import Domain, MicroBatch, from_host
from xds_jax.generate import bucket
from xds_jax.multihost import fetch


@dataclasses.dataclass
class _Verify:
    """One decode micro-batch after dispatch: its draft rows and device outputs."""

    domain: Domain
    mb: MicroBatch  # the verify micro-batch (k + 1 tokens per row)
    rows: DraftRows
    drafts: list  # k device arrays [A * B]
    logits: object = None  # [A * B, k + 1, V]
    hidden: object = None  # [A * B, k + 1, D]


@dataclasses.dataclass
class SpecPass(PassResult):
    """A pass of a drafting pool: a decode pass's verified micro-batches, or a prefill
    pass's last hiddens (its logits as usual)."""

    verify: list[_Verify] = dataclasses.field(default_factory=list)
    last_hidden: list = dataclasses.field(default_factory=list)  # (domain, mb, x [A*B, D])


class MADrafter:
    """Runs the speculative passes of an MA pool whose ranks draft ``k`` tokens.

    ``states[g]`` is the ``SpecState`` of the pool's group ``g`` (domain ``d``'s rank ``r``
    is group ``domain.first_rank + r``)."""

    def __init__(self, k: int, states: list[SpecState], num_layers: int,
                 disable_by_batch_size: int | None = None):
        self.k = k
        self.states = states
        self.mtp_layer = num_layers
        self.disable_by_batch_size = disable_by_batch_size

    def step_k(self, domains: list[Domain], per_domain: list[list[MicroBatch]]) -> int:
        """Drafts per row this pass: ``k``, or 0 when a rank decodes more rows than
        ``disable_by_batch_size`` (a rank is an MA pool's counterpart of a colocated DP group,
        which decides by its own step's rows; one pass of every rank has one shape)."""
        rows: dict[int, int] = {}  # rank's state -> its live rows over the micro-batches
        for dom, mbs in zip(domains, per_domain, strict=True):
            for mb in mbs:
                for st, part, _ in self._rank_parts(dom, mb):
                    rows[id(st)] = rows.get(id(st), 0) + len(part)
        return drafts_this_step(self.k, max(rows.values(), default=0),
                                self.disable_by_batch_size)

    def _rank_states(self, domain: Domain) -> list[SpecState]:
        return self.states[domain.first_rank:domain.first_rank + domain.num_ranks]

    def decode(self, pipeline: LayerPipeline, per_domain: list[list[MicroBatch]]) -> SpecPass:
        """Draft and verify every decode micro-batch (width-1 batches of the last tokens)."""
        result = SpecPass()
        domains = self._domains(pipeline)
        k = self.step_k(domains, per_domain)
        rows = [[self._draft_rows(dom, mb) for mb in mbs]
                for dom, mbs in zip(domains, per_domain, strict=True)]
        if k == 0:  # the MTP block still runs its first pass: its KV covers every position
            for r in (r for rs in rows for r in rs):
                r.num_drafts_B[:] = 0
        batches, inputs = [], []
        for dom, mbs, rs in zip(domains, per_domain, rows, strict=True):
            batches.append([self._first_batch(dom, mb, r) for mb, r in zip(mbs, rs, strict=True)])
            inputs.append([dom.mtp_input(b.tokens_BS, from_host(r.hidden_BWD.astype(dom.dtype),
                                                                dom.rank_sharding))
                           for b, r in zip(batches[-1], rs, strict=True)])
        drafts = [[[] for _ in mbs] for mbs in per_domain]
        for j in range(max(k, 1)):
            out = pipeline.run(batches, inputs, layers=[self.mtp_layer], head=False)
            result.checks.extend(out.checks)
            hidden = iter(out.hidden)  # domain-major, as batches
            batches, inputs = [], []
            for d, (dom, mbs) in enumerate(zip(domains, per_domain, strict=True)):
                batches.append([])
                inputs.append([])
                for i, mb in enumerate(mbs):
                    b, x = next(hidden)
                    if k == 0:
                        continue
                    g_BD, draft_B = dom.mtp_draft(x, b.last_B)
                    drafts[d][i].append(draft_B)
                    if j + 1 < k:
                        batches[-1].append(self._next_batch(dom, mb, rows[d][i], j + 1))
                        inputs[-1].append(dom.mtp_next(draft_B, g_BD))
        checked = self._verify(pipeline, per_domain, rows, drafts, result, k)
        result.checks.extend(checked.checks)
        result.load = checked.load
        return result

    def _domains(self, pipeline: LayerPipeline) -> list[Domain]:
        return [p.domain for p in pipeline.parts]

    def _draft_rows(self, dom: Domain, mb: MicroBatch) -> DraftRows:
        """Each rank's rows of ``mb`` drafted from its own ``SpecState``, rank-major."""
        ranks = list(self._rank_parts(dom, mb))
        width = bucket(max(st.width(part) for st, part, _ in ranks))
        return DraftRows.concat([st.draft_rows(part, mb.rows, width) for st, part, _ in ranks])

    @staticmethod
    def _first_batch(dom: Domain, mb: MicroBatch, rows: DraftRows) -> MicroBatch:
        """The first MTP pass: each row's pending pairs."""
        return dom.place(mb.index, mb.rows, rows.tokens_BW.shape[1],
                         {"tokens_BS": rows.tokens_BW, "positions_BS": rows.positions_BW,
                          "tables_BN": mb.tables_BN, "last_B": rows.last_B},
                         mb.seqs, mb.items, "mtp")

    def _next_batch(self, dom: Domain, mb: MicroBatch, rows: DraftRows, j: int) -> MicroBatch:
        """Draft ``j + 1``'s one-token batch: position ``p + j`` past the last pending pair
        (-1 once a row has drafted all it may: no KV written)."""
        last = rows.last_position_B
        pos = np.where((j < rows.num_drafts_B) & (last >= 0), last + j, -1).astype(np.int32)
        zeros = np.zeros((len(pos),), np.int32)
        return dom.place(mb.index, mb.rows, 1, {"tokens_BS": zeros[:, None],
                                                "positions_BS": pos[:, None],
                                                "tables_BN": mb.tables_BN, "last_B": zeros},
                         mb.seqs, mb.items, "mtp")

    def _verify(self, pipeline, per_domain, rows, drafts, result: SpecPass,
                k: int) -> PassResult:
        """The target over each row's last token and ``k`` drafts, one pipeline pass."""
        batches = []
        for dom, mbs, rs, ds in zip(self._domains(pipeline), per_domain, rows, drafts,
                                    strict=True):
            batches.append([])
            for mb, r, dr in zip(mbs, rs, ds, strict=True):
                last_pos = np.array([s.start if s is not None else -1 for s in mb.items],
                                    np.int32)
                j = np.arange(k + 1)[None, :]
                live = (j <= r.num_drafts_B[:, None]) & (last_pos[:, None] >= 0)
                positions = np.where(live, last_pos[:, None] + j, -1).astype(np.int32)
                tokens = dom.verify_tokens(mb.tokens_BS, dr) if k else mb.tokens_BS
                vb = dom.place(mb.index, mb.rows, k + 1,
                               {"tokens_BS": tokens, "positions_BS": positions,
                                "tables_BN": mb.tables_BN, "last_B": mb.last_B},
                               mb.seqs, mb.items, "verify")
                batches[-1].append(vb)
                result.verify.append(_Verify(dom, vb, r, dr))
        out = pipeline.run(batches, head=False)
        for v, (_, x) in zip(result.verify, out.hidden, strict=True):
            v.hidden = x
            v.logits = v.domain.head_all(x)
        return out

    def finish_decode(self, result: SpecPass, vocab_size: int) -> None:
        """Verify and append every decode row; each rank's state keeps its accepted hiddens
        and counts its drafts."""
        for v in result.verify:
            drafts_BK, logits, hidden = fetch((v.drafts, v.logits, v.hidden))
            drafts_BK = (np.stack(drafts_BK, axis=1) if drafts_BK
                         else np.zeros((len(v.mb.items), 0), np.int32))
            seqs = [s.seq if s is not None else None for s in v.mb.items]
            accepted = emit_decode(seqs, v.rows.num_drafts_B, drafts_BK, logits, vocab_size)
            for st, part, sl in self._rank_parts(v.domain, v.mb):
                st.keep_decode(part, v.rows.num_drafts_B[sl], accepted[sl], hidden[sl])

    def prefill(self, pipeline: LayerPipeline, result: PassResult) -> SpecPass:
        """The MTP block over a prefill pass's chunks (its hiddens, the next prompt tokens):
        its KV then covers the prompts; the last positions' hiddens are kept for drafting."""
        out = SpecPass(result.logits, result.hidden, result.checks, result.load)
        by_domain = {dom.index: [] for dom in self._domains(pipeline)}
        for mb, x in result.hidden:
            by_domain[mb.domain].append((mb, x))
        batches, inputs = [], []
        for dom in self._domains(pipeline):
            batches.append([])
            inputs.append([])
            for mb, x in by_domain[dom.index]:
                nxt, pos = prefill_pairs(mb.items, (len(mb.items), mb.width))
                nxt = from_host(nxt, dom.rank_sharding)
                batches[-1].append(dom.place(mb.index, mb.rows, mb.width,
                                             {"tokens_BS": nxt, "positions_BS": pos,
                                              "tables_BN": mb.tables_BN, "last_B": mb.last_B},
                                             mb.seqs, mb.items, "mtp"))
                inputs[-1].append(dom.mtp_input(nxt, x))
                out.last_hidden.append((dom, mb, dom.take_last(x, mb.last_B)))
        out.checks = [*result.checks, *pipeline.run(batches, inputs, layers=[self.mtp_layer],
                                                    head=False).checks]
        return out

    def finish_prefill(self, result: SpecPass) -> None:
        """After sampling: the last prompt positions' hiddens wait for their tokens."""
        for dom, mb, x in result.last_hidden:
            hidden = fetch(x)
            for st, part, sl in self._rank_parts(dom, mb):
                st.keep_prefill(part, hidden[sl])

    def _rank_parts(self, dom: Domain, mb: MicroBatch):
        """Per rank of ``dom``: its state, its rows of ``mb`` and their slice of the
        rank-major rows."""
        for r, st in enumerate(self._rank_states(dom)):
            part = [s for s in mb.items[r * mb.rows:(r + 1) * mb.rows] if s is not None]
            yield st, part, slice(r * mb.rows, r * mb.rows + len(part))

    def prune(self) -> None:
        for st in self.states:
            st.prune()
