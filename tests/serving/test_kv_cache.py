"""BlockManager: reference counts, hash-chained prefix caching, LRU eviction, accounting."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serving.core.kv_cache import BlockManager, KVCacheError, block_hashes


def _check(bm: BlockManager) -> None:
    """Every block is either referenced or free (cached or not), never both; refs add up."""
    refs = [0] * bm.num_blocks
    for table in bm._tables.values():
        for b in table:
            refs[b] += 1
    assert refs == bm._ref
    free = set(bm._free) | set(bm._evictable)
    assert len(free) == len(bm._free) + len(bm._evictable) == bm.num_free_blocks
    assert free == {b for b in range(bm.num_blocks) if refs[b] == 0}
    assert all(bm._hash[b] is not None for b in bm._evictable)
    assert all(bm._hash[b] is None for b in bm._free)
    assert {h: b for b, h in enumerate(bm._hash) if h is not None} == bm._cache


def test_allocate_without_cache_hit_reserves_blocks_for_new_tokens():
    bm = BlockManager(8, 4)
    assert bm.can_allocate(0, list(range(10)), 10)
    assert bm.allocate(0, list(range(10))) == 0
    assert len(bm.block_table(0)) == 3
    assert bm.num_free_blocks == 5 and bm.usage == pytest.approx(3 / 8)
    assert bm.allocate(1, list(range(10)), 5) == 0  # first chunk only
    assert len(bm.block_table(1)) == 2
    _check(bm)


def test_prefix_hit_needs_computed_full_blocks_and_shares_them():
    bm = BlockManager(16, 4)
    prompt = list(range(11))
    bm.allocate(0, prompt)
    assert bm.num_cached_tokens(prompt) == 0  # nothing computed yet
    bm.mark_computed(0, prompt, 11)
    assert bm.num_cached_blocks == 2  # the partial third block is not registered
    assert bm.allocate(1, prompt + [99]) == 8
    assert bm.block_table(1)[:2] == bm.block_table(0)[:2]
    assert [bm.ref_count(b) for b in bm.block_table(1)] == [2, 2, 1]
    assert bm.prefix_hit_tokens == 8 and bm.prefix_query_tokens == 11 + 12
    _check(bm)


def test_prefix_hit_never_covers_the_whole_prompt():
    bm = BlockManager(16, 4)
    prompt = list(range(8))
    bm.allocate(0, prompt)
    bm.mark_computed(0, prompt, 8)
    assert bm.num_cached_blocks == 2
    assert bm.allocate(1, prompt) == 4  # one full block left to compute for the logits
    assert bm.allocate(2, prompt[:4]) == 0


def test_hash_is_chained_on_the_parent_block():
    bm = BlockManager(16, 2)
    bm.allocate(0, [1, 2, 3, 4, 5])
    bm.mark_computed(0, [1, 2, 3, 4, 5], 5)
    assert bm.num_cached_tokens([9, 9, 3, 4, 5]) == 0  # same second block, other parent
    assert bm.num_cached_tokens([1, 2, 3, 9, 5]) == 2
    assert block_hashes([1, 2, 3, 4, 5], 2) == block_hashes([1, 2, 3, 4], 2)
    assert block_hashes([1, 2, 3, 4], 2)[1] != block_hashes([9, 9, 3, 4], 2)[1]


def test_freed_cached_blocks_are_revived_then_evicted_lru():
    bm = BlockManager(4, 2)
    a, b = [1, 2, 3], [5, 6, 7]
    for sid, p in ((0, a), (1, b)):
        bm.allocate(sid, p)
        bm.mark_computed(sid, p, 3)
    bm.free(0)
    bm.free(1)
    assert bm.num_free_blocks == 4 and bm.num_cached_blocks == 2
    _check(bm)
    # Revive a's block from the free LRU list: it leaves the free count.
    assert bm.allocate(2, a) == 2
    assert bm.num_free_blocks == 2 and bm.ref_count(bm.block_table(2)[0]) == 1
    bm.free(2)  # a's block is now the most recently used
    # Three new blocks: two never-cached ones first, then b's block (older) is evicted.
    bm.allocate(3, [8] * 6)
    assert bm.num_cached_tokens(b) == 0 and bm.num_cached_tokens(a) == 2
    _check(bm)


def test_can_allocate_counts_revived_blocks_and_allocate_refuses_when_full():
    bm = BlockManager(3, 2)
    bm.allocate(0, [1, 2, 3])
    bm.mark_computed(0, [1, 2, 3], 3)
    bm.free(0)
    bm.allocate(1, [7, 7])  # takes one of the never-cached blocks, 2 free left (1 cached)
    assert bm.can_allocate(2, [1, 2, 3, 4, 5], 2)  # revive 1 + 1 new = 2
    assert not bm.can_allocate(2, [1, 2, 3, 4, 5], 3)  # revive 1 + 2 new = 3
    with pytest.raises(KVCacheError):
        bm.allocate(2, [1, 2, 3, 4, 5, 6])
    assert 2 not in bm
    _check(bm)


def test_append_grows_table_across_block_boundaries():
    bm = BlockManager(4, 4)
    tokens = list(range(3))
    bm.allocate(0, tokens)
    for t in range(3, 9):
        tokens.append(t)
        assert bm.can_append(0, 1)
        bm.append(0, tokens, 1)
        assert len(bm.block_table(0)) == -(-len(tokens) // 4)
    assert bm.num_free_blocks == 1
    assert not bm.can_append(0, 8)
    with pytest.raises(KVCacheError):
        bm.append(0, tokens, 1)  # no token to reserve a slot for


def test_same_content_computed_twice_is_registered_once():
    bm = BlockManager(8, 2)
    for sid in (0, 1):
        bm.allocate(sid, [4, 5, 6])
    for sid in (0, 1):
        bm.mark_computed(sid, [4, 5, 6], 3)
    assert bm.num_cached_blocks == 1
    bm.free(0)
    bm.free(1)
    assert len(bm._evictable) == 1 and bm.num_free_blocks == 8
    _check(bm)


def test_double_free_and_disabled_cache():
    bm = BlockManager(8, 2, enable_prefix_caching=False)
    bm.allocate(0, [1, 2, 3])
    bm.mark_computed(0, [1, 2, 3], 3)
    assert bm.num_cached_blocks == 0 and bm.num_cached_tokens([1, 2, 3]) == 0
    bm.free(0)
    with pytest.raises(KeyError):
        bm.free(0)
    assert bm.num_free_blocks == 8


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["alloc", "grow", "compute", "free"]),
                          st.integers(0, 5), st.integers(1, 9), st.integers(0, 3)),
                max_size=60))
def test_random_operations_keep_the_pool_consistent(ops):
    bm = BlockManager(10, 3)
    prefixes = [[1] * 9, [2] * 9, [1] * 6 + [3] * 3, [4, 5, 6, 7]]
    tokens: dict[int, list[int]] = {}
    for op, sid, n, which in ops:
        if op == "alloc" and sid not in bm:
            prompt = prefixes[which][:n] or [0]
            new = max(1, len(prompt) - bm.num_cached_tokens(prompt))
            if bm.can_allocate(sid, prompt, new):
                cached = bm.allocate(sid, prompt, new)
                assert cached % 3 == 0 and cached < len(prompt)
                tokens[sid] = prompt
        elif op == "grow" and sid in bm:
            tokens[sid] = tokens[sid] + [n] * n
            room = len(tokens[sid]) - bm.num_reserved_tokens(sid)
            if bm.can_append(sid, room):
                bm.append(sid, tokens[sid], room)
        elif op == "compute" and sid in bm:
            bm.mark_computed(sid, tokens[sid], bm.num_reserved_tokens(sid))
        elif op == "free" and sid in bm:
            bm.free(sid)
        _check(bm)
        assert min(bm._ref) >= 0
    for sid in list(tokens):
        if sid in bm:
            bm.free(sid)
    assert bm.num_free_blocks == 10 and bm.usage == 0
    _check(bm)


def test_a_waiting_prompt_is_hashed_once_however_often_it_is_looked_up(monkeypatch):
    """The scheduler looks a waiting prompt's prefix up every step it waits, then twice more
    to admit it; with ``seq_id`` the chained hashes are remembered (tokens only grow), so each
    block is hashed once. Lookups give what they give without the memory."""
    import serving.core.kv_cache as kv

    calls = []
    real = kv.hash_block
    monkeypatch.setattr(kv, "hash_block", lambda p, t: calls.append(1) or real(p, t))
    bm = BlockManager(16, 4)
    shared = list(range(12))
    bm.allocate(0, shared + [99])
    bm.mark_computed(0, shared + [99], 13)  # three full blocks cached
    calls.clear()
    prompt = shared + [7, 8, 9, 10, 11]
    for _ in range(5):  # waiting
        assert bm.num_cached_tokens(prompt, seq_id=1) == 12
    assert bm.can_allocate(1, prompt, 5) and bm.allocate(1, prompt, 5) == 12
    assert len(calls) == 4  # the three cached blocks, and the first that missed
    assert bm.num_cached_tokens(prompt, b"salt", seq_id=1) == 0  # another salt: another chain
    assert bm.num_cached_tokens(prompt) == 12  # no seq_id: hashed afresh, the same answer
    bm.free(1)
    assert 1 not in bm._chains
    _check(bm)
