"""One KV block and the LRU free queue over blocks: the plain-Python units :class:`ryzlab.kv.blocks.BlockPool` manages.

A :class:`KVBlock` is bookkeeping only (id, reference count, prefix hash, free-queue links): the
bytes it stands for live in :class:`ryzlab.kv.pages.PagedTensor` at the block's page slot. Named
``KVBlock`` because the package has other blocks (a transformer block, a sweep spec block).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

__all__ = ["KVBlock", "BlockHash", "FreeBlockQueue"]

BlockHash = bytes
"""Chained prefix hash of a full block (see :func:`ryzlab.kv.blocks.hash_block`)."""


@dataclass(eq=False)
class KVBlock:
    """One page of ``block_size`` token slots. ``ref_cnt`` sequences point at it."""

    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None
    """Set while the block is registered in the prefix cache (full blocks only)."""
    prev_free: KVBlock | None = field(default=None, repr=False)
    next_free: KVBlock | None = field(default=None, repr=False)


class FreeBlockQueue:
    """Free blocks as a doubly linked list, least recently freed first (eviction order).

    Not a ``collections.deque``: when a new prompt hits a cached block that is free
    (``ref_cnt == 0``), that block must leave the queue from the *middle*. The links live in
    the blocks themselves, so ``remove`` is O(1); a deque would need O(n) ``remove``.
    """

    def __init__(self, blocks: Sequence[KVBlock] = ()):
        self._head = KVBlock(-1)  # sentinels: no special cases for the ends
        self._tail = KVBlock(-1)
        self._head.next_free, self._tail.prev_free = self._tail, self._head
        self._len = 0
        for b in blocks:
            self.append(b)

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[KVBlock]:
        b = self._head.next_free
        while b is not self._tail:
            assert b is not None, "free queue broken: dangling link"
            yield b
            b = b.next_free

    def __contains__(self, block: KVBlock) -> bool:
        return block.prev_free is not None

    def append(self, block: KVBlock) -> None:
        assert block.prev_free is None and block.next_free is None, \
            f"block {block.block_id} appended to the free queue twice"
        last = self._tail.prev_free
        assert last is not None
        last.next_free, block.prev_free = block, last
        block.next_free, self._tail.prev_free = self._tail, block
        self._len += 1

    def popleft(self) -> KVBlock:
        if not self._len:
            raise IndexError("free queue is empty")
        b = self._head.next_free
        assert b is not None
        self.remove(b)
        return b

    def remove(self, block: KVBlock) -> None:
        prev, nxt = block.prev_free, block.next_free
        assert prev is not None and nxt is not None, f"block {block.block_id} is not in the free queue"
        prev.next_free, nxt.prev_free = nxt, prev
        block.prev_free = block.next_free = None
        self._len -= 1
