"""compressed-tensors checkpoints (llm-compressor / RedHatAI layouts) for make_golden.py.

Each entry quantises the tiny ``llama``'s linear layers with one preset scheme of the
``compressed-tensors`` library and writes the checkpoint exactly as the library compresses it
(``weight_packed`` + ``weight_shape`` for ``pack-quantized``, int8 / float8 ``weight`` for
``int-quantized`` / ``float-quantized``, ``weight_scale``, ``weight_zero_point`` when asymmetric)
with its ``quantization_config``. The reference is independent of xds-jax's reader: the library
decompresses the checkpoint, those float32 weights go into transformers' Llama, and
``golden.npz`` holds its outputs (activation quantisation, which xds-jax does not apply, is
left out of the reference too).
"""

import json
import logging
import shutil

import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    QuantizationStrategy,
)
from compressed_tensors.quantization.lifecycle.forward import quantize
from compressed_tensors.quantization.utils import calculate_qparams
from make_golden import GOLDEN_DIR, golden_with_weights, split_projections
from safetensors.torch import save_file

log = logging.getLogger("make_golden")

INT_ACT = {"num_bits": 8, "type": "int", "strategy": "token", "symmetric": True, "dynamic": True}
FP8_ACT = dict(INT_ACT, type="float")
# name -> (format, weight args, input activation args or None, prompt seed)
COMPRESSED_MODELS = {
    "llama_w4a16": ("pack-quantized", {"num_bits": 4, "type": "int", "strategy": "group",
                                       "group_size": 32, "symmetric": True}, None, 0),
    "llama_w4a16_asym": ("pack-quantized", {"num_bits": 4, "type": "int", "strategy": "group",
                                            "group_size": 32, "symmetric": False}, None, 0),
    "llama_w8a8": ("int-quantized", {"num_bits": 8, "type": "int", "strategy": "channel",
                                     "symmetric": True}, INT_ACT, 0),
    "llama_fp8_dynamic": ("float-quantized", {"num_bits": 8, "type": "float",
                                              "strategy": "channel", "symmetric": True},
                          FP8_ACT, 0),
}


def _qparams(w: torch.Tensor, args: QuantizationArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max scale and zero point of ``w [out, in]`` for the strategy, as observers give."""
    if args.strategy == QuantizationStrategy.GROUP:
        parts = w.reshape(w.shape[0], -1, args.group_size)
        lo, hi = parts.amin(-1), parts.amax(-1)
    elif args.strategy == QuantizationStrategy.CHANNEL:
        lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    else:
        lo, hi = w.min().reshape(1), w.max().reshape(1)
    return calculate_qparams(lo, hi, args)


def compressed_golden(name: str, fmt: str, weights: dict, acts: dict | None,
                      prompt_seed: int) -> None:
    """Write ``GOLDEN_DIR/name``: the compressed checkpoint and the reference outputs."""
    src_dir, out_dir = GOLDEN_DIR / "llama", GOLDEN_DIR / name
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir()
    scheme = QuantizationScheme(
        targets=["Linear"], weights=QuantizationArgs(**weights),
        input_activations=QuantizationArgs(**acts) if acts else None,
    )
    compressor = BaseCompressor.load_from_registry(fmt)
    tensors, projections = split_projections(src_dir / "model.safetensors")
    dequantised = {}
    for key, value in projections.items():
        prefix = key.removesuffix(".weight")
        scale, zp = _qparams(value, scheme.weights)
        local = {"weight": value, "weight_scale": scale, "weight_zero_point": zp.to(torch.int8)
                 if scheme.weights.type == "int" else zp}
        if fmt != "pack-quantized":  # int/float-quantized: the quantised values as ``weight``
            local["weight"] = quantize(value, scale, zp, scheme.weights,
                                       dtype=torch.int8 if scheme.weights.type == "int"
                                       else torch.float8_e4m3fn)
            if scheme.weights.symmetric:
                del local["weight_zero_point"]
            packed = local
        else:
            packed = compressor.compress(local, scheme)
        for sub, t in packed.items():
            tensors[f"{prefix}.{sub}"] = t.contiguous()
        back = compressor.decompress(dict(packed), scheme)
        dequantised[key] = back["weight"].float()
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src_dir / "config.json").read_text())
    qconfig = QuantizationConfig(config_groups={"group_0": scheme}, format=fmt,
                                 quantization_status="compressed", ignore=["lm_head"])
    config["quantization_config"] = qconfig.model_dump(exclude_none=True)
    config["quantization_config"]["quant_method"] = "compressed-tensors"
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    # The reference: transformers' float Llama on the dequantised weights.
    golden_with_weights(name, src_dir, out_dir, dequantised, prompt_seed)
