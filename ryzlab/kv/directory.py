"""The block directory: which rank owns each KV block, at which version, and where a new block goes.

A sharded KV cache needs one answer, identical on every rank, to "where does block ``b`` live and
is my copy current?". Every rank holds a replica of :class:`BlockDirectory` and applies the same
deterministic calls in the same order (SPMD), so the replicas stay equal without messages;
:meth:`BlockDirectory.digest` lets a test or a debug run prove it with one all-gather.

Coherency rules (checked by :meth:`BlockDirectory.check` at any step):

- A logical block id is never reused; an evicted id becomes a tombstone.
- Writes (appending tokens), evictions and migrations bump the block's version. A rank stamps the
  version it has written per layer; attending over a block whose stamp differs from the
  directory's version (stale) or whose id is a tombstone (freed) is an error, not a silent read.
- A block has exactly one owner rank (``spread`` placement, the ``sequence`` strategy) or lives
  on every rank (``everywhere`` placement: ``heads`` and ``replicated``, where each rank keeps its
  part or a full copy of every block).

Plain Python, no tensors: the cache moves the bytes, the directory decides.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Literal

__all__ = ["ALL_RANKS", "Placement", "BlockEntry", "Slot", "Move", "BlockDirectory"]

log = logging.getLogger(__name__)

ALL_RANKS = -1
"""Owner of a block held by every rank (``everywhere`` placement)."""
Placement = Literal["spread", "everywhere"]


@dataclass
class BlockEntry:
    """One logical block of one sequence."""

    block_id: int
    seq_id: int
    index: int
    """Position of the block in its sequence (token ``index * block_size`` starts it)."""
    owner: int
    """Owning rank, or ``ALL_RANKS``."""
    version: int
    """Bumped by every write, migration and eviction; stamps older than this are stale."""
    num_tokens: int = 0


@dataclass(frozen=True)
class Slot:
    """Where one reserved token goes: block, its owner, and the offset inside the block."""

    block_id: int
    owner: int
    offset: int
    version: int


@dataclass(frozen=True)
class Move:
    """A migration applied to the directory; the cache must move the block's bytes (and scales)."""

    block_id: int
    src: int
    dst: int
    version: int
    """The block's version after the move."""


