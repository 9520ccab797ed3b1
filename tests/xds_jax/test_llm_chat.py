"""``LLM.chat``'s vLLM options: a chat template of the caller's, tools rendered by it, and a
continued final message; on the tiny golden Llama with a byte tokenizer (it has no template)."""

import pytest

from tests.helpers import GOLDEN
from xds_jax import LLM, SamplingParams
from xds_jax.llm import InvalidPromptError
from xds_jax.text.byte_tokenizer import byte_tokenizer
from xds_jax.text.tokenizer import TokenizerError

CHATML = ("{% if tools %}<|tools|>{% for t in tools %}{{ t['function']['name'] }};{% endfor %}"
          "\n{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
          "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
          "{% endif %}")
TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {}}}]


@pytest.fixture(scope="module")
def llm():
    llm = LLM(str(GOLDEN / "llama"), dtype="float32", use_param_cache=False)
    llm.tokenizer = byte_tokenizer(llm.cfg)
    return llm


def test_chat_template_tools_and_continued_message(llm):
    hi = [{"role": "user", "content": "hi"}]
    with pytest.raises(TokenizerError, match="no chat template"):
        llm.chat(hi, SamplingParams(max_tokens=1))
    text, ids = llm.chat_prompt(hi, chat_template=CHATML)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert ids == llm.tokenizer.encode(text, add_special_tokens=False)
    text, _ = llm.chat_prompt(hi, chat_template=CHATML, tools=TOOLS)
    assert text.startswith("<|tools|>weather;<|im_start|>user")
    prefill = [*hi, {"role": "assistant", "content": "Sure, the"}]
    text, ids = llm.chat_prompt(prefill, add_generation_prompt=False, chat_template=CHATML,
                                continue_final_message=True)
    assert text.endswith("<|im_start|>assistant\nSure, the")
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    out = llm.chat(prefill, params, add_generation_prompt=False, chat_template=CHATML,
                   continue_final_message=True)[0]
    assert out.prompt_token_ids == ids
    assert out.outputs[0].token_ids == llm.generate(
        [{"prompt_token_ids": ids}], params)[0].outputs[0].token_ids
    with pytest.raises(InvalidPromptError, match="add_generation_prompt"):
        llm.chat(prefill, params, chat_template=CHATML, continue_final_message=True)
    with pytest.raises(TokenizerError, match="continue_final_message"):
        llm.chat([*hi, {"role": "assistant", "content": ""}], params,
                 add_generation_prompt=False, chat_template=CHATML,
                 continue_final_message=True)


def test_chat_takes_vllm_s_arguments_in_vllm_s_order(llm):
    """vLLM's ``LLM.chat(messages, sampling_params, use_tqdm, lora_request, chat_template,
    chat_template_content_format, add_generation_prompt, ...)``: a third positional argument
    is ``use_tqdm`` (it was ``add_generation_prompt``, so ``chat(msgs, params, False)``
    dropped the generation prompt)."""
    hi = [{"role": "user", "content": "hi"}]
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    positional = llm.chat(hi, params, False, None, CHATML, "openai")[0]
    named = llm.chat(hi, params, chat_template=CHATML)[0]
    assert positional.prompt == named.prompt == llm.chat_prompt(hi, chat_template=CHATML)[0]
    assert positional.outputs[0].token_ids == named.outputs[0].token_ids
    with pytest.raises(ValueError, match="chat_template_content_format must be"):
        llm.chat(hi, params, chat_template=CHATML, chat_template_content_format="xml")
