"""Host-side bookkeeping of paged KV blocks: reference counts and hash-chained prefix caching.

Block ids ``0 .. num_blocks - 1`` index the device KV pages; this module only decides which
sequence owns which page. A FULL block whose KV has been computed is registered under the hash
of (parent block hash, its token ids), so a later prompt with the same prefix reuses the page
(reference count > 1). Freed registered blocks stay cached and are evicted least recently used
first, only when no never-cached free block is left. A sequence's ``salt`` (vLLM's
``cache_salt``) roots its chain elsewhere: only sequences of the same salt share blocks, so one
tenant cannot learn from cache hits what another's prompts were. No JAX here.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import Counter, OrderedDict, deque
from collections.abc import Sized
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from xds_jax.sequence import TokenView

    TokenIds = list[int] | TokenView


class KVCacheError(RuntimeError):
    """The block manager was asked for something its state does not allow."""


def hash_block(parent: bytes, token_ids: list[int]) -> bytes:
    """Hash of one full block chained to its parent's hash (``b""`` for the first block)."""
    return hashlib.sha256(parent + array("q", token_ids).tobytes()).digest()


def chain_root(salt: bytes = b"") -> bytes:
    """The parent hash of a chain's first block: ``b""``, or one of the salt's own."""
    return hashlib.sha256(b"cache_salt\0" + salt).digest() if salt else b""


