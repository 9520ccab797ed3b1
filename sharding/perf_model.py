"""Decode iteration time, TPOT and tokens/s per chip of a deployment on real hardware.

A roofline per stage, priced with ``sharding.hardware`` figures, over FLOPs that XLA's cost
analysis counts for the real stage functions at the target shapes (``sharding.stage_costs``)::

  t_stage = max(gemm_flops / (matmul_peak * gemm_eff), bytes / (hbm * mem_eff))
  t_attn  = t_stage(projections, gate[, shared experts]) + attention_overhead
            + max(core_flops / (bf16_peak * attn_eff), kv_bytes / (hbm * attn_mem_eff))
  t_hop   = hop_overhead + link_latency + bytes of the busiest die / link_bandwidth

Layouts (``q = 1 + mtp_tokens`` tokens per sequence verified per step, ``b`` sequences per
attention die, ``M`` micro-batches, ``D`` domains):

- colocated / PD decode (role ``decode``): every die runs attention for ``b`` sequences and
  its share of the experts (expert parallelism over the role), with global syncs::

    layer = t_attn + s_d * dispatch + t_moe + s_c * combine

  where ``s_d = 1.26`` and ``s_c = 1.89`` are the avg/min latencies measured in a DP288/EP288
  iteration [X §7.1, Fig. 20]: waiting for the slowest DP rank and the busiest expert.
- MA (``decode_attention`` + ``decode_experts``): a domain's micro-batches take turns on its
  attention dies while the expert pool's three persistent streams (A2E, MoE, E2A) serve all
  domains::

    layer = max(M * t_attn, t_attn + t_a2e + t_moe + t_e2a, D * M * max(t_a2e, t_moe, t_e2a))

  and the last layer's last micro-batch is not overlapped (``tail = t_a2e + t_moe + t_e2a``).

For both: ``iteration = scheduler + MTP layer (one MoE layer at q = 1, eh_proj, head) +
moe_layers * layer + dense_layers * dense + tail + head``, ``TPOT = iteration / (1 +
acceptance * mtp_tokens)``, tokens/s per chip = attention dies * b / TPOT / chips of the
decode roles. ``scheduler = 2 ms`` is the paper's CPU gap [X §7.1]. Dense layers run their
MLP on the attention dies. PD decode is the colocated model on the decode role alone, so it
does not depend on the prefill pool; the prefill estimate is one prompt per group (TP) plus
its KV transfer. Not modelled: prefill interference in colocated decode, expert imbalance
beyond the measured sync factors, memory capacity (``xds plan`` checks that).
"""

from __future__ import annotations

import dataclasses
import math

from sharding.deployment import DeploymentSpec, RoleSpec
from sharding.hardware import Hardware
from sharding.stage_costs import (
    StageCost,
    attention_cost,
    dense_ffn_cost,
    experts_cost,
    gate_cost,
    head_cost,
    mtp_proj_cost,
    shared_cost,
)
from xds_jax.model.config import ModelConfig

SCHEDULER_S = 2e-3  # CPU scheduling per iteration [X §7.1]
DISPATCH_SYNC, COMBINE_SYNC = 1.26, 1.89  # avg/min in a colocated iteration [X §7.1]
CONTEXT = 3072  # 2K prompt + half of 2K output, "~3K sequence" [X §7.1]
MA_BATCH, DECODE_BATCH = 96, 60  # per-die batch of the paper's MA and colocated runs


@dataclasses.dataclass(frozen=True)
class Estimate:
    """One role's (or layout's) estimate; times in seconds, ``stages`` per call."""

    layout: str  # "ma", "colocated", "pd-decode", "pd-prefill"
    roles: str
    dies: int
    chips: float
    hardware: str
    batch_per_die: int
    stages: dict
    iteration_s: float
    tpot_s: float
    tokens_per_s_per_chip: float


