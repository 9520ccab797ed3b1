"""GPTQ and AWQ checkpoints (AutoGPTQ / GPTQModel, AutoAWQ; Qwen's ``-GPTQ-Int4`` / ``-AWQ``).

Both store a projection as ``qweight`` (int32 words of ``32 / bits`` unsigned values),
``qzeros`` (the same packing, along the output dimension), ``scales [groups, out]``, and
GPTQ a ``g_idx [in]`` (each input's group; absent means ``i // group_size``):

- **GPTQ** (``quant_method: "gptq"``, bits 2, 4 or 8): ``qweight [in * bits / 32, out]``
  packs consecutive *inputs*, value ``j`` of a word at bits ``j * bits``; ``qzeros [groups,
  out * bits / 32]`` consecutive outputs. The original ``checkpoint_format: "gptq"`` (v1,
  also when absent) stores each zero minus one; ``"gptq_v2"`` stores it as is.
- **AWQ** (``quant_method: "awq"``, ``version: "gemm"``, 4 bits): ``qweight [in, out / 8]``
  packs outputs in AutoAWQ's interleaved order (value ``i`` of a word is output
  ``8c + [0, 2, 4, 6, 1, 3, 5, 7][i]``), ``qzeros`` likewise; groups run along the inputs.

The weight is ``(q - zero[g]) x scale[g]`` of each input's group ``g``, as GPTQModel's and
vLLM's dequantisation compute it; the loader hands it on as ``[out, in]`` float32.

GPTQModel's ``dynamic`` overrides ``bits`` / ``group_size`` per module: ``{"+:regex": {...}}``
(or a bare regex) for the modules it matches (``re.match`` on the module's name, the first
pattern that matches wins, as in GPTQModel and vLLM); ``"-:regex"`` modules are left
unquantised (stored as float ``weight``).
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from xds_jax.errors import UnsupportedModelError, WeightLoadError

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
COMPANIONS = ("qweight", "qzeros", "scales", "g_idx")


@dataclasses.dataclass(frozen=True)
class GroupQuantScheme:
    method: str  # "gptq" or "awq"
    bits: int
    group_size: int  # -1: one group over all inputs
    zero_offset: int  # added to stored zeros: 1 for GPTQ v1, else 0
    # GPTQModel's ``dynamic``: (pattern, negative, fields) in the config's order
    dynamic: tuple[tuple[str, bool, tuple[tuple[str, int], ...]], ...] = ()

    def for_module(self, module: str) -> GroupQuantScheme:
        """The scheme of one module: the first ``dynamic`` pattern matching it overrides."""
        for pattern, negative, fields in self.dynamic:
            if re.match(pattern, module):
                if negative:
                    raise WeightLoadError(f"{module}: quantization_config.dynamic leaves it "
                                          f"unquantised ('-:{pattern}') but it has a qweight")
                return dataclasses.replace(self, dynamic=(), **dict(fields))
        return self


DYNAMIC_FIELDS = ("bits", "group_size", "sym", "desc_act")  # sym, desc_act: no effect here


def _bits_and_group(bits, group_size, method: str, source: str) -> None:
    allowed = (2, 4, 8) if method == "gptq" else (4,)
    if bits not in allowed or isinstance(bits, bool):
        raise UnsupportedModelError(f"{source}.bits {bits!r} is not supported for {method} "
                                    f"(supported: {', '.join(map(str, allowed))})")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or (
            group_size != -1 and group_size <= 0):
        raise UnsupportedModelError(f"{source}.group_size must be -1 or a positive integer, "
                                    f"got {group_size!r}")


def _dynamic(q: dict, bits: int, group_size: int, source: str) -> tuple:
    """GPTQModel's per-module overrides, checked (``GroupQuantScheme.dynamic``)."""
    dynamic = q.get("dynamic") or {}
    if not isinstance(dynamic, dict):
        raise UnsupportedModelError(f"{source}.dynamic must be an object of regex -> "
                                    f"overrides, got {dynamic!r}")
    out = []
    for key, fields in dynamic.items():
        where = f"{source}.dynamic[{key!r}]"
        negative = key.startswith("-:")
        pattern = key[2:] if key.startswith(("+:", "-:")) else key
        try:
            re.compile(pattern)
        except re.error as e:
            raise UnsupportedModelError(f"{where}: not a regular expression ({e})") from None
        if not isinstance(fields, dict) or set(fields) - set(DYNAMIC_FIELDS):
            raise UnsupportedModelError(f"{where} must be an object of "
                                        f"{', '.join(DYNAMIC_FIELDS)}, got {fields!r}")
        _bits_and_group(fields.get("bits", bits), fields.get("group_size", group_size),
                        "gptq", where)
        kept = tuple((k, v) for k, v in fields.items() if k in ("bits", "group_size"))
        out.append((pattern, negative, kept))
    return tuple(out)


