"""A server over the real engine that takes text: the tiny golden Llama with a byte tokenizer
over its vocabulary and a ChatML template (no model download, compiles in seconds)."""

from __future__ import annotations

import pytest

from tests.serving.fake_engine import serve

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def text_server_fixture(**engine_args):
    """A module-scoped pytest fixture yielding the running server (``.engine``, ``.url``)."""

    @pytest.fixture(scope="module")
    def server():
        from serving.core import async_engine as engines
        from tests.helpers import GOLDEN
        from xds_jax.text.byte_tokenizer import byte_tokenizer

        args = dict(model=str(GOLDEN / "llama"), dtype="float32", max_num_seqs=8,
                    kv_cache_bytes=8 << 20) | engine_args
        engine = engines.AsyncEngine.from_args(engines.EngineArgs(**args))
        tokenizer = byte_tokenizer(engine.llm.cfg)
        tokenizer.chat_template = CHATML
        engine.tokenizer = engine.llm.tokenizer = tokenizer
        engine.start()
        try:
            with serve(engine) as running:
                running.engine = engine
                yield running
        finally:
            engine.shutdown()

    return server