def _time(hw: Hardware, c: StageCost) -> float:
    """Roofline of one stage call."""
    gemm = c.gemm_flops / (hw.matmul_flops * hw.gemm_eff)
    bytes_ = c.weight_elems * hw.weight_itemsize + c.act_elems * 2
    core_bytes = c.kv_latent_elems * hw.kv_itemsize + c.kv_rope_elems * 2
    t = max(gemm, bytes_ / (hw.hbm_bandwidth * hw.attention_memory_eff))
    if c.core_flops or core_bytes:
        t += max(c.core_flops / (hw.attention_flops * hw.attention_compute_eff),
                 core_bytes / (hw.hbm_bandwidth * hw.attention_memory_eff))
    return t


def _hop(hw: Hardware, span: int, tokens: float, itemsize: float, d: int) -> float:
    """One all-to-all hop moving ``tokens`` hidden states through the busiest die."""
    per_token = d * itemsize + (4 if itemsize == 1 else 0)
    return hw.hop_overhead_s + hw.link_latency_s + tokens * per_token / hw.bandwidth(span)


def _attention(hw, cfg, b, q, ctx, shared_here: bool) -> float:
    t = _time(hw, attention_cost(cfg, b, q, ctx)) + hw.attention_overhead_s
    if cfg.moe is not None:
        t += _time(hw, gate_cost(cfg, b * q))
        if shared_here:
            t += _time(hw, shared_cost(cfg, b * q))
    return t


def _moe_die(hw, cfg, slots: int, tokens: float) -> float:
    per_slot = max(1, math.ceil(tokens / slots))
    return _time(hw, experts_cost(cfg, slots, per_slot))


def _counts(cfg: ModelConfig) -> tuple[int, int]:
    moe = len(cfg.moe.moe_layers) if cfg.moe else 0
    return moe, cfg.num_layers - moe


def _finish(layout, roles, hw, cfg, dies, seqs, b, parts, layer, dense, tail, mtp, head,
            acceptance, mtp_tokens) -> Estimate:
    """Iteration, TPOT and tokens/s per chip for ``seqs`` sequences decoded on ``dies``."""
    n_moe, n_dense = _counts(cfg)
    iteration = SCHEDULER_S + mtp + n_moe * layer + n_dense * dense + tail + head
    tpot = iteration / (1 + acceptance * mtp_tokens)
    chips = dies / hw.dies_per_chip
    stages = parts | {"moe_layer": layer, "dense_layer": dense, "tail": tail, "mtp": mtp,
                      "head": head, "scheduler": SCHEDULER_S}
    return Estimate(layout, roles, dies, chips, hw.name, b, stages, iteration, tpot,
                    seqs / tpot / chips)


