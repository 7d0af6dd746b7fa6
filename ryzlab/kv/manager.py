"""The paged cache's bookkeeping, no tensors: vLLM v1's ``KVCacheManager`` over its ``BlockPool``.

The scheduler (and the model-facing :class:`ryzlab.kv.cache.PagedKVCache`) asks here and gets an
answer without touching a tensor: room for new tokens (block ids, or None on shortage), the
prefix-cache hits of a prompt, each sequence's progress (tokens written vs pending), eviction of
the prefix cache and the capacity. The block pool (:class:`ryzlab.kv.blocks.BlockPool`) keeps the
blocks, the LRU free queue, reference counts and prefix hashes; this class keeps what the pool
does not know: how far each sequence's KV has been written. Copy-on-write and migration come
back as ``(src, dst)`` block pairs for the page store to copy.

Error tiers as in the pool: shortage returns None with nothing changed; misuse raises
``ValueError`` with the values; a broken invariant fails an ``assert``.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ryzlab.kv.blocks import BlockPool, SeqId

__all__ = ["KVCacheManager", "SeqProgress"]


@dataclass
class SeqProgress:
    """How far one sequence's KV is written."""

    num_written: int
    """Tokens whose KV is planned/written (the rest of the pool's tokens are pending)."""
    tail_start: int
    """First position that was ever written by this sequence (earlier ones are prefix hits:
    only their quantised copy exists, so they are never read from the tail)."""


class KVCacheManager:
    """Per-sequence progress over a :class:`BlockPool` (``shards`` = cp ranks, see the pool).

    ``num_blocks=None`` is unbounded (the pool grows, and so must the pages).
    """

    def __init__(self, num_blocks: int | None, block_size: int, enable_prefix_caching: bool = True, *,
                 shards: int = 1):
        self.pool = BlockPool(num_blocks, block_size, enable_prefix_caching, shards=shards)
        self._seqs: dict[SeqId, SeqProgress] = {}

    # ------------------------------------------------------------------ capacity
    @property
    def num_blocks(self) -> int | None:
        """Blocks the cache may hold in all (None = unbounded)."""
        return self.pool.num_blocks

    @property
    def capacity_tokens(self) -> int | None:
        """Tokens the whole cache holds (None = unbounded); bookkeeping, not a measurement."""
        n = self.pool.num_blocks
        return None if n is None else n * self.pool.block_size

    @property
    def num_allocated_blocks(self) -> int:
        """Block ids in existence (an unbounded pool grows): the pages must hold this many."""
        return len(self.pool.blocks)

    def evict_cached(self, num_blocks: int | None = None) -> int:
        """Forget the prefix hashes of up to ``num_blocks`` free blocks (None = all); how many.

        For a prefix cache that no longer describes the pages, e.g. after a forward step failed
        before writing the blocks its ``extend`` registered, or the weights changed.
        """
        return self.pool.evict(num_blocks)

    # ------------------------------------------------------------------ sequences
    def progress(self, seq_id: SeqId) -> SeqProgress:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise ValueError(f"unknown sequence {seq_id!r}; live sequences: {list(self._seqs)[:20]}") from None

    def add_sequence(self, seq_id: SeqId, token_ids: Sequence[int] | int) -> int | None:
        """Register a prompt; how many leading tokens are cached (None: short of blocks, nothing changed)."""
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id!r} already exists")
        if self.pool.allocate(seq_id, token_ids, cache=False) is None:
            return None
        cached = self.pool.num_cached_tokens(seq_id)
        self._seqs[seq_id] = SeqProgress(cached, cached)
        return cached

    def append(self, seq_ids: Sequence[SeqId], new_tokens: Sequence[Sequence[int] | int]
               ) -> list[tuple[int, int]] | None:
        """Append tokens (ids or counts) to every sequence, or to none of them (None: short of blocks).

        Returns the copy-on-write ``(src, dst)`` block pairs the pages must copy.
        """
        counts = [t if isinstance(t, int) else len(t) for t in new_tokens]
        if self.pool.bounded:
            # conservative for forks sharing a block: each counts its own copy-on-write
            need = sum(self.pool.blocks_needed(s, c) for s, c in zip(seq_ids, counts))
            if need > self.pool.num_free_blocks:
                return None
        copies: list[tuple[int, int]] = []
        for s, t in zip(seq_ids, new_tokens):
            res = self.pool.append(s, t, cache=False)
            assert res is not None, f"append of {s!r} failed after the capacity check passed"
            copies += res.copies
        return copies

    def allocate_slots(self, seq_id: SeqId, token_ids: Sequence[int]
                       ) -> tuple[list[int], list[tuple[int, int]]] | None:
        """vLLM's ``allocate_slots``: room for ``token_ids`` (a new sequence's prompt, or appended).

        Returns the block ids this call added and the copy-on-write pairs, or None when the
        pool is short of blocks (nothing changed).
        """
        if seq_id not in self._seqs:
            if self.add_sequence(seq_id, token_ids) is None:
                return None
            return self.pool.block_table(seq_id), []
        before = len(self.pool.block_table(seq_id))
        copies = self.append([seq_id], [token_ids])
        if copies is None:
            return None
        return self.pool.block_table(seq_id)[before:], copies

    def pending(self, seq_id: SeqId) -> int:
        """Tokens appended but not yet planned for writing."""
        return self.pool.num_tokens(seq_id) - self.progress(seq_id).num_written

    def commit(self, seq_id: SeqId, num_tokens: int) -> None:
        """``num_tokens`` more tokens are planned (written before anyone reads them): advance the
        sequence and offer its newly full blocks to the prefix cache."""
        st = self.progress(seq_id)
        st.num_written += num_tokens
        self.pool.cache_blocks(seq_id, st.num_written)

    def fork(self, parent: SeqId, child: SeqId) -> None:
        """``child`` shares every block of ``parent`` (copy-on-write on its first append)."""
        p = self.progress(parent)
        self.pool.fork(parent, child)
        self._seqs[child] = SeqProgress(p.num_written, p.tail_start)

    def free(self, seq_id: SeqId) -> None:
        """Drop a sequence; its written full blocks stay in the prefix cache until reused."""
        self.progress(seq_id)
        self.pool.free(seq_id)
        del self._seqs[seq_id]

    # ------------------------------------------------------------------ queries
    def seq_ids(self) -> list[SeqId]:
        return list(self._seqs)

    def __contains__(self, seq_id: SeqId) -> bool:
        return seq_id in self._seqs

    def __len__(self) -> int:
        return len(self._seqs)

    def num_tokens(self, seq_id: SeqId) -> int:
        """Tokens of a sequence, written or pending."""
        self.progress(seq_id)
        return self.pool.num_tokens(seq_id)

    def num_written(self, seq_id: SeqId) -> int:
        return self.progress(seq_id).num_written

    def num_cached_tokens(self, seq_id: SeqId) -> int:
        self.progress(seq_id)
        return self.pool.num_cached_tokens(seq_id)

    def block_table(self, seq_id: SeqId) -> list[int]:
        self.progress(seq_id)
        return self.pool.block_table(seq_id)

    def stats(self) -> dict[str, float]:
        """The pool's stats plus the number of live sequences."""
        return {**self.pool.stats(), "num_seqs": float(len(self._seqs))}
