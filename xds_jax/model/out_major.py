"""Output-major projection weights: the layout XLA:CPU's dot kernels stream fastest.

On XLA:CPU (YNNPACK dots) ``x [M, K]`` contracted with a weight stored ``[N, K]`` (each
output's inputs contiguous, the layout of a PyTorch ``Linear``) runs faster than with the
same weight stored ``[K, N]``: over SmolLM2-135M's matmuls, 1.1-1.4x from 4 rows up (bfloat16
and int8 from 2 rows), about even at 1-2 float32 rows; the decode step 1.0-1.18x and the
prefill step 1.01-1.03x (``docs/performance.md``, ``benchmarks/bench_matmul.py``). TPU and GPU
keep ``[in, out]``.

So on CPU the loader stores the decoder layers' projections (attention ``q``/``k``/``v``/
``kv``/``o`` and the dense MLP's and shared expert's ``gate``/``up``/``gate_up``/``down``)
transposed, ``[out, in]``, under ``<name>_t``; ``layers.project`` contracts either form as
stored. An int8 weight's scales ``[out]`` follow it as ``<name>_t_scale`` (one scale per
output channel either way; ``quant.contract_axis`` gives either form's input axis). MTP blocks
store their layer alike, and their ``eh_proj`` as ``eh_proj_t``. MLA, routed experts, the
embedding (already ``[V, D]``) and an untied LM head keep their layout.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xds_jax.model.config import ModelConfig
from xds_jax.model.quant import SCALE_SUFFIX, TRANSPOSED_SUFFIX

OUT_MAJOR_LEAVES = frozenset({"q", "k", "v", "kv", "qkv", "o", "gate", "up", "gate_up", "down",
                              "eh_proj"})


def prefers_out_major(platform: str | None = None) -> bool:
    """Whether projections are stored output-major on ``platform`` (default: JAX's backend)."""
    return (platform or jax.default_backend()) == "cpu"


def _flip(p: dict, to_out_major: bool) -> dict:
    out = {}
    for name, w in p.items():
        stem = name.removesuffix(SCALE_SUFFIX)
        base = stem.removesuffix(TRANSPOSED_SUFFIX)
        if base not in OUT_MAJOR_LEAVES or (stem != base) == to_out_major:
            out[name] = w
            continue
        new = (base + TRANSPOSED_SUFFIX if to_out_major else base) + name[len(stem):]
        out[new] = w if stem != name else jnp.transpose(w)  # int8 scales [out] as they are
    return out


def _map_layer(lay: dict, cfg: ModelConfig | None, to_out_major: bool) -> dict:
    out = dict(lay)
    if cfg is None or cfg.mla is None:
        out["attn"] = _flip(lay["attn"], to_out_major)
    if "mlp" in lay:
        out["mlp"] = _flip(lay["mlp"], to_out_major)
    if "moe" in lay and "shared" in lay["moe"]:
        out["moe"] = dict(lay["moe"], shared=_flip(lay["moe"]["shared"], to_out_major))
    return out


def out_major(params: dict, cfg: ModelConfig) -> dict:
    """``params`` with every decoder layer's projections stored ``[out, in]`` as ``<name>_t``
    (already transposed leaves are kept), MTP blocks' too (``out_major_block``)."""
    out = dict(params, layers=[_map_layer(lay, cfg, True) for lay in params["layers"]])
    if params.get("mtp"):
        out["mtp"] = [out_major_block(block, cfg) for block in params["mtp"]]
    return out


def out_major_block(block: dict, cfg: ModelConfig) -> dict:
    """An MTP block with its layer's projections and its ``eh_proj`` stored ``[out, in]``
    (its draft vocabulary's ``head [N, D]`` is output-major already)."""
    return _flip(dict(block, layer=_map_layer(block["layer"], cfg, True)), True)


def in_major_layer(lay: dict) -> dict:
    """A decoder layer with its ``<name>_t`` leaves back as ``<name>`` ``[in, out]`` (the
    inverse of ``out_major`` for one layer; a layer without them is returned as is)."""
    return _map_layer(lay, None, False)


def weight_for(p: dict, name: str) -> tuple[jax.Array, bool]:
    """``(weight, transposed)``: ``p[name]`` ``[in, out]``, or ``p[name + "_t"]`` ``[out, in]``."""
    if name in p:
        return p[name], False
    if name + TRANSPOSED_SUFFIX in p:
        return p[name + TRANSPOSED_SUFFIX], True
    raise KeyError(f"no weight {name!r} (nor {name + TRANSPOSED_SUFFIX!r}) among {sorted(p)}")


def has_weight(p: dict, name: str) -> bool:
    """Whether ``p`` holds weight ``name`` in either layout."""
    return name in p or name + TRANSPOSED_SUFFIX in p