def block_hashes(token_ids: list[int], block_size: int, salt: bytes = b"") -> list[bytes]:
    """Chained hashes of every full block of ``token_ids``, stable across processes."""
    hashes, parent = [], chain_root(salt)
    for i in range(len(token_ids) // block_size):
        parent = hash_block(parent, token_ids[i * block_size:(i + 1) * block_size])
        hashes.append(parent)
    return hashes


MAX_CHAINS = 256  # sequences whose prefix hashes a block manager remembers


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockManager:
    """Paged KV blocks with reference counts and an LRU prefix cache.

    Per sequence it keeps a block table, the number of token slots reserved, and how many
    leading full blocks have been hashed. Call order for one sequence: ``can_allocate`` then
    ``allocate`` (first chunk), then per step ``can_append`` then ``append`` (next chunk or one
    decode token), ``mark_computed`` once the step's KV is written, and finally ``free``.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref = [0] * num_blocks
        self._hash: list[bytes | None] = [None] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))  # free, holding no cached KV
        self._evictable: OrderedDict[int, None] = OrderedDict()  # free but cached, LRU first
        self._cache: dict[bytes, int] = {}
        self._tables: dict[int, list[int]] = {}
        self._reserved: dict[int, int] = {}  # token slots covered by the table
        self._hashed: dict[int, tuple[int, bytes]] = {}  # (full blocks registered, last hash)
        # seq id -> (salt, its leading blocks' chained hashes as far as lookups went): a
        # sequence's tokens only grow, so a waiting prompt is not hashed again each step
        self._chains: OrderedDict[int, tuple[bytes, list[bytes]]] = OrderedDict()
        self.prefix_hit_tokens = 0
        self.prefix_query_tokens = 0

    # -- state --------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence references, cached ones included (they can be evicted)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks registered in the prefix cache, referenced or not."""
        return len(self._cache)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by at least one sequence."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def ref_count(self, block_id: int) -> int:
        return self._ref[block_id]

    def block_table(self, seq_id: int) -> list[int]:
        """Physical block ids of the sequence, in position order (a copy)."""
        return list(self._tables[seq_id])

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._tables

    # -- prefix lookup ------------------------------------------------------------------------
    def _match(self, token_ids: TokenIds, salt: bytes = b"", seq_id: int | None = None
               ) -> list[int]:
        """Cached blocks of the longest computed prefix, leaving at least one token to compute
        (``seq_id``: the hashes computed for that sequence before are reused)."""
        if not self.enable_prefix_caching:
            return []
        chain = self._chain(seq_id, salt)
        hits, parent, bs = [], chain[-1] if chain else chain_root(salt), self.block_size
        for i in range((len(token_ids) - 1) // bs):
            if i == len(chain):
                parent = hash_block(parent, token_ids[i * bs:(i + 1) * bs])
                chain.append(parent)
            block = self._cache.get(chain[i])
            if block is None:
                break
            hits.append(block)
        return hits

    def _chain(self, seq_id: int | None, salt: bytes) -> list[bytes]:
        """The remembered hashes of a sequence's leading blocks (a new list to fill)."""
        if seq_id is None:
            return []
        kept = self._chains.pop(seq_id, None)
        chain = kept[1] if kept is not None and kept[0] == salt else []
        self._chains[seq_id] = (salt, chain)
        while len(self._chains) > MAX_CHAINS:
            self._chains.popitem(last=False)
        return chain

    def num_cached_tokens(self, token_ids: TokenIds, salt: bytes = b"",
                          seq_id: int | None = None) -> int:
        """Prompt tokens ``allocate`` would find cached now (a multiple of ``block_size``)."""
        return len(self._match(token_ids, salt, seq_id)) * self.block_size

    # -- allocation ---------------------------------------------------------------------------
    def can_allocate(self, seq_id: int, token_ids: TokenIds, num_new_tokens: int,
                     salt: bytes = b"") -> bool:
        """Whether a new sequence can get blocks for its cached prefix plus ``num_new_tokens``."""
        if seq_id in self._tables:
            raise KVCacheError(f"sequence {seq_id} already holds blocks")
        return self.fewest_to_free([], token_ids, num_new_tokens, salt, seq_id=seq_id) == 0

    def fewest_to_free(self, candidates: list[int], token_ids: TokenIds, num_new_tokens: int,
                       salt: bytes = b"", at_least: int = 0, seq_id: int | None = None
                       ) -> int | None:
        """The fewest leading ``candidates`` (sequence ids, at least ``at_least`` of them) whose
        freeing lets ``can_allocate`` hold: the blocks only they hold come free, and a cached
        prefix block among them must be taken back off the free list. None where all of them
        would not do. The prefix is looked up once, the blocks counted as candidates add
        (``seq_id``: the sequence asking, whose hashes are remembered)."""
        hits = self._match(token_ids, salt, seq_id)
        needed = _cdiv(len(hits) * self.block_size + num_new_tokens, self.block_size) - len(hits)
        holders: Counter[int] = Counter()
        gone: set[int] = set()  # blocks the candidates so far are the only holders of
        for count in range(len(candidates) + 1):
            if count:
                for block in self._tables[candidates[count - 1]]:
                    holders[block] += 1
                    if holders[block] == self._ref[block]:
                        gone.add(block)
            if count >= at_least:
                revived = sum(1 for b in hits if self._ref[b] == 0 or b in gone)
                if needed + revived <= self.num_free_blocks + len(gone):
                    return count
        return None

    def allocate(self, seq_id: int, token_ids: TokenIds, num_new_tokens: int | None = None,
                 salt: bytes = b"") -> int:
        """Take blocks for a new sequence: cached prefix blocks plus room for new tokens.

        Args:
            seq_id: the sequence.
            token_ids: all its tokens so far (prompt, plus output after a preemption).
            num_new_tokens: tokens to compute in the first step; default all the uncached ones.
            salt: its cache salt (``chain_root``): it shares blocks with the same salt only.

        Returns:
            Number of leading tokens already cached (multiple of ``block_size``, < len).
        """
        hits = self._match(token_ids, salt, seq_id)
        cached = len(hits) * self.block_size
        if num_new_tokens is None:
            num_new_tokens = len(token_ids) - cached
        if not 0 < cached + num_new_tokens <= len(token_ids):
            raise KVCacheError(f"sequence {seq_id}: {num_new_tokens} new tokens after {cached} "
                               f"cached do not fit its {len(token_ids)} tokens")
        if not self.can_allocate(seq_id, token_ids, num_new_tokens, salt):
            raise KVCacheError(f"not enough free blocks for sequence {seq_id}")
        for block in hits:
            if self._ref[block] == 0:
                del self._evictable[block]
            self._ref[block] += 1
        self._tables[seq_id] = list(hits)
        self._reserved[seq_id] = cached
        self._hashed[seq_id] = (len(hits), self._hash[hits[-1]] if hits else chain_root(salt))
        self.prefix_hit_tokens += cached
        self.prefix_query_tokens += len(token_ids)
        self._grow(seq_id, num_new_tokens)
        return cached

    def can_append(self, seq_id: int, num_new_tokens: int) -> bool:
        """Whether the sequence's table can grow to cover ``num_new_tokens`` more tokens."""
        return self._blocks_for(seq_id, num_new_tokens) <= self.num_free_blocks

    def append(self, seq_id: int, token_ids_total: Sized, num_new_tokens: int,
               num_lookahead: int = 0) -> None:
        """Grow the table by ``num_new_tokens`` token slots (a decode token or a prefill chunk)
        plus ``num_lookahead`` slots past the known tokens (speculative drafts, given back by
        ``trim`` after the step).

        Args:
            seq_id: the sequence.
            token_ids_total: all its tokens (only their count is read); must include the new
                ones.
            num_new_tokens: slots to add after those already reserved.
            num_lookahead: extra slots for tokens not known yet.
        """
        if self._reserved[seq_id] + num_new_tokens > len(token_ids_total):
            raise KVCacheError(f"sequence {seq_id}: cannot reserve past its "
                               f"{len(token_ids_total)} tokens")
        if not self.can_append(seq_id, num_new_tokens + num_lookahead):
            raise KVCacheError(f"not enough free blocks to grow sequence {seq_id}")
        self._grow(seq_id, num_new_tokens + num_lookahead)

    def trim(self, seq_id: int, num_tokens: int) -> None:
        """Shrink the reservation to the first ``num_tokens`` slots (rejected speculative
        positions), freeing blocks past them. Hashed (registered) blocks are never trimmed."""
        if not 0 <= num_tokens <= self._reserved[seq_id]:
            raise KVCacheError(f"sequence {seq_id}: cannot trim {self._reserved[seq_id]} "
                               f"reserved slots to {num_tokens}")
        table = self._tables[seq_id]
        keep = max(_cdiv(num_tokens, self.block_size), self._hashed[seq_id][0])
        for block in reversed(table[keep:]):
            self._ref[block] -= 1
            if self._ref[block] == 0:
                self._free.append(block)
        del table[keep:]
        self._reserved[seq_id] = num_tokens

    def num_reserved_tokens(self, seq_id: int) -> int:
        """Token slots the sequence's table covers."""
        return self._reserved[seq_id]

    def _blocks_for(self, seq_id: int, num_new_tokens: int) -> int:
        total = self._reserved[seq_id] + num_new_tokens
        return max(0, _cdiv(total, self.block_size) - len(self._tables[seq_id]))

    def _grow(self, seq_id: int, num_new_tokens: int) -> None:
        table = self._tables[seq_id]
        for _ in range(self._blocks_for(seq_id, num_new_tokens)):
            table.append(self._take_free())
        self._reserved[seq_id] += num_new_tokens

    def _take_free(self) -> int:
        if self._free:
            block = self._free.popleft()
        else:
            block, _ = self._evictable.popitem(last=False)
            del self._cache[self._hash[block]]
            self._hash[block] = None
        self._ref[block] = 1
        return block

    # -- prefix registration ------------------------------------------------------------------
    def mark_computed(self, seq_id: int, token_ids: TokenIds, num_computed: int) -> None:
        """Register the sequence's full blocks whose KV is now written in the prefix cache.

        Args:
            seq_id: the sequence.
            token_ids: its tokens, at least the first ``num_computed`` (a list, or anything
                sliced the same way: ``Sequence.token_view``).
            num_computed: leading tokens whose KV the device has written.
        """
        if not self.enable_prefix_caching:
            return
        if num_computed > self._reserved[seq_id]:
            raise KVCacheError(f"sequence {seq_id}: {num_computed} computed tokens exceed its "
                               f"{self._reserved[seq_id]} reserved slots")
        table = self._tables[seq_id]
        done, parent = self._hashed[seq_id]
        bs = self.block_size
        for i in range(done, num_computed // bs):
            parent = hash_block(parent, token_ids[i * bs:(i + 1) * bs])
            block = table[i]
            # The same content computed twice (admitted in the same step) stays unregistered.
            if parent not in self._cache and self._hash[block] is None:
                self._cache[parent] = block
                self._hash[block] = parent
            done = i + 1
        self._hashed[seq_id] = (done, parent)

    # -- release ------------------------------------------------------------------------------
    def free(self, seq_id: int) -> None:
        """Drop the sequence's references; last-block-first so prefix heads are evicted last."""
        for block in reversed(self._tables.pop(seq_id)):
            if self._ref[block] <= 0:
                raise KVCacheError(f"block {block} freed more often than referenced")
            self._ref[block] -= 1
            if self._ref[block] == 0:
                if self._hash[block] is None:
                    self._free.append(block)
                else:
                    self._evictable[block] = None
        del self._reserved[seq_id], self._hashed[seq_id]
        self._chains.pop(seq_id, None)
