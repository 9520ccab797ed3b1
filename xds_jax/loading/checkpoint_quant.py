"""Quantised Hugging Face checkpoints: which ``quantization_config`` loads, and dequantising it.

**FP8** (``quant_method: "fp8"``): DeepSeek-V3/R1's official weights, Qwen3's ``-FP8`` releases
and transformers' ``FineGrainedFP8Config`` store each linear weight as ``float8_e4m3fn`` with a
``<name>_scale_inv`` tensor: one float32 (or UE8M0) factor per ``weight_block_size`` block of
``[out, in]`` (edge blocks cut short), or one per tensor without ``weight_block_size``. The
weight is ``fp8 x scale_inv`` of its block, as DeepSeek's reference ``weight_dequant`` and vLLM
read it (``docs/quantization.md``: where transformers differs). The loader
dequantises every such tensor to the model's dtype (so an FP8 checkpoint serves in bfloat16 by
default, or ``--quantization int8`` re-quantises it); activation scales of static schemes
(``input_scale``) are not used: activations stay in the model's dtype.

**compressed-tensors** (``quant_method: "compressed-tensors"``, llm-compressor's W4A16, W8A8,
FP8-dynamic, ...): ``xds_jax.loading.compressed``.

**GPTQ** and **AWQ** (``quant_method: "gptq"`` / ``"awq"``): ``xds_jax.loading.gptq_awq``.

Any other ``quant_method`` (bitsandbytes, HQQ, ...) is refused when the config is read, naming
the method, rather than loading its packed integers as weights.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from xds_jax.errors import UnsupportedModelError, WeightLoadError
from xds_jax.loading.compressed import (
    COMPANIONS,
    CompressedScheme,
    dequantize_module,
    parse_compressed,
)
from xds_jax.loading.gptq_awq import COMPANIONS as GROUP_COMPANIONS
from xds_jax.loading.gptq_awq import GroupQuantScheme, dequantize_group_quant, parse_gptq_awq
from xds_jax.loading.weights import expand_blocks

SUPPORTED_METHODS = ("fp8", "compressed-tensors", "gptq", "awq")

SCALE_SUFFIX = "_scale_inv"
_UNUSED_SUFFIXES = (SCALE_SUFFIX, ".input_scale", ".activation_scale")
# safetensors dtype names numpy does not know, and their ml_dtypes types.
RAW_DTYPES = {
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "F8_E8M0": ml_dtypes.float8_e8m0fnu,
}
_FLOAT8 = {np.dtype(t) for t in RAW_DTYPES.values()}


@dataclasses.dataclass(frozen=True)
class Fp8Scheme:
    """Block-scaled FP8 weights: ``block`` is ``(rows, cols)``, or None for one scale a tensor."""

    block: tuple[int, int] | None


Scheme = Fp8Scheme | CompressedScheme | GroupQuantScheme


def checkpoint_quantization(d: dict, source: str) -> Scheme | None:
    """The checkpoint quantisation ``config.json`` declares (None when it declares none).

    Raises ``UnsupportedModelError`` for a method the loader cannot dequantise, naming it.
    """
    q = d.get("quantization_config")
    if q is None:
        return None
    if not isinstance(q, dict):
        raise UnsupportedModelError(f"{source}: quantization_config must be an object, got {q!r}")
    method = q.get("quant_method")
    if method not in SUPPORTED_METHODS:
        raise UnsupportedModelError(
            f"{source}: quantization_config.quant_method {method!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_METHODS)}; for int8 weights load the unquantised "
            "checkpoint with quantization='int8')"
        )
    if method == "compressed-tensors":
        return parse_compressed(q, f"{source}: quantization_config")
    if method in ("gptq", "awq"):
        return parse_gptq_awq(q, f"{source}: quantization_config")
    fmt = q.get("fmt", "e4m3")
    if fmt not in ("e4m3", "float8_e4m3fn"):  # MiniMax-M2 names the dtype
        raise UnsupportedModelError(f"{source}: quantization_config.fmt {fmt!r} is not supported "
                                    "(supported: e4m3, float8_e4m3fn)")
    block = q.get("weight_block_size")
    if block is None:
        return Fp8Scheme(None)
    if (not isinstance(block, list | tuple) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise UnsupportedModelError(
            f"{source}: quantization_config.weight_block_size must be two positive integers, "
            f"got {block!r}"
        )
    return Fp8Scheme((int(block[0]), int(block[1])))


@functools.lru_cache(maxsize=8)
def _header(path: Path) -> tuple[int, dict]:
    """A safetensors file's data offset and tensor table (cached: shards are read in order)."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return 8 + size, json.loads(f.read(size))


