"""GGUF checkpoints (llama.cpp): config from metadata, tensors dequantised on load.

Quantised blocks (Q4_0/Q4_1/Q5/Q8_0/K-quants, F16/BF16) are expanded to float32 by the
``gguf`` package and then cast to the serving dtype; with ``quantization="int8"`` the loader
then requantises every linear weight per output channel (``xds_jax.model.quant``), so a Q8_0
or Q4 file is held as 8 bits per weight. Q8_0's own 32-value block scales are not kept: the
matmul has one scale per output channel (block scales would need per-block int32 partial
sums, too many for prefill on XLA:CPU), which adds 0.8% relative RMS error to Q8_0's 0.56%
on SmolLM2's weights (docs/quantization.md). Q4 blocks are not kept as 4 bits: XLA:CPU has
no 4-bit dot, and a converted operand is materialised on every call.

llama.cpp stores Llama's Q and K rows permuted for its interleaved RoPE; they are permuted
back to the Hugging Face layout here.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from xds_jax.errors import UnsupportedModelError, WeightLoadError
from xds_jax.loading.gguf_fields import read_gguf_tensor_infos
from xds_jax.loading.weights import Leaf, transpose
from xds_jax.model.config import ModelConfig, RopeConfig

# GGUF architecture name -> Hugging Face model_type
_ARCHS = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


class GGUFSource:
    """Tensors of one GGUF file (memory-mapped), dequantised to float32 on request."""

    def __init__(self, path: Path):
        try:
            self.meta, infos, self._start = read_gguf_tensor_infos(path)
        except Exception as e:  # malformed headers raise several error types
            raise WeightLoadError(f"cannot read GGUF file {path}: {e}") from e
        self._infos = {t.name: t for t in infos}
        self._data = np.memmap(path, dtype=np.uint8, mode="r")

    def names(self):
        return self._infos.keys()

    def rope_freqs(self) -> np.ndarray | None:
        """``rope_freqs.weight`` (Llama 3.x's RoPE frequency divisors) if the file has it."""
        return self.get("rope_freqs.weight") if "rope_freqs.weight" in self._infos else None

    def quant_type(self, name: str) -> str:
        """The GGML storage type of tensor ``name`` (``"Q8_0"``, ``"Q4_1"``, ``"F32"``...)."""
        return gguf.GGMLQuantizationType(self._infos[name].ggml_type).name

    def linear_quant_types(self) -> set[str]:
        """Storage types of the layers' matrices (norms and biases aside)."""
        return {self.quant_type(n) for n, info in self._infos.items()
                if n.startswith("blk.") and len(info.shape) == 2}

    def shape(self, name: str) -> tuple[int, ...]:
        return self._infos[name].shape

    def get(self, name: str) -> np.ndarray:
        info = self._infos[name]
        qtype = gguf.GGMLQuantizationType(info.ggml_type)
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        rows = int(np.prod(info.shape[:-1], dtype=np.int64))
        row_bytes = info.shape[-1] // block * type_size
        begin = self._start + info.offset
        raw = self._data[begin : begin + rows * row_bytes].reshape(rows, row_bytes)
        out = gguf.quants.dequantize(np.asarray(raw), qtype)
        return np.asarray(out, np.float32).reshape(info.shape)


def config_from_gguf(meta: dict, tensor_names: set[str], source: str,
                     rope_freqs: np.ndarray | None = None,
                     embedding_rows: int | None = None) -> ModelConfig:
    """``ModelConfig`` from GGUF metadata; the LM head is tied when ``output.weight`` is absent.

    ``rope_freqs`` is the file's ``rope_freqs.weight`` (llama.cpp stores Llama 3.x's RoPE
    scaling as per-frequency divisors, not as metadata), when it has one.
    """
    arch = meta.get("general.architecture")
    if arch not in _ARCHS:
        raise UnsupportedModelError(
            f"{source}: GGUF architecture {arch!r} is not supported (supported: {sorted(_ARCHS)})"
        )
    experts = meta.get(f"{arch}.expert_count") or 0
    if experts:
        raise UnsupportedModelError(
            f"{source}: GGUF mixture-of-experts models ({arch}.expert_count {experts}) are not "
            "supported; load the Hugging Face checkpoint instead"
        )

    def field(name: str, default=None):
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise WeightLoadError(f"{source}: GGUF metadata lacks {arch}.{name}")
        return value

    hidden = int(field("embedding_length"))
    heads = int(field("attention.head_count"))
    head_dim = int(meta.get(f"{arch}.attention.key_length", hidden // heads))
    vocab = (meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))
             or embedding_rows or 0)
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return ModelConfig(
        model_type=_ARCHS[arch],
        vocab_size=int(vocab),
        hidden_size=hidden,
        num_layers=int(field("block_count")),
        num_heads=heads,
        num_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv", heads)),
        head_dim=head_dim,
        intermediate_size=int(field("feed_forward_length")),
        max_position_embeddings=int(field("context_length")),
        rms_norm_eps=float(field("attention.layer_norm_rms_epsilon")),
        rope=_gguf_rope(meta, arch, source, rope_freqs),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        attention_out_bias="blk.0.attn_output.bias" in tensor_names,
        qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
        dtype="float32",
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (int(eos),),
    )


def _gguf_rope(meta: dict, arch: str, source: str, rope_freqs) -> RopeConfig:
    """RoPE from ``{arch}.rope.*`` metadata (none / linear / yarn scaling) and ``rope_freqs``."""
    theta = float(meta.get(f"{arch}.rope.freq_base", 10000.0))
    kind = str(meta.get(f"{arch}.rope.scaling.type", "none"))
    factor = float(meta.get(f"{arch}.rope.scaling.factor", 1.0) or 1.0)
    original = meta.get(f"{arch}.rope.scaling.original_context_length")
    factors = None if rope_freqs is None else tuple(float(f) for f in np.ravel(rope_freqs))
    if kind == "none" or factor == 1.0:
        return RopeConfig(theta=theta, freq_factors=factors)
    if kind == "linear":
        return RopeConfig(theta=theta, type="linear", factor=factor, freq_factors=factors)
    if kind == "yarn" and original:
        return RopeConfig(theta=theta, type="yarn", factor=factor,
                          original_max_position_embeddings=int(original), freq_factors=factors)
    raise UnsupportedModelError(f"{source}: GGUF {arch}.rope.scaling.type {kind!r} is not "
                                "supported (supported: none, linear, yarn with "
                                "original_context_length)")


def _unpermute(heads: int):
    """Undo llama.cpp's Q/K row permutation (per head: pairs interleaved -> halves)."""

    def undo(w: np.ndarray) -> np.ndarray:
        rows = w.shape[0]
        w = w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2)
        return transpose(w.reshape(rows, *w.shape[3:]))

    return undo


