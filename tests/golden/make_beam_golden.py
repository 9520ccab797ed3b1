"""Golden beam searches of the tiny Llama with Hugging Face transformers, for
tests/xds_jax/test_beam_search.py (which reads the JSON only, never torch).

    /tmp/golden/bin/python tests/golden/make_beam_golden.py

Writes ``llama/beam_search.json``: for each prompt, ``generate(num_beams=3,
num_return_sequences=3, max_new_tokens=6, do_sample=False, length_penalty=1.0,
eos_token_id=None)`` in float32: the 3 sequences (prompt and generated ids, best first) and
their ``sequences_scores`` (the summed log-probability over the 6 generated tokens). No beam can
end (no end-of-sequence token), which is where transformers' and vLLM's beam searches agree.
"""

import json
from pathlib import Path

import torch
import transformers as tf

ROOT = Path(__file__).parent
PROMPTS = [[1, 5, 9, 13], [1, 7], [1, 40, 41, 42, 43, 44, 45, 46, 47, 48]]


def main() -> None:
    model = tf.AutoModelForCausalLM.from_pretrained(ROOT / "llama", dtype=torch.float32).eval()
    cases = []
    with torch.no_grad():
        for prompt in PROMPTS:
            out = model.generate(torch.tensor([prompt]), num_beams=3, num_return_sequences=3,
                                 max_new_tokens=6, do_sample=False, length_penalty=1.0,
                                 eos_token_id=None, pad_token_id=0,
                                 return_dict_in_generate=True, output_scores=True)
            cases.append({"prompt": prompt, "sequences": out.sequences.tolist(),
                          "sequences_scores": out.sequences_scores.tolist()})
    (ROOT / "llama" / "beam_search.json").write_text(json.dumps(cases, indent=1) + "\n")


if __name__ == "__main__":
    main()
