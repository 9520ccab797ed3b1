"""Image-text checkpoints (Gemma3ForConditionalGeneration, Mistral3ForConditionalGeneration,
Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration) for make_golden.py.

Gemma 3 from 4B up ships as an image-text model: ``model_type: gemma3`` with a ``text_config``
that leans on ``Gemma3TextConfig``'s defaults, and the language model's weights under a
prefix (``model.language_model.`` as transformers 5 saves them) beside a vision tower. The
entry saves a tiny one and runs it on text only (prompts and greedy tokens below the image
token ids): the reference for serving the text part. Mistral Small 3.x (``mistral3``) is
built the same way around a Pixtral vision tower, Qwen2.5-VL and Qwen3-VL around theirs (a
text-only prompt takes one position in all three of their multimodal RoPE sections).
"""

import logging
import shutil

import numpy as np
import torch
import transformers as tf
from make_golden import GOLDEN_DIR, NEW_TOKENS, greedy_margins, randomise
from tiny_configs import BASE

log = logging.getLogger("make_golden")

NAME = "gemma3_mm"
TEXT = dict(BASE, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"])
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
              image_size=28, patch_size=14)
IMAGE_IDS = dict(boi_token_index=317, eoi_token_index=318, image_token_index=319,
                 mm_tokens_per_image=4)


def gemma3_mm_golden() -> None:
    torch.manual_seed(0)
    config = tf.Gemma3Config(text_config=TEXT, vision_config=VISION, **IMAGE_IDS)
    text_only_golden(NAME, tf.Gemma3ForConditionalGeneration, config)


def mistral3_mm_golden() -> None:
    """Mistral Small 3.x (``model_type: mistral3``): a Mistral language model under a Pixtral
    vision tower; image token id 10 lies below 300, so prompts and greedy picks skip it."""
    torch.manual_seed(0)
    text = {k: v for k, v in BASE.items() if k != "rope_theta"}
    config = tf.Mistral3Config(
        text_config=dict(text, model_type="mistral", head_dim=16, sliding_window=None,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
        vision_config=dict(VISION, model_type="pixtral", head_dim=16, image_size=28,
                           patch_size=14),
        image_token_index=319)
    text_only_golden("mistral3_mm", tf.Mistral3ForConditionalGeneration, config)


QWEN_VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                   out_hidden_size=64, patch_size=14)


def qwen_vl_goldens() -> None:
    """Qwen2.5-VL (a Qwen2 language model: q/k/v biases), Qwen3-VL (Qwen3: per-head q/k
    norms; interleaved mrope sections) and Qwen3-VL-MoE (Qwen3-MoE; experts fused, F = 24 so
    that no expert tensor is square) with their multimodal RoPE sections set."""
    moe = dict(BASE, head_dim=16, num_experts=8, num_experts_per_tok=2,
               moe_intermediate_size=24, decoder_sparse_step=1)
    for name, cls, model, text in (
            ("qwen2_5_vl_mm", tf.Qwen2_5_VLConfig, tf.Qwen2_5_VLForConditionalGeneration,
             dict(BASE)),
            ("qwen3_vl_mm", tf.Qwen3VLConfig, tf.Qwen3VLForConditionalGeneration,
             dict(BASE, head_dim=16)),
            ("qwen3_vl_moe_mm", tf.Qwen3VLMoeConfig, tf.Qwen3VLMoeForConditionalGeneration,
             moe)):
        torch.manual_seed(0)
        rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}
        config = cls(text_config=dict(text, rope_parameters=rope, bos_token_id=1,
                                      eos_token_id=2), vision_config=QWEN_VISION)
        text_only_golden(name, model, config)


def text_only_golden(name: str, cls, config) -> None:
    """Save ``cls(config)`` with random weights under ``name`` and its text-only golden."""
    config._attn_implementation = "eager"
    model = cls(config).eval()
    randomise(model)
    out_dir = GOLDEN_DIR / name
    shutil.rmtree(out_dir, ignore_errors=True)
    model.save_pretrained(out_dir)
    (out_dir / "generation_config.json").unlink(missing_ok=True)
    rng = np.random.default_rng(0)
    golden = {}
    for i, length in enumerate((1, 7, 23)):
        ids = torch.from_numpy(rng.integers(0, 300, size=(1, length)))
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0]
        tokens = ids
        margins = []
        for _ in range(NEW_TOKENS):  # greedy by hand: image ids never chosen
            with torch.no_grad():
                step = model(input_ids=tokens).logits[:, -1, :300]
            margins.append(step)
            tokens = torch.cat([tokens, step.argmax(-1, keepdim=True)], dim=1)
        argmax, margin = greedy_margins(tuple(margins))
        assert margin.min() >= 1e-3, f"{name} prompt {i}: margin {margin.min():.2e}"
        golden[f"prompt_{i}"] = ids[0].numpy().astype(np.int32)
        golden[f"logits_{i}"] = logits.numpy().astype(np.float32)
        golden[f"greedy_{i}"] = argmax.astype(np.int32)
    np.savez(out_dir / "golden.npz", **golden)
    names = sorted(p.name for p in out_dir.iterdir())
    log.info("%s: %s", name, names)
