"""vLLM's ``cache_salt``: cached KV blocks are shared only between sequences of the same salt
(one tenant cannot time another's prompts through prefix-cache hits), in the block manager,
through ``LLM.generate`` prompt dicts and the server's ``cache_salt`` field; outputs are the
same whatever the salt."""

from __future__ import annotations

import httpx
import pytest

from serving.core.kv_cache import BlockManager, block_hashes, chain_root
from tests.helpers import GOLDEN
from tests.serving.real_server import text_server_fixture
from tests.serving.test_engine import params_for, reference, workload
from xds_jax import LLM, BeamSearchParams
from xds_jax.errors import SamplingParamsError
from xds_jax.sequence import salt_bytes

PROMPT = list(range(1, 12))


def cached_after(first: bytes, second: bytes) -> int:
    """Tokens the second sequence finds cached after the first computed the same prompt."""
    bm = BlockManager(16, 2)
    bm.allocate(0, PROMPT, salt=first)
    bm.mark_computed(0, PROMPT, len(PROMPT))
    return bm.allocate(1, PROMPT, salt=second)


def test_blocks_are_shared_within_a_salt_only():
    assert cached_after(b"", b"") == 10 and cached_after(b"t1", b"t1") == 10
    assert cached_after(b"t1", b"t2") == 0
    assert cached_after(b"", b"t1") == 0 and cached_after(b"t1", b"") == 0
    assert block_hashes(PROMPT, 2, b"t1")[0] != block_hashes(PROMPT, 2)[0]
    assert block_hashes(PROMPT, 2, b"") == block_hashes(PROMPT, 2)  # unsalted: as before
    assert chain_root(b"") == b"" and chain_root(b"a") != chain_root(b"b")


def test_a_salt_is_a_non_empty_string():
    assert salt_bytes(None) == b"" and salt_bytes("é") == "é".encode()
    for bad in ("", 5, b"x"):
        with pytest.raises(SamplingParamsError, match="^cache_salt must be a non-empty string"):
            salt_bytes(bad)


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(str(GOLDEN / "llama"), dtype="float32", max_num_seqs=4,
               max_num_batched_tokens=64, staged=True, use_param_cache=False)


def test_generate_shares_the_prefix_cache_by_salt(llm):
    bm = llm.engine.groups[0].blocks
    prompts = workload(llm.cfg.vocab_size, 1, seed=5)
    want = reference(llm, prompts)[0]
    whole = (len(prompts[0]) - 1) // bm.block_size * bm.block_size  # full blocks, one token left

    def hits(salt: str | None) -> int:
        before = bm.prefix_hit_tokens
        prompt = {"prompt_token_ids": prompts[0]} | ({"cache_salt": salt} if salt else {})
        [out] = llm.generate(prompt, params_for(0))
        assert out.outputs[0].token_ids == want
        return bm.prefix_hit_tokens - before

    assert hits("alice") == 0
    assert hits("bob") == 0  # the same prompt under another salt: computed again
    assert hits(None) == 0
    assert whole > 0 and hits("alice") == hits("bob") == hits(None) == whole  # own salt's blocks
    with pytest.raises(SamplingParamsError, match="cache_salt"):
        llm.generate({"prompt_token_ids": prompts[0], "cache_salt": ""}, params_for(0))


def test_beam_search_rounds_keep_the_prompt_s_salt(llm):
    bm = llm.engine.groups[0].blocks
    prompt = workload(llm.cfg.vocab_size, 2, seed=6)[1]
    llm.generate({"prompt_token_ids": prompt}, params_for(0))  # unsalted blocks cached
    one_round = BeamSearchParams(beam_width=1, max_tokens=1)

    def hits(**salt) -> int:
        before = bm.prefix_hit_tokens
        llm.beam_search({"prompt_token_ids": prompt} | salt, one_round)
        return bm.prefix_hit_tokens - before

    assert hits(cache_salt="carol") == 0
    assert hits() > 0 and hits(cache_salt="carol") > 0  # each finds its own salt's blocks
    with pytest.raises(SamplingParamsError, match="cache_salt"):
        llm.beam_search({"prompt_token_ids": prompt, "cache_salt": ""}, one_round)


server = text_server_fixture()


def test_the_server_takes_cache_salt(server):
    groups = server.engine.engine.groups
    body = {"prompt": "x" * 40, "max_tokens": 2, "temperature": 0}

    def hit_tokens(**fields) -> int:
        before = sum(g.blocks.prefix_hit_tokens for g in groups)
        with httpx.Client(base_url=server.url, timeout=60) as client:
            reply = client.post("/v1/completions", json=body | fields)
        assert reply.status_code == 200, reply.text
        return sum(g.blocks.prefix_hit_tokens for g in groups) - before

    hit_tokens(cache_salt="tenant-a")
    assert hit_tokens(cache_salt="tenant-b") == 0
    assert hit_tokens(cache_salt="tenant-a") > 0
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for route, fields in (("/v1/completions", body),
                              ("/v1/chat/completions",
                               {"messages": [{"role": "user", "content": "hi"}]}),
                              ("/v1/responses", {"input": "hi"})):
            refused = client.post(route, json=fields | {"cache_salt": ""})
            assert refused.status_code == 400, refused.text
            assert refused.json()["error"]["param"] == "cache_salt"
