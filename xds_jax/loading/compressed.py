"""compressed-tensors checkpoints (llm-compressor, RedHatAI / neuralmagic W4A16, W8A8, FP8).

``quantization_config.quant_method: "compressed-tensors"`` names, per config group, the
quantised weights' ``num_bits``, ``type`` (int / float), ``strategy`` (tensor, channel, group,
block) and symmetry, and a storage ``format``:

- ``pack-quantized``: ``weight_packed`` int32 (``num_bits``-wide values, offset by
  ``2^(num_bits-1)``, packed densely along the input dimension, little end first) and
  ``weight_shape``; an asymmetric ``weight_zero_point`` is packed the same way along the
  output dimension;
- ``int-quantized`` / ``naive-quantized``: int8 ``weight``; ``float-quantized``: float8 ``weight``;
- ``dense``: float weights (scales, if any, are calibration only).

Every quantised weight comes with ``weight_scale`` (one per tensor, output channel, group of
``group_size`` inputs, or ``block_structure`` block). The loader dequantises each to
``(q - zero_point) x scale`` in float32, as the library's ``decompress`` does, then converts it
to the model's dtype like any weight. Activation quantisation (``input_activations``: W8A8's
dynamic per-token int8, FP8-dynamic) is not applied: activations stay in the model's dtype.
Sparse, 2:4 and FP4 formats are refused by name when the config is read.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from xds_jax.errors import UnsupportedModelError, WeightLoadError
from xds_jax.loading.weights import expand_blocks

FORMATS = ("pack-quantized", "int-quantized", "naive-quantized", "float-quantized", "dense")
STRATEGIES = ("tensor", "channel", "group", "block")
# Companion tensors a quantised module stores next to its weight, never parameters themselves.
COMPANIONS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape",
              "weight_g_idx", "weight_global_scale", "input_scale", "input_zero_point",
              "input_global_scale", "output_scale", "output_zero_point", "k_scale", "v_scale")


@dataclasses.dataclass(frozen=True)
class WeightArgs:
    """One config group's weight quantisation."""

    targets: tuple[str, ...]
    format: str
    num_bits: int
    type: str
    strategy: str
    symmetric: bool
    group_size: int | None = None
    block: tuple[int, int] | None = None


@dataclasses.dataclass(frozen=True)
class CompressedScheme:
    groups: tuple[WeightArgs, ...]

    def args_for(self, module: str) -> WeightArgs:
        """The group whose targets match ``module``, ranked as compressed-tensors ranks them:
        a target naming the module, then a ``re:`` pattern, then the class (``Linear``
        matches every projection); the first group listed among equals."""
        kinds = (lambda t: module == t or module.endswith("." + t),
                 lambda t: t.startswith("re:") and re.match(t[3:], module) is not None,
                 lambda t: t == "Linear")
        for matches in kinds:
            for group in self.groups:
                if any(matches(target) for target in group.targets):
                    return group
        if len(self.groups) == 1:
            return self.groups[0]
        raise WeightLoadError(f"no compressed-tensors config group targets {module!r}")


def _field(d: dict, name: str, source: str, allowed=None):
    value = d.get(name)
    if allowed is not None and value not in allowed:
        raise UnsupportedModelError(f"{source}.{name} {value!r} is not supported "
                                    f"(supported: {', '.join(map(str, allowed))})")
    return value


def parse_compressed(q: dict, source: str) -> CompressedScheme:
    """The weight quantisation of a compressed-tensors ``quantization_config``."""
    sparsity = q.get("sparsity_config") or {}
    if sparsity.get("format", "dense") != "dense":
        raise UnsupportedModelError(f"{source}.sparsity_config.format "
                                    f"{sparsity.get('format')!r} is not supported (only dense)")
    if q.get("transform_config"):
        raise UnsupportedModelError(f"{source}.transform_config (rotated weights) is not "
                                    "supported")
    groups = q.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise UnsupportedModelError(f"{source}.config_groups must be a non-empty object")
    out = []
    for gname, g in groups.items():
        where = f"{source}.config_groups.{gname}"
        if not isinstance(g, dict):
            raise UnsupportedModelError(f"{where} must be an object, got {g!r}")
        fmt = _field(dict(g, format=g.get("format") or q.get("format")), "format", where,
                     FORMATS)
        w = g.get("weights")
        if w is None:  # activation-only groups (e.g. a KV-cache scheme) leave weights float
            continue
        if not isinstance(w, dict):
            raise UnsupportedModelError(f"{where}.weights must be an object, got {w!r}")
        wt = _field(w, "type", where + ".weights", ("int", "float"))
        bits = w.get("num_bits")
        if wt == "float" and bits != 8 or wt == "int" and bits not in range(2, 9):
            raise UnsupportedModelError(f"{where}.weights.num_bits {bits!r} is not supported "
                                        "for type " + repr(wt) + " (int: 2-8, float: 8)")
        strategy = _field(w, "strategy", where + ".weights", STRATEGIES)
        group_size = w.get("group_size")
        if strategy == "group" and not (isinstance(group_size, int) and group_size > 0):
            raise UnsupportedModelError(f"{where}.weights.group_size must be a positive "
                                        f"integer for strategy group, got {group_size!r}")
        block = w.get("block_structure")
        if strategy == "block" and not (isinstance(block, list) and len(block) == 2
                                        and all(isinstance(b, int) and b > 0 for b in block)):
            raise UnsupportedModelError(f"{where}.weights.block_structure must be two positive "
                                        f"integers for strategy block, got {block!r}")
        targets = g.get("targets") or ["Linear"]
        out.append(WeightArgs(tuple(targets), fmt, int(bits), wt, strategy,
                              bool(w.get("symmetric", True)), group_size,
                              tuple(block) if strategy == "block" else None))
    return CompressedScheme(tuple(out))


