"""transformers' default configuration of each supported architecture, as ``config.json``
would hold it, written to ``default_configs.json`` for ``tests/xds_jax/test_config_defaults.py``.

A config on the Hub names only some fields; the rest are these defaults, which the loader must
read as transformers does. Run with the golden venv: ``python tests/golden/default_configs.py``.
"""

import json
from pathlib import Path

import transformers as tf

CLASSES = ["LlamaConfig", "MistralConfig", "Qwen2Config", "Qwen3Config", "Phi3Config",
           "GraniteConfig", "SmolLM3Config", "GemmaConfig", "Gemma2Config", "Gemma3TextConfig",
           "Olmo2Config", "Olmo3Config", "MixtralConfig", "Qwen2MoeConfig", "Qwen3MoeConfig",
           "OlmoeConfig", "GraniteMoeConfig", "GraniteMoeSharedConfig", "DeepseekV2Config",
           "DeepseekV3Config", "Glm4Config", "Glm4MoeConfig",
           "Ernie4_5Config", "Dots1Config", "SeedOssConfig",
           "Ernie4_5_MoeConfig", "Exaone4Config", "Glm4MoeLiteConfig",
           "MiniMaxM2Config", "InternLM3Config"]


def main() -> None:
    configs = {name: json.loads(getattr(tf, name)().to_json_string()) for name in CLASSES}
    out = Path(__file__).with_name("default_configs.json")
    out.write_text(json.dumps({"transformers": tf.__version__, "configs": configs}, indent=1,
                              sort_keys=True) + "\n")
    print(f"wrote {out} ({len(configs)} configs)")


if __name__ == "__main__":
    main()