def ma_decode(cfg: ModelConfig, attn: RoleSpec, experts: RoleSpec, hw: Hardware, *,
              batch_per_die: int = MA_BATCH, context: int = CONTEXT, micro_batches: int = 2,
              mtp_acceptance: float = 0.9, mtp_tokens: int = 1) -> Estimate:
    """MA decode on ``decode_attention`` + ``decode_experts`` (module docstring)."""
    d, k, shared = cfg.hidden_size, cfg.moe.num_experts_per_tok, cfg.moe.num_shared_experts
    b = max(1, batch_per_die // micro_batches)
    span = attn.dp + experts.devices.count
    hops = 2 if attn.dp < experts.devices.count else 1  # trampolines [X §3.3]
    fan = k + (shared if experts.shared_devices else 0)
    slots = experts.resolved_slots_per_device(cfg.moe.num_experts)

    def layer_parts(q: int) -> tuple[float, ...]:
        t = b * q
        attn_t = _attention(hw, cfg, b, q, context, not experts.shared_devices)
        moe_t = _moe_die(hw, cfg, slots, attn.dp * t * k / experts.routed_devices)
        if experts.shared_devices:
            moe_t = max(moe_t, _time(hw, shared_cost(cfg, math.ceil(
                attn.dp * t / experts.shared_devices))))
        a2e = _hop(hw, span, t * fan, hw.dispatch_itemsize, d)
        e2a = _hop(hw, span, t * fan, hw.combine_itemsize, d)
        if hops == 2:  # one copy per token to the trampoline, which fans out (and back)
            a2e += _hop(hw, span, t, hw.dispatch_itemsize, d)
            e2a += _hop(hw, span, t, hw.combine_itemsize, d)
        chain = a2e + moe_t + e2a
        layer = max(micro_batches * attn_t, attn_t + chain,
                    attn.domains * micro_batches * max(a2e, moe_t, e2a))
        return attn_t, a2e, moe_t, e2a, chain, layer

    q = 1 + mtp_tokens
    attn_t, a2e, moe_t, e2a, tail, layer = layer_parts(q)
    dense = micro_batches * (_attention(hw, cfg, b, q, context, False)
                             + _time(hw, dense_ffn_cost(cfg, b * q)))
    m = layer_parts(1)
    mtp = (m[5] + m[4] + _time(hw, mtp_proj_cost(cfg, b * micro_batches))
           + _time(hw, head_cost(cfg, b * micro_batches)))
    parts = {"attention": attn_t, "a2e": a2e, "moe": moe_t, "e2a": e2a}
    head = micro_batches * _time(hw, head_cost(cfg, b * q))  # per micro-batch, q tokens each
    return _finish("ma", "decode_attention+decode_experts", hw, cfg,
                   attn.devices.count + experts.devices.count,
                   attn.devices.count * b * micro_batches, b * micro_batches, parts, layer,
                   dense, tail, mtp, head, mtp_acceptance, mtp_tokens)


def colocated_decode(cfg: ModelConfig, role: RoleSpec, hw: Hardware, *,
                     batch_per_die: int = DECODE_BATCH, context: int = CONTEXT,
                     mtp_acceptance: float = 0.9, mtp_tokens: int = 1,
                     layout: str = "colocated") -> Estimate:
    """DP attention + EP experts over every die of the ``decode`` role (module docstring).

    Each die holds ``ceil(E / dies) + 1`` experts (its routed share plus a shared or
    redundant one, as DP288/EP288 [X §4.5]) and serves ``(K + shared) / dies`` of the tokens.
    """
    n, d, b = role.devices.count, cfg.hidden_size, batch_per_die
    moe = cfg.moe

    def layer_parts(q: int) -> tuple[float, ...]:
        """(attention, dispatch, experts, combine, layer) for ``q`` tokens per sequence."""
        t = b * q
        attn_t = _attention(hw, cfg, b, q, context, shared_here=n == 1)
        if moe is None:
            return attn_t, 0.0, 0.0, 0.0, attn_t + _time(hw, dense_ffn_cost(cfg, t))
        if n == 1:  # every expert on the one die, no collective
            moe_t = _moe_die(hw, cfg, moe.num_experts, t * moe.num_experts_per_tok)
            return attn_t, 0.0, moe_t, 0.0, attn_t + moe_t
        fan = moe.num_experts_per_tok + moe.num_shared_experts
        moe_t = _moe_die(hw, cfg, math.ceil(moe.num_experts / n) + 1, t * fan)
        disp = _hop(hw, n, t * fan, hw.dispatch_itemsize, d)
        comb = _hop(hw, n, t * fan, hw.combine_itemsize, d)
        layer = attn_t + DISPATCH_SYNC * disp + moe_t + COMBINE_SYNC * comb
        return attn_t, disp, moe_t, comb, layer

    q = 1 + mtp_tokens
    attn_t, disp, moe_t, comb, layer = layer_parts(q)
    dense = _attention(hw, cfg, b, q, context, False) + _time(hw, dense_ffn_cost(cfg, b * q))
    mtp = (layer_parts(1)[4] + _time(hw, mtp_proj_cost(cfg, b))
           + _time(hw, head_cost(cfg, b)))
    parts = {"attention": attn_t, "dispatch": disp, "moe": moe_t, "combine": comb}
    head = _time(hw, head_cost(cfg, b * q))
    return _finish(layout, "decode", hw, cfg, n, n * b, b, parts, layer, dense, 0.0, mtp, head,
                   mtp_acceptance, mtp_tokens)


def prefill(cfg: ModelConfig, role: RoleSpec, hw: Hardware, *, prompt: int = 2048) -> Estimate:
    """One ``prompt``-token prefill on a group of ``tp`` dies, plus its KV transfer.

    Heads and MLP/expert widths split over TP (one all-reduce after attention and one after
    the FFN per layer); every expert a prompt routes to is read. ``tpot_s`` holds the time
    to first token (prefill + KV transfer), ``tokens_per_s_per_chip`` prompt tokens.
    """
    tp, d = role.tp, cfg.hidden_size
    attn = _time(hw, attention_cost(cfg, 1, prompt, prompt)) + hw.attention_overhead_s
    if cfg.moe is not None:
        moe = cfg.moe
        used = min(moe.num_experts, prompt * moe.num_experts_per_tok)
        ffn = (_moe_die(hw, cfg, used, prompt * moe.num_experts_per_tok)
               + _time(hw, shared_cost(cfg, prompt)) + _time(hw, gate_cost(cfg, prompt)))
    else:
        ffn = _time(hw, dense_ffn_cost(cfg, prompt))
    reduce = 0.0 if tp == 1 else 2 * _hop(hw, tp, prompt * 2 * (tp - 1) / tp, 2, d)
    n_moe, n_dense = _counts(cfg)
    dense = _time(hw, dense_ffn_cost(cfg, prompt))
    layer_t = (attn + ffn) / tp + reduce
    total = (n_moe * layer_t + n_dense * ((attn + dense) / tp + reduce)
             + _time(hw, head_cost(cfg, 1)))
    heads, dims = cfg.kv_cache_dims()
    kv = prompt * cfg.num_layers * heads * dims * hw.kv_itemsize
    transfer = hw.hop_overhead_s + kv / hw.scale_out_bandwidth
    chips = role.devices.count / hw.dies_per_chip
    stages = {"layer": layer_t, "all_reduce": reduce, "kv_transfer": transfer}
    return Estimate("pd-prefill", "prefill", role.devices.count, chips, hw.name, 1, stages,
                    total, total + transfer, role.dp * prompt / total / chips)


def estimate(cfg: ModelConfig, spec: DeploymentSpec, hw: Hardware, *,
             batch_per_die: int | None = None, context: int = CONTEXT,
             mtp_acceptance: float = 0.9, mtp_tokens: int = 1,
             prompt: int = 2048) -> tuple[Estimate, ...]:
    """Every layout ``spec`` holds: MA decode, colocated or PD decode, PD prefill."""
    roles, out = spec.roles, []
    kw = {"context": context, "mtp_acceptance": mtp_acceptance, "mtp_tokens": mtp_tokens}
    if "prefill" in roles:
        out.append(prefill(cfg, roles["prefill"], hw, prompt=prompt))
    if "decode_attention" in roles:
        out.append(ma_decode(cfg, roles["decode_attention"], roles["decode_experts"], hw,
                             batch_per_die=batch_per_die or MA_BATCH, **kw))
    if "decode" in roles:
        layout = "pd-decode" if "prefill" in roles else "colocated"
        out.append(colocated_decode(cfg, roles["decode"], hw, layout=layout,
                                    batch_per_die=batch_per_die or DECODE_BATCH, **kw))
    return tuple(out)


def format_estimates(estimates: tuple[Estimate, ...], model: str, deployment: str) -> str:
    """One table of stage times (ms) per layout, then iteration, TPOT and tokens/s/chip."""
    lines = []
    for e in estimates:
        lines.append(f"{deployment} / {model} on {e.hardware}: {e.layout} ({e.roles}, "
                     f"{e.dies} dies = {e.chips:g} chips, batch {e.batch_per_die}/die)")
        lines += [f"  {k:<12} {v * 1e3:9.3f} ms" for k, v in e.stages.items()]
        if e.layout == "pd-prefill":
            lines.append(f"  prefill {e.iteration_s * 1e3:.1f} ms, TTFT {e.tpot_s * 1e3:.1f} ms,"
                         f" {e.tokens_per_s_per_chip:,.0f} prompt tokens/s/chip")
        else:
            lines.append(f"  iteration {e.iteration_s * 1e3:.1f} ms, TPOT {e.tpot_s * 1e3:.1f} "
                         f"ms, {e.tokens_per_s_per_chip:,.0f} tokens/s/chip")
    return "\n".join(lines)
