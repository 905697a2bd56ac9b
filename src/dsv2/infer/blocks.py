"""The block allocator: which cache blocks are free, who references them, which hold known prefixes.

Pure Python, no torch: it moves integers. A block holds `block_size` consecutive tokens' latents of one
sequence. Full blocks are registered under a hash of (parent block's hash, the block's token ids), so a
new sequence whose prompt starts with the same tokens reuses them (prefix caching). A block whose
reference count drops to zero goes back to the free list but keeps its contents and hash until it is
handed out again: freed prefixes stay reusable, least recently freed evicted first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


def block_hashes(token_ids: Sequence[int], block_size: int, num_blocks: int) -> list[int]:
    """Chained hashes of the first `num_blocks` full blocks of `token_ids`."""
    hashes, parent = [], 0
    for b in range(num_blocks):
        # ints and tuples of ints hash deterministically in CPython (no per-process salt)
        parent = hash((parent, tuple(token_ids[b * block_size:(b + 1) * block_size])))
        hashes.append(parent)
    return hashes


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"need positive num_blocks and block_size, got {num_blocks} and {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.prefix_caching = prefix_caching
        self.ref_counts = [0] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # eviction order
        self._hash_of: list[int | None] = [None] * num_blocks
        self._by_hash: dict[int, int] = {}
        self.hits = 0  # blocks reused from the prefix cache (for metrics)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        """n fresh blocks (reference count 1), evicting the least recently freed cached prefixes."""
        if n > len(self._free):
            raise MemoryError(f"{n} blocks requested, {len(self._free)} free")
        blocks = []
        for _ in range(n):
            block, _ = self._free.popitem(last=False)
            h = self._hash_of[block]
            if h is not None:
                del self._by_hash[h]
                self._hash_of[block] = None
            self.ref_counts[block] = 1
            blocks.append(block)
        return blocks

    def free(self, blocks: Sequence[int]) -> None:
        # Tail blocks first: a sequence's last blocks are the least likely to be shared, so evict them first.
        for block in reversed(blocks):
            if self.ref_counts[block] <= 0:
                raise RuntimeError(f"block {block} freed more often than referenced")
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self._free[block] = None

    def match_prefix(self, hashes: Sequence[int]) -> list[int]:
        """Take a reference on the longest run of cached blocks matching `hashes` from the start."""
        if not self.prefix_caching:
            return []
        blocks = []
        for h in hashes:
            block = self._by_hash.get(h)
            if block is None:
                break
            if self.ref_counts[block] == 0:
                del self._free[block]
            self.ref_counts[block] += 1
            blocks.append(block)
        self.hits += len(blocks)
        return blocks

    def register(self, block: int, h: int) -> None:
        """Record that `block` now holds the full block of tokens hashed `h`."""
        if self.prefix_caching and h not in self._by_hash and self._hash_of[block] is None:
            self._by_hash[h] = block
            self._hash_of[block] = h

    def clear_prefix_cache(self) -> None:
        """Forget every cached prefix (e.g. after the model's weights changed, which makes their latents stale).
        Blocks in use stay allocated; only the hash table is emptied."""
        self._by_hash.clear()
        self._hash_of = [None] * self.num_blocks

    def check_invariants(self) -> None:
        """Every block is either free (reference count 0) or referenced, never both; hashes are consistent."""
        for block, count in enumerate(self.ref_counts):
            if count < 0 or (count == 0) != (block in self._free):
                raise AssertionError(f"block {block}: reference count {count}, free={block in self._free}")
        for h, block in self._by_hash.items():
            if self._hash_of[block] != h:
                raise AssertionError(f"hash table points {h} at block {block}, which holds {self._hash_of[block]}")
