"""FP8 block-quantised checkpoints (DeepSeek-V3 / Qwen3-FP8 layout) for make_golden.py.

Each entry re-quantises a tiny model's saved float32 weights as the official DeepSeek-V3
checkpoint stores them: every linear projection inside the decoder layers (attention, dense
MLP, routed and shared experts) becomes ``float8_e4m3fn`` with a float32
``<name>_scale_inv`` per ``[block_out, block_in]`` block (the block's max |w| / 448; edge blocks
are ragged); embeddings, norms, routers and the LM head stay float32. ``config.json`` gets
DeepSeek's ``quantization_config`` (``quant_method: fp8``, ``weight_block_size``).
``golden.npz`` holds transformers' outputs for that directory as it loads it
(``FineGrainedFP8Config``: on a CPU it dequantises at load), the same keys as the tiny models'.
"""

import json
import logging
import shutil

import torch
import transformers as tf
from make_golden import GOLDEN_DIR, run_prompts, split_projections
from safetensors.torch import load_file, save_file

log = logging.getLogger("make_golden")

FP8_MAX = 448.0
# name -> (float32 source model, weight_block_size, prompt seed). [32, 32] blocks tile every
# projection into several blocks except kv_b's 24 inputs (one partial block). Blocks that leave
# a ragged edge after whole ones (DeepSeek-V3's 576-row kv_a projection in 128-row blocks) are
# not used here: transformers 5.24 derives the block from the scale grid (rows // grid rows),
# which differs from the declared weight_block_size there (tests/xds_jax/test_fp8_checkpoint.py
# checks that case by hand).
FP8_MODELS = {"deepseek_v3_fp8": ("deepseek_v3", (32, 32), 3)}


def is_quantised(name: str, tensor: torch.Tensor) -> bool:
    """Linear weights inside the decoder layers; not norms, routers, embeddings or the head."""
    return (name.startswith("model.layers.") and name.endswith(("proj.weight", "_mqa.weight"))
            and tensor.ndim == 2)


def quantise(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``float8_e4m3fn`` weight and float32 ``scale_inv [ceil(out/bo), ceil(in/bi)]``."""
    rows, cols = w.shape
    bo, bi = block
    scale_inv = torch.empty((-(-rows // bo), -(-cols // bi)), dtype=torch.float32)
    q = torch.empty(w.shape, dtype=torch.float8_e4m3fn)
    for i in range(scale_inv.shape[0]):
        for j in range(scale_inv.shape[1]):
            part = w[i * bo:(i + 1) * bo, j * bi:(j + 1) * bi].float()
            s = part.abs().max().clamp(min=1e-12) / FP8_MAX
            scale_inv[i, j] = s
            q[i * bo:(i + 1) * bo, j * bi:(j + 1) * bi] = (part / s).to(torch.float8_e4m3fn)
    return q, scale_inv


def fp8_golden(name: str, source: str, block: tuple[int, int], prompt_seed: int) -> None:
    """Write ``GOLDEN_DIR/name``: the FP8 checkpoint of ``source`` and transformers' outputs."""
    src_dir, out_dir = GOLDEN_DIR / source, GOLDEN_DIR / name
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir()
    tensors, projections = split_projections(src_dir / "model.safetensors", is_quantised)
    for key, value in projections.items():
        tensors[key], tensors[key + "_scale_inv"] = quantise(value, block)
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src_dir / "config.json").read_text())
    config["dtype"] = "bfloat16"  # as DeepSeek-V3 ships: the unquantised tensors' dtype
    config["quantization_config"] = {
        "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
        "weight_block_size": list(block),
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    model = tf.AutoModelForCausalLM.from_pretrained(
        out_dir, attn_implementation="eager", dtype=torch.float32
    ).eval()
    check_dequantised(model, out_dir, block)
    model.generation_config.eos_token_id = None
    run_prompts(name, model, model, out_dir, prompt_seed)


def check_dequantised(model, out_dir, block: tuple[int, int]) -> None:
    """transformers' float32 weights are exactly ``fp8 x scale_inv`` of the declared blocks."""
    saved = load_file(out_dir / "model.safetensors")
    params = dict(model.named_parameters())
    checked = 0
    for key, q in saved.items():
        if q.dtype != torch.float8_e4m3fn:
            continue
        scale = saved[key + "_scale_inv"]
        rows, cols = q.shape
        full = scale.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
        want = q.float() * full
        if key in params:
            got = params[key]
        else:  # transformers 5 fuses experts: mlp.experts.{e}.{gate,up,down}_proj.weight
            prefix, e, proj, _ = key.rsplit(".", 3)
            e = int(e)
            if proj == "down_proj":
                got = params[f"{prefix}.down_proj"][e]
            else:
                fused = params[f"{prefix}.gate_up_proj"][e]
                half = fused.shape[0] // 2
                got = fused[:half] if proj == "gate_proj" else fused[half:]
        assert got.dtype == torch.float32, (key, got.dtype)
        torch.testing.assert_close(got.detach(), want, rtol=0, atol=0, msg=key)
        checked += 1
    log.info("%s: %d FP8 tensors dequantised as fp8 x scale_inv", out_dir.name, checked)