def read_raw(path: Path, name: str) -> np.ndarray:
    """One tensor of a safetensors file whose dtype numpy lacks (FP8), as an ml_dtypes array."""
    base, table = _header(Path(path))
    info = table[name]
    dtype = RAW_DTYPES.get(info["dtype"])
    if dtype is None:
        raise WeightLoadError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
    start, end = info["data_offsets"]
    with open(path, "rb") as f:
        f.seek(base + start)
        data = np.frombuffer(f.read(end - start), dtype=np.uint8)
    return data.view(dtype).reshape(info["shape"])


def dequantize_fp8(weight: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int] | None,
                   name: str) -> np.ndarray:
    """``weight x scale_inv``, float32: one scale per ``block`` of the last two dimensions
    (ragged at the edges), or one for the whole tensor when ``block`` is None."""
    w = weight.astype(np.float32)
    s = np.asarray(scale_inv).astype(np.float32)
    if block is None:
        if s.size != 1:
            raise WeightLoadError(f"scale {name + SCALE_SUFFIX!r} has shape {s.shape}; without "
                                  "weight_block_size one scale per tensor is expected")
        return w * s.reshape(())
    rows, cols = w.shape[-2:]
    want = w.shape[:-2] + (-(-rows // block[0]), -(-cols // block[1]))
    if s.shape != want:
        raise WeightLoadError(f"scale {name + SCALE_SUFFIX!r} has shape {s.shape}, expected {want} "
                              f"for weight {name!r} {w.shape} in blocks of {list(block)}")
    return w * expand_blocks(s, block, rows, cols)


class DequantizingSource:
    """A tensor source whose quantised weights come out dequantised (float32), scales hidden.

    Wraps every Hugging Face checkpoint: an FP8 tensor without a scale (a ``config.json`` that
    does not declare the quantisation) is an error, not a silently unscaled weight.
    """

    def __init__(self, src, scheme: Scheme | None):
        self._src = src
        self._scheme = scheme
        self._names = set(src.names())

    def _packed_module(self, name: str) -> str | None:
        """The module whose packed weight ``name`` (``<module>.weight``) is, if it is one."""
        if not name.endswith(".weight"):
            return None
        module = name.removesuffix(".weight")
        stored = self._names
        if isinstance(self._scheme, CompressedScheme) and (
                module + ".weight_packed" in stored or module + ".weight_scale" in stored):
            return module
        if isinstance(self._scheme, GroupQuantScheme) and module + ".qweight" in self._names:
            return module
        return None

    def names(self):
        if isinstance(self._scheme, CompressedScheme):
            packed = {n.removesuffix("_packed") for n in self._names
                      if n.endswith(".weight_packed")}
            return [n for n in self._names | packed
                    if n.rsplit(".", 1)[-1] not in COMPANIONS]
        if isinstance(self._scheme, GroupQuantScheme):
            packed = {n.removesuffix(".qweight") + ".weight" for n in self._names
                      if n.endswith(".qweight")}
            return [n for n in self._names | packed
                    if n.rsplit(".", 1)[-1] not in GROUP_COMPANIONS]
        return [n for n in self._names if not n.endswith(_UNUSED_SUFFIXES)]

    def get(self, name: str) -> np.ndarray:
        module = self._packed_module(name)
        if isinstance(self._scheme, CompressedScheme) and module is not None:
            return dequantize_module(self._src.get, self._names, module,
                                     self._scheme.args_for(module))
        if module is not None:
            return dequantize_group_quant(self._src.get, self._names, module, self._scheme)
        arr = self._src.get(name)
        if arr.dtype not in _FLOAT8:
            return arr
        scale = name + SCALE_SUFFIX
        if not isinstance(self._scheme, Fp8Scheme) or scale not in self._names:
            raise WeightLoadError(
                f"tensor {name!r} is stored as {arr.dtype} but has no {scale!r}"
                + ("" if self._scheme else " and config.json declares no quantization_config")
            )
        return dequantize_fp8(arr, self._src.get(scale), self._scheme.block, name)


def describe(scheme: Scheme) -> str:
    """A short description of a checkpoint's quantisation, for the load log."""
    if isinstance(scheme, Fp8Scheme):
        return f"FP8 (blocks {list(scheme.block) if scheme.block else 'per tensor'})"
    if isinstance(scheme, GroupQuantScheme):
        overrides = f", {len(scheme.dynamic)} per-module overrides" if scheme.dynamic else ""
        return f"{scheme.method.upper()} int{scheme.bits} (group {scheme.group_size}{overrides})"
    return "compressed-tensors " + ", ".join(
        f"{g.format} {g.type}{g.num_bits} per {g.strategy}" for g in scheme.groups)