class BlockDirectory:
    """Replicated map ``block_id -> (owner, version)`` plus placement across ``world_size`` ranks.

    ``blocks_per_rank`` is each rank's capacity (None = unlimited). Expected shortage (no rank has
    room) returns ``None``; misuse (unknown sequence/block, bad rank) raises ``ValueError``; a
    broken invariant fails an ``assert`` naming it.
    """

    def __init__(self, world_size: int, block_size: int, *, blocks_per_rank: int | None = None,
                 placement: Placement = "spread"):
        if world_size < 1 or block_size < 1:
            raise ValueError(f"world_size ({world_size}) and block_size ({block_size}) must be >= 1")
        if blocks_per_rank is not None and blocks_per_rank < 1:
            raise ValueError(f"blocks_per_rank must be >= 1 or None, got {blocks_per_rank}")
        if placement not in ("spread", "everywhere"):
            raise ValueError(f"placement={placement!r} is not valid; choose one of 'spread', 'everywhere'")
        self.world_size = world_size
        self.block_size = block_size
        self.blocks_per_rank = blocks_per_rank
        self.placement: Placement = placement
        self._entries: dict[int, BlockEntry] = {}
        self._seqs: dict[int, list[int]] = {}
        self._used = [0] * world_size
        self._tombstones: dict[int, int] = {}  # evicted block id -> its final version
        self._next_id = 0
        self.stats = {"allocated": 0, "spills": 0, "migrations": 0, "evictions": 0, "writes": 0}

    # ------------------------------------------------------------------ queries
    def entry(self, block_id: int) -> BlockEntry:
        if block_id in self._tombstones:
            raise ValueError(f"block {block_id} was freed at version {self._tombstones[block_id]}")
        if block_id not in self._entries:
            raise ValueError(f"unknown block {block_id}")
        return self._entries[block_id]

    def is_freed(self, block_id: int) -> bool:
        return block_id in self._tombstones

    def sequences(self) -> list[int]:
        return list(self._seqs)

    def blocks(self, seq_id: int, rank: int | None = None) -> list[int]:
        """Live blocks of ``seq_id`` in order; with ``rank``, only those that rank holds."""
        ids = self._seq(seq_id)
        if rank is None:
            return list(ids)
        return [b for b in ids if self._entries[b].owner in (rank, ALL_RANKS)]

    def num_tokens(self, seq_id: int) -> int:
        return sum(self._entries[b].num_tokens for b in self._seq(seq_id))

    def used(self, rank: int) -> int:
        return self._used[rank]

    def free(self, rank: int) -> int | None:
        """Free blocks on ``rank`` (None = unlimited)."""
        return None if self.blocks_per_rank is None else self.blocks_per_rank - self._used[rank]

    def has_room(self, rank: int, n: int = 1) -> bool:
        free = self.free(rank)
        return free is None or free >= n

    # ------------------------------------------------------------------ placement
    def add_sequence(self, seq_id: int) -> None:
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id} already exists")
        self._seqs[seq_id] = []

    def _seq(self, seq_id: int) -> list[int]:
        if seq_id not in self._seqs:
            raise ValueError(f"unknown sequence {seq_id}; known: {sorted(self._seqs)[:20]}")
        return self._seqs[seq_id]

    def _choose_rank(self, seq_id: int, index: int) -> int | None:
        """Rank for a new block: the one with most free capacity, ties to the round-robin home.

        The home rank ``(seq_id + index) % world_size`` spreads a sequence evenly when ranks are
        equally loaded; when the home is full the block spills to the rank with most room.
        """
        if self.placement == "everywhere":
            return ALL_RANKS if all(self.has_room(r) for r in range(self.world_size)) else None
        home = (seq_id + index) % self.world_size
        if self.blocks_per_rank is None:
            return home
        best = max(range(self.world_size), key=lambda r: (self.free(r), r == home, -r))
        if self.free(best) <= 0:
            return None
        if best != home and self.free(home) <= 0:
            self.stats["spills"] += 1
            log.debug("block %d of sequence %d spills from full rank %d to rank %d", index, seq_id, home, best)
        return best

    def _take(self, owner: int, n: int = 1) -> None:
        for r in range(self.world_size) if owner == ALL_RANKS else (owner,):
            self._used[r] += n

    def append(self, seq_id: int, n_tokens: int) -> list[Slot] | None:
        """Reserve ``n_tokens`` new positions at the end of ``seq_id``; a write bumps versions.

        Returns one :class:`Slot` per token, or ``None`` (nothing changed) when the ranks
        together lack room: the caller may evict, rebalance or preempt.
        """
        if n_tokens < 0:
            raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
        ids = self._seq(seq_id)
        room_in_last = self.block_size - self._entries[ids[-1]].num_tokens if ids else 0
        new_blocks = -(-max(0, n_tokens - room_in_last) // self.block_size)
        created: list[int] = []
        for _ in range(new_blocks):
            owner = self._choose_rank(seq_id, self._entries[ids[-1]].index + 1 if ids else 0)
            if owner is None:  # roll back: expected shortage leaves the directory untouched
                for b in created:
                    e = self._entries.pop(b)
                    self._take(e.owner, -1)
                    ids.remove(b)
                self.stats["allocated"] -= len(created)
                return None
            idx = self._entries[ids[-1]].index + 1 if ids else 0
            b = self._next_id
            self._next_id += 1
            self._entries[b] = BlockEntry(b, seq_id, idx, owner, version=1)
            self._take(owner)
            ids.append(b)
            created.append(b)
            self.stats["allocated"] += 1
        slots: list[Slot] = []
        remaining = n_tokens
        for b in ids[len(ids) - len(created) - (1 if room_in_last else 0):] if n_tokens else []:
            e = self._entries[b]
            take = min(remaining, self.block_size - e.num_tokens)
            if take <= 0:
                continue
            e.version += 1
            self.stats["writes"] += 1
            slots.extend(Slot(b, e.owner, e.num_tokens + j, e.version) for j in range(take))
            e.num_tokens += take
            remaining -= take
        assert remaining == 0, f"append bug: {remaining} of {n_tokens} tokens left without a slot"
        return slots

    def evict(self, block_id: int) -> int:
        """Free one block (its tokens leave the sequence); returns the tombstone version."""
        e = self.entry(block_id)
        self._entries.pop(block_id)
        self._seqs[e.seq_id].remove(block_id)
        self._take(e.owner, -1)
        self._tombstones[block_id] = e.version + 1
        self.stats["evictions"] += 1
        return e.version + 1

    def free_sequence(self, seq_id: int) -> list[int]:
        """Evict every block of ``seq_id`` and forget the sequence; returns the freed ids."""
        ids = list(self._seq(seq_id))
        for b in ids:
            self.evict(b)
        del self._seqs[seq_id]
        return ids

    def migrate(self, block_id: int, dst: int) -> Move | None:
        """Give ``block_id`` to rank ``dst`` (version bumps); ``None`` if ``dst`` is full."""
        if self.placement == "everywhere":
            raise ValueError("blocks held by every rank ('everywhere' placement) cannot migrate")
        if not 0 <= dst < self.world_size:
            raise ValueError(f"dst={dst} is not a rank; valid ranks: 0..{self.world_size - 1}")
        e = self.entry(block_id)
        if e.owner == dst:
            raise ValueError(f"block {block_id} already lives on rank {dst}")
        if not self.has_room(dst):
            return None
        src = e.owner
        self._used[src] -= 1
        self._used[dst] += 1
        e.owner = dst
        e.version += 1
        self.stats["migrations"] += 1
        return Move(block_id, src, dst, e.version)

    def rebalance(self, max_moves: int | None = None) -> list[Move]:
        """Migrate blocks from the most to the least loaded rank until loads differ by <= 1.

        Deterministic (same plan on every rank). The oldest block of the busiest rank moves first.
        """
        moves: list[Move] = []
        if self.placement == "everywhere":
            return moves
        while max_moves is None or len(moves) < max_moves:
            hi = max(range(self.world_size), key=lambda r: (self._used[r], -r))
            lo = min(range(self.world_size), key=lambda r: (self._used[r], r))
            if self._used[hi] - self._used[lo] <= 1 or not self.has_room(lo):
                break
            block = min(b for b, e in self._entries.items() if e.owner == hi)
            move = self.migrate(block, lo)
            assert move is not None, "rebalance bug: destination reported room but migrate refused"
            moves.append(move)
        return moves

    # ------------------------------------------------------------------ invariants
    def check(self) -> None:
        """Assert every directory invariant; cheap enough to call after each step in tests."""
        used = [0] * self.world_size
        seen: set[int] = set()
        for seq_id, ids in self._seqs.items():
            last_index = -1
            for pos, b in enumerate(ids):
                assert b not in seen, f"block {b} listed twice (double owner / two sequences)"
                seen.add(b)
                assert b in self._entries, f"block {b} of sequence {seq_id} has no directory entry (lost)"
                assert b not in self._tombstones, f"freed block {b} still listed in sequence {seq_id}"
                e = self._entries[b]
                assert e.seq_id == seq_id, f"block {b} says sequence {e.seq_id}, listed in {seq_id}"
                assert e.index > last_index, f"block {b} out of order in sequence {seq_id}"
                last_index = e.index
                assert 0 < e.num_tokens <= self.block_size or (e.num_tokens == 0 and pos == len(ids) - 1), (
                    f"block {b} holds {e.num_tokens} tokens (block_size {self.block_size})")
                assert pos == len(ids) - 1 or e.num_tokens == self.block_size, (
                    f"block {b} is partial ({e.num_tokens}) but not the last of sequence {seq_id}")
                assert e.version >= 1, f"block {b} has version {e.version}"
                if self.placement == "everywhere":
                    assert e.owner == ALL_RANKS, f"block {b} owner {e.owner} under 'everywhere' placement"
                    used = [u + 1 for u in used]
                else:
                    assert 0 <= e.owner < self.world_size, f"block {b} owner {e.owner} out of range"
                    used[e.owner] += 1
        assert seen == set(self._entries), f"entries without a sequence (leak): {sorted(set(self._entries) - seen)[:10]}"
        assert used == self._used, f"usage counters {self._used} disagree with the entries {used}"
        if self.blocks_per_rank is not None:
            assert max(used) <= self.blocks_per_rank, f"rank over capacity: {used} > {self.blocks_per_rank}"

    def digest(self) -> int:
        """63-bit hash of the whole directory state: equal on every rank when replicas agree."""
        state = (sorted((e.block_id, e.seq_id, e.index, e.owner, e.version, e.num_tokens)
                        for e in self._entries.values()),
                 sorted(self._tombstones.items()), {k: list(v) for k, v in sorted(self._seqs.items())})
        return int.from_bytes(hashlib.blake2b(repr(state).encode(), digest_size=8).digest(), "little") >> 1