def unpack_int32(packed: np.ndarray, num_bits: int, count: int) -> np.ndarray:
    """Dense ``num_bits`` values packed little end first into each row of int32 words, back
    to signed ints (the ``2^(num_bits-1)`` offset removed): ``[rows, count]`` int32."""
    words = packed.astype(np.uint32).astype(np.uint64)
    start = np.arange(count, dtype=np.int64) * num_bits
    word, shift = start // 32, (start % 32).astype(np.uint64)
    nxt = np.minimum(word + 1, words.shape[-1] - 1)
    both = words[..., word] | (words[..., nxt] << np.uint64(32))  # values may straddle words
    values = (both >> shift) & np.uint64((1 << num_bits) - 1)
    return values.astype(np.int32) - (1 << (num_bits - 1))


def _expand(scale: np.ndarray, args: WeightArgs, shape: tuple[int, int],
            g_idx: np.ndarray | None, name: str, what: str) -> np.ndarray:
    """A per-tensor / channel / group / block ``scale`` (or zero point) as a full ``shape``."""
    rows, cols = shape
    s = np.asarray(scale, np.float32)
    if args.strategy == "tensor":
        want = (1,)
    elif args.strategy == "channel":
        want = (rows, 1)
    elif args.strategy == "group":
        want = (rows, -(-cols // args.group_size))
    else:
        want = (-(-rows // args.block[0]), -(-cols // args.block[1]))
    if s.size != int(np.prod(want)) or (s.ndim == 2 and s.shape != want):
        raise WeightLoadError(f"{name}.{what} has shape {s.shape}, expected {want} for "
                              f"strategy {args.strategy} of weight {shape}")
    s = s.reshape(want)
    if args.strategy == "tensor":
        return np.broadcast_to(s.reshape(1, 1), shape)
    if args.strategy == "channel":
        return np.broadcast_to(s, shape)
    if args.strategy == "group":
        column_group = g_idx if g_idx is not None else np.arange(cols) // args.group_size
        return s[:, column_group]
    return expand_blocks(s, args.block, rows, cols)


def dequantize_module(get, names: set[str], module: str, args: WeightArgs) -> np.ndarray:
    """Module ``module``'s weight, dequantised to float32; ``get`` reads a checkpoint tensor."""
    if args.format == "pack-quantized":
        if module + ".weight_shape" not in names:
            raise WeightLoadError(f"{module}: its config group is pack-quantized "
                                  f"({args.type}{args.num_bits}) but the checkpoint stores no "
                                  f"{module}.weight_shape")
        shape = tuple(int(v) for v in np.asarray(get(module + ".weight_shape")).reshape(-1))
        if len(shape) != 2:
            raise WeightLoadError(f"{module}.weight_shape must hold 2 sizes, got {shape}")
        q = unpack_int32(get(module + ".weight_packed"), args.num_bits, shape[1])
        if q.shape != shape:
            raise WeightLoadError(f"{module}.weight_packed unpacks to {q.shape}, "
                                  f"weight_shape says {shape}")
    else:
        q = get(module + ".weight")
        shape = q.shape
    q = q.astype(np.float32)
    if args.format == "dense":
        return q
    g_idx = (np.asarray(get(module + ".weight_g_idx")).astype(np.int64)
             if module + ".weight_g_idx" in names else None)
    scale = _expand(get(module + ".weight_scale"), args, shape, g_idx, module, "weight_scale")
    zp_name = module + ".weight_zero_point"
    if not args.symmetric and zp_name in names:
        zp = np.asarray(get(zp_name))
        if args.format == "pack-quantized" and args.strategy in ("group", "channel"):
            groups = 1 if args.strategy == "channel" else -(-shape[1] // args.group_size)
            zp = unpack_int32(zp.T, args.num_bits, shape[0]).T.reshape(shape[0], groups)
        q = q - _expand(zp, args, shape, g_idx, module, "weight_zero_point")
    return q * scale
