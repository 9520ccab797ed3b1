"""GPTQ and AWQ checkpoints for make_golden.py.

Each entry quantises the tiny ``llama``'s projections to ``bits``-bit integers per group of
inputs (min/max zero points and scales, GPTQ's act-order permutation where asked), packs them
as GPTQModel / AutoGPTQ (``qweight`` along the inputs, ``qzeros`` along the outputs, v1's
zero minus one) or AutoAWQ's GEMM layout (both along the outputs in the interleaved order
0, 2, 4, 6, 1, 3, 5, 7) write them, and runs transformers' Llama on the weights dequantised
from the integers *before* packing: ``golden.npz`` checks a reader's unpacking, group
indices and zero offset.
"""

import json
import logging
import shutil

import numpy as np
import torch
from make_golden import GOLDEN_DIR, golden_with_weights, split_projections
from safetensors.torch import save_file

log = logging.getLogger("make_golden")

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# name -> (method, bits, group size (-1: one group), act-order, checkpoint_format, prompt seed)
GPTQ_MODELS = {
    "llama_gptq_int4": ("gptq", 4, 32, True, "gptq", 0),
    "llama_gptq_int8": ("gptq", 8, -1, False, "gptq_v2", 0),
    "llama_awq": ("awq", 4, 32, False, None, 0),
}


def pack_along(values: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """Unsigned ``values`` packed ``32 / bits`` to an int32 word along ``axis``, value ``j`` of a
    word at bits ``j * bits`` (GPTQModel's ``pack``)."""
    per = 32 // bits
    v = np.moveaxis(values.astype(np.uint64), axis, -1)
    v = v.reshape(v.shape[:-1] + (v.shape[-1] // per, per))
    words = (v << (np.arange(per, dtype=np.uint64) * bits)).sum(-1).astype(np.uint32)
    return np.moveaxis(words, -1, axis).view(np.int32)


def quantise(w: np.ndarray, bits: int, group: int, act_order: bool, rng):
    """``w [out, in]`` -> ints ``q [in, out]``, zeros / scales ``[groups, out]``, ``g_idx``."""
    out, n_in = w.shape
    size = n_in if group == -1 else group
    perm = rng.permutation(n_in) if act_order else np.arange(n_in)
    g_idx = np.empty(n_in, np.int32)
    g_idx[perm] = np.arange(n_in) // size  # act-order: groups of inputs in permuted order
    groups = n_in // size
    maxq = 2**bits - 1
    zeros = np.empty((groups, out), np.int64)
    scales = np.empty((groups, out), np.float32)
    q = np.empty((n_in, out), np.int64)
    for g in range(groups):
        cols = np.nonzero(g_idx == g)[0]
        part = w[:, cols].T  # [size, out]
        lo, hi = np.minimum(part.min(0), 0), np.maximum(part.max(0), 0)
        s = ((hi - lo) / maxq).astype(np.float16).astype(np.float32)  # scales are fp16 on disk
        z = np.clip(np.round(-lo / s), 0, maxq)
        zeros[g], scales[g] = z, s
        q[cols] = np.clip(np.round(part / s) + z, 0, maxq)
    return q, zeros, scales, g_idx


def gptq_golden(name: str, method: str, bits: int, group: int, act_order: bool,
                fmt: str | None, prompt_seed: int) -> None:
    src_dir, out_dir = GOLDEN_DIR / "llama", GOLDEN_DIR / name
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir()
    rng = np.random.default_rng(0)
    tensors, projections = split_projections(src_dir / "model.safetensors")
    dequantised = {}
    for key, value in projections.items():
        prefix = key.removesuffix(".weight")
        q, zeros, scales, g_idx = quantise(value.numpy(), bits, group, act_order, rng)
        dequantised[key] = torch.from_numpy(((q - zeros[g_idx]) * scales[g_idx]).T.copy())
        if method == "gptq":
            stored_zeros = zeros - (1 if fmt == "gptq" else 0)  # v1 stores zero - 1
            packed = {"qweight": pack_along(q, bits, 0),
                      "qzeros": pack_along(stored_zeros & (2**bits - 1), bits, 1),
                      "g_idx": g_idx}
        else:  # AutoAWQ GEMM: outputs interleaved within each word
            order = np.concatenate([c * 8 + np.array(AWQ_ORDER) for c in range(q.shape[1] // 8)])
            packed = {"qweight": pack_along(q[:, order], 4, 1),
                      "qzeros": pack_along(zeros[:, order], 4, 1)}
        packed["scales"] = scales.astype(np.float16)
        for sub, t in packed.items():
            tensors[f"{prefix}.{sub}"] = torch.from_numpy(np.ascontiguousarray(t))
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src_dir / "config.json").read_text())
    if method == "gptq":
        config["quantization_config"] = {
            "quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": act_order,
            "sym": False, "checkpoint_format": fmt, "true_sequential": True,
        }
    else:
        config["quantization_config"] = {
            "quant_method": "awq", "bits": bits, "group_size": group, "zero_point": True,
            "version": "gemm", "modules_to_not_convert": None,
        }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    # The reference: transformers' float Llama on the dequantised weights.
    golden_with_weights(name, src_dir, out_dir, dequantised, prompt_seed)