def parse_gptq_awq(q: dict, source: str) -> GroupQuantScheme:
    method = q["quant_method"]
    bits = q.get("bits", q.get("w_bit"))
    group_size = q.get("group_size", q.get("q_group_size", -1))
    _bits_and_group(bits, group_size, method, source)
    if method == "awq":
        version = str(q.get("version", "gemm")).lower()
        if version != "gemm":
            raise UnsupportedModelError(f"{source}.version {version!r} is not supported for "
                                        "awq (supported: gemm)")
        if not q.get("zero_point", True):
            raise UnsupportedModelError(f"{source}.zero_point false is not supported for awq")
        return GroupQuantScheme("awq", 4, group_size, 0)
    fmt = q.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise UnsupportedModelError(f"{source}.checkpoint_format {fmt!r} is not supported "
                                    "(supported: gptq, gptq_v2)")
    return GroupQuantScheme("gptq", bits, group_size, 1 if fmt == "gptq" else 0,
                            _dynamic(q, bits, group_size, source))


def unpack_words(words: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """Each int32 word's ``32 / bits`` unsigned values (value ``j`` at bits ``j * bits``),
    laid out consecutively along ``axis`` (0 or 1)."""
    per = 32 // bits
    w = words.astype(np.uint32)
    shifts = (np.arange(per, dtype=np.uint32) * bits)
    vals = (w[..., None] >> shifts) & np.uint32((1 << bits) - 1)  # [r, c, per]
    if axis == 0:
        vals = np.moveaxis(vals, 2, 1)  # [r, per, c]: inputs r * per + j
        return vals.reshape(w.shape[0] * per, w.shape[1]).astype(np.int32)
    return vals.reshape(w.shape[0], w.shape[1] * per).astype(np.int32)


def dequantize_group_quant(get, names: set[str], module: str,
                           scheme: GroupQuantScheme) -> np.ndarray:
    """``module``'s weight as ``[out, in]`` float32."""
    scheme = scheme.for_module(module)
    scales = np.asarray(get(module + ".scales")).astype(np.float32)
    groups, out = scales.shape
    if scheme.method == "gptq":
        q = unpack_words(get(module + ".qweight"), scheme.bits, axis=0)  # [in, out]
        zeros = unpack_words(get(module + ".qzeros"), scheme.bits, axis=1)[:, :out]
    else:
        q = _awq_columns(unpack_words(get(module + ".qweight"), 4, axis=1))
        zeros = _awq_columns(unpack_words(get(module + ".qzeros"), 4, axis=1))
    n_in = q.shape[0]
    if q.shape[1] != out or zeros.shape != (groups, out):
        raise WeightLoadError(f"{module}: qweight {q.shape}, qzeros {zeros.shape} and scales "
                              f"{scales.shape} do not agree")
    if module + ".g_idx" in names:
        g_idx = np.asarray(get(module + ".g_idx")).astype(np.int64).reshape(-1)
    else:
        size = n_in if scheme.group_size == -1 else scheme.group_size
        if groups != -(-n_in // size):
            raise WeightLoadError(f"{module}: scales hold {groups} groups, but group_size "
                                  f"{scheme.group_size} over {n_in} inputs makes "
                                  f"{-(-n_in // size)} (and no g_idx is stored)")
        g_idx = np.arange(n_in) // size
    if g_idx.shape != (n_in,) or g_idx.min() < 0 or g_idx.max() >= groups:
        raise WeightLoadError(f"{module}: group indices do not fit {groups} groups of "
                              f"{n_in} inputs")
    w = (q - (zeros + scheme.zero_offset)[g_idx]) * scales[g_idx]
    return np.ascontiguousarray(w.T.astype(np.float32))


def _awq_columns(vals: np.ndarray) -> np.ndarray:
    """Undo AutoAWQ's interleaving: value ``i`` of word ``c`` is column ``8c + AWQ_ORDER[i]``."""
    rows, cols = vals.shape
    out = np.empty_like(vals)
    grouped = vals.reshape(rows, cols // 8, 8)
    out.reshape(rows, cols // 8, 8)[:, :, list(AWQ_ORDER)] = grouped
    return out