def gguf_keymap(cfg: ModelConfig, shapes: dict) -> dict:
    """Key map tree for a GGUF checkpoint with the layout of ``shapes``."""
    permute = cfg.model_type == "llama"
    q_fix = _unpermute(cfg.num_heads) if permute else transpose
    k_fix = _unpermute(cfg.num_kv_heads) if permute else transpose
    names = {"q": ("attn_q.weight", q_fix), "k": ("attn_k.weight", k_fix),
             "v": ("attn_v.weight", transpose), "o": ("attn_output.weight", transpose),
             "q_bias": ("attn_q.bias", None), "k_bias": ("attn_k.bias", None),
             "v_bias": ("attn_v.bias", None), "o_bias": ("attn_output.bias", None),
             "q_norm": ("attn_q_norm.weight", None), "k_norm": ("attn_k_norm.weight", None)}

    def layer(i: int, s: dict) -> dict:
        p = f"blk.{i}"
        attn = {}
        for key in s["attn"]:
            name, fix = names[key]
            if permute and key in ("q_bias", "k_bias"):
                raise UnsupportedModelError("GGUF Llama with attention biases is not supported")
            attn[key] = Leaf((f"{p}.{name}",), fix) if fix else Leaf((f"{p}.{name}",))
        return {
            "input_norm": Leaf((f"{p}.attn_norm.weight",)),
            "post_norm": Leaf((f"{p}.ffn_norm.weight",)),
            "attn": attn,
            "mlp": {k: Leaf((f"{p}.ffn_{k}.weight",), transpose) for k in ("gate", "up", "down")},
        }

    out = {
        "embed": Leaf(("token_embd.weight",)),
        "final_norm": Leaf(("output_norm.weight",)),
        "layers": [layer(i, s) for i, s in enumerate(shapes["layers"])],
    }
    if "lm_head" in shapes:
        out["lm_head"] = Leaf(("output.weight",), transpose)
    return out

