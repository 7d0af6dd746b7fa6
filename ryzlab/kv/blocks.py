"""Block bookkeeping for the paged KV cache, in plain Python (no tensors), vLLM-v1 style.

A sequence's KV lives in fixed-size blocks of ``block_size`` tokens; its *block table* lists
their ids in token order. Blocks are reference counted so sequences can share them:

* **prefix caching**: every FULL block gets a hash chained over all tokens before it
  (``hash(parent_hash, block_tokens)``), so two prompts with the same first ``k * block_size``
  tokens share the same ``k`` blocks. Partial blocks are never hashed: their content still
  changes.
* **fork** (beam search, parallel sampling): a child shares all of its parent's blocks;
  appending to a shared, partially filled last block triggers **copy-on-write** — the pool
  hands out a fresh block and reports ``(src, dst)`` so the tensor side copies the contents.

Freed blocks keep their hash and stay reusable until they are popped for a new allocation
(least recently used first); only then is the cached prefix evicted.

**Shards** (context parallelism): with ``shards=cp`` block ``b`` is stored by cp rank
``b % cp`` (at local slot ``b // cp``), so this one pool, replicated identically on every rank
(every rank makes the same calls in the same order), is also the *block directory*: it says
which rank holds each block of each sequence. A sequence's ``j``-th block goes to its home
shard ``(home + j) % cp`` (``home`` rotates with each new sequence, so short sequences spread
too) and spills to the shard with most free blocks when the home shard is full; ``migrate``
and ``rebalance`` move blocks between shards; ``digest`` lets ranks prove their replicas agree.
With ``shards=1`` all of this is the plain single-device pool.

Three error tiers, as in vLLM: an *expected shortage* (not enough free blocks) returns
``None`` and changes nothing, so the caller can preempt or evict; *caller misuse* (unknown
sequence, duplicate id, negative counts) raises ``ValueError`` with the values; a *broken
invariant* fails an ``assert`` naming the bug (see :meth:`BlockPool.check_invariants`).
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

from ryzlab.kv.free_queue import BlockHash, FreeBlockQueue, KVBlock

__all__ = ["AppendResult", "BlockPool", "SeqId", "hash_block"]

log = logging.getLogger(__name__)

SeqId = Hashable
_UNKNOWN = -1  # placeholder for tokens appended by count only: such blocks are never hashed


def hash_block(parent: BlockHash | None, token_ids: Sequence[int]) -> BlockHash:
    """Chained hash of one full block: it identifies the block AND everything before it.

    blake2b-128 rather than Python's ``hash``: a collision would silently attend to another
    prompt's keys, so the probability must be negligible (2^-64 at 2^32 blocks), and the
    value must be stable across processes (ranks compare hashes).
    """
    h = hashlib.blake2b(parent or b"root", digest_size=16)
    h.update(b",".join(str(t).encode() for t in token_ids))
    return h.digest()


@dataclass(frozen=True)
class AppendResult:
    """What the tensor side must do after :meth:`BlockPool.append`."""

    new_blocks: list[int]
    """Block ids appended to the table (in order)."""
    copies: list[tuple[int, int]]
    """Copy-on-write: copy the contents of block ``src`` into ``dst`` (``dst`` replaced ``src``)."""


@dataclass
class _Seq:
    home: int = 0
    """Shard of this sequence's first block (block j prefers shard ``(home + j) % shards``)."""
    blocks: list[KVBlock] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    hashes: list[BlockHash | None] = field(default_factory=list)
    """Chained hash per full block (None once a block holds unknown tokens)."""
    num_cached_tokens: int = 0
    num_registered: int = 0
    """Leading full blocks already offered to the prefix cache (in-use blocks stay cached)."""


class BlockPool:
    """Fixed-size blocks, an LRU free queue, reference counts and a prefix cache.

    ``num_blocks=None`` means unbounded: new block ids are created when the free queue is
    empty (the tensor side grows its storage). Sequence ids are any hashable values.
    """

    def __init__(self, num_blocks: int | None, block_size: int, enable_prefix_caching: bool = True, *,
                 shards: int = 1):
        if block_size <= 0:
            raise ValueError(f"block_size must be a positive number of tokens, got {block_size}")
        if num_blocks is not None and num_blocks <= 0:
            raise ValueError(f"num_blocks must be > 0 or None (unbounded), got {num_blocks}")
        if shards < 1 or (num_blocks is not None and num_blocks % shards):
            raise ValueError(f"shards={shards} must be >= 1 and divide num_blocks={num_blocks} "
                             f"(every shard holds num_blocks / shards blocks)")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.shards = shards
        self.blocks: list[KVBlock] = [KVBlock(i) for i in range(num_blocks or 0)]
        self.free_queues = [FreeBlockQueue(self.blocks[s::shards]) for s in range(shards)]
        self.cached: dict[BlockHash, KVBlock] = {}
        self._seqs: dict[SeqId, _Seq] = {}
        self._next_home = 0
        self._queried_tokens = 0
        self._hit_tokens = 0
        self.counters = {"spills": 0, "migrations": 0}

    # ------------------------------------------------------------------ capacity
    @property
    def bounded(self) -> bool:
        return self.num_blocks is not None

    @property
    def num_free_blocks(self) -> int:
        """Blocks with ``ref_cnt == 0`` (cached or not); unbounded pools can always grow beyond."""
        return sum(len(q) for q in self.free_queues)

    @property
    def num_used_blocks(self) -> int:
        return len(self.blocks) - self.num_free_blocks

    def shard_of(self, block_id: int) -> int:
        """The shard (cp rank) that stores ``block_id``."""
        return block_id % self.shards

    def used_per_shard(self) -> list[int]:
        total = [len(self.blocks[s::self.shards]) for s in range(self.shards)]
        return [t - len(q) for t, q in zip(total, self.free_queues)]

    def _can_take(self, n: int) -> bool:
        return not self.bounded or n <= self.num_free_blocks

    def _grow(self) -> None:
        """Unbounded pools: one new block per shard (ids stay dense, shards stay equal)."""
        n = len(self.blocks)
        for i in range(n, n + self.shards):
            b = KVBlock(i)
            self.blocks.append(b)
            self.free_queues[i % self.shards].append(b)

    def _take(self, prefer: int = 0) -> KVBlock:
        """Pop the least recently used free block of shard ``prefer`` (evicting its cached hash);
        a full shard spills to the one with most free blocks; an unbounded pool grows instead."""
        q = self.free_queues[prefer]
        if not q:
            if not self.bounded:
                self._grow()
            else:
                q = max(self.free_queues, key=len)
                assert q, "pool exhausted after a capacity check said it was not"
                self.counters["spills"] += 1
        b = q.popleft()
        if b.block_hash is not None:
            self._uncache(b)
        assert b.ref_cnt == 0, f"block {b.block_id} taken from the free queue with ref_cnt {b.ref_cnt}"
        b.ref_cnt = 1
        return b

    def _release(self, b: KVBlock) -> None:
        assert b.ref_cnt > 0, f"block {b.block_id} released with ref_cnt {b.ref_cnt}"
        b.ref_cnt -= 1
        if b.ref_cnt == 0:
            self.free_queues[self.shard_of(b.block_id)].append(b)

    def _uncache(self, b: KVBlock) -> None:
        assert b.block_hash is not None and self.cached.get(b.block_hash) is b, \
            f"block {b.block_id} has hash but is not the cached block for it"
        del self.cached[b.block_hash]
        b.block_hash = None

    # ------------------------------------------------------------------ sequences
    def _seq(self, seq_id: SeqId) -> _Seq:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise ValueError(f"unknown sequence {seq_id!r}; live sequences: {list(self._seqs)[:20]}") from None

    def __contains__(self, seq_id: SeqId) -> bool:
        return seq_id in self._seqs

    def seq_ids(self) -> list[SeqId]:
        return list(self._seqs)

    def _blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    @staticmethod
    def _tokens(token_ids: Sequence[int] | int) -> list[int]:
        if isinstance(token_ids, int):
            if token_ids < 0:
                raise ValueError(f"token count must be >= 0, got {token_ids}")
            return [_UNKNOWN] * token_ids
        toks = list(token_ids)
        if any(t < 0 for t in toks):
            raise ValueError("token ids must be >= 0 (negative ids are reserved for unknown tokens)")
        return toks

    def allocate(self, seq_id: SeqId, token_ids: Sequence[int] | int, *, cache: bool = True) -> list[int] | None:
        """Create sequence ``seq_id`` holding ``token_ids``; return its block table, or None.

        The longest chain of cached full blocks matching the prompt is reused (their tokens
        need no prefill, see :meth:`num_cached_tokens`). If the whole prompt is cached, the
        last block is recomputed anyway so the model still runs at least one token (vLLM does
        the same). ``token_ids`` may be a count when the ids are unknown (never hashed).
        ``cache=False`` defers registering the new full blocks in the prefix cache until
        :meth:`cache_blocks` says their KV is written. None = not enough free blocks.
        """
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id!r} already exists")
        toks = self._tokens(token_ids)
        bs = self.block_size
        hashes = self._chain(None, toks, 0)
        hits: list[KVBlock] = []
        if self.enable_prefix_caching:
            for h in hashes:
                b = self.cached.get(h) if h is not None else None
                if b is None:
                    break
                hits.append(b)
            if hits and len(hits) * bs >= len(toks):
                hits.pop()  # everything cached: recompute the last block to get logits
        need = self._blocks_for(len(toks)) - len(hits)
        revived = sum(1 for b in hits if b.ref_cnt == 0)
        if not self._can_take(need + revived):
            return None
        for b in hits:
            if b.ref_cnt == 0:
                self.free_queues[self.shard_of(b.block_id)].remove(b)
            b.ref_cnt += 1
        s = _Seq(home=self._next_home % self.shards, blocks=list(hits), tokens=toks, hashes=hashes,
                 num_cached_tokens=len(hits) * bs, num_registered=len(hits))
        self._next_home += 1
        s.blocks += [self._take((s.home + j) % self.shards) for j in range(len(hits), len(hits) + need)]
        self._seqs[seq_id] = s
        if self.enable_prefix_caching and toks and toks[0] != _UNKNOWN:
            self._queried_tokens += len(toks)
            self._hit_tokens += s.num_cached_tokens
        if cache:
            self.cache_blocks(seq_id, len(toks))
        return [b.block_id for b in s.blocks]

    def _chain(self, parent: BlockHash | None, toks: list[int], first_block: int) -> list[BlockHash | None]:
        """Hashes of the full blocks of ``toks`` from block ``first_block`` on."""
        if not self.enable_prefix_caching:
            return [None] * (len(toks) // self.block_size - first_block)
        out: list[BlockHash | None] = []
        bs = self.block_size
        for i in range(first_block, len(toks) // bs):
            chunk = toks[i * bs:(i + 1) * bs]
            parent = None if (parent is None and i > 0) or _UNKNOWN in chunk else hash_block(parent, chunk)
            out.append(parent)
        return out

    def cache_blocks(self, seq_id: SeqId, num_tokens: int) -> None:
        """Register the full blocks within the first ``num_tokens`` tokens in the prefix cache.

        Call once their KV is written (or is written in the same step before anyone reads it).
        A block whose hash is already cached by another block stays private (a duplicate).
        """
        if not self.enable_prefix_caching:
            return
        s = self._seq(seq_id)
        end = min(num_tokens, len(s.tokens)) // self.block_size
        for i in range(s.num_registered, end):  # incremental: O(new blocks) per decode step
            h, b = s.hashes[i], s.blocks[i]
            if h is not None and b.block_hash is None and h not in self.cached:
                b.block_hash = h
                self.cached[h] = b
        s.num_registered = max(s.num_registered, end)

    def blocks_needed(self, seq_id: SeqId, num_new_tokens: int) -> int:
        """Free blocks an :meth:`append` of ``num_new_tokens`` would take (copy-on-write included)."""
        s = self._seq(seq_id)
        n = len(s.tokens)
        need = self._blocks_for(n + num_new_tokens) - len(s.blocks)
        if num_new_tokens and n % self.block_size and s.blocks[-1].ref_cnt > 1:
            need += 1
        return need

    def append(self, seq_id: SeqId, token_ids: Sequence[int] | int, *, cache: bool = True) -> AppendResult | None:
        """Append tokens to a sequence, growing it one block at a time; None on shortage.

        If the partially filled last block is shared (after :meth:`fork`), it is replaced by a
        private copy first: ``copies`` tells the tensor side to copy ``src -> dst``.
        """
        s = self._seq(seq_id)
        toks = self._tokens(token_ids)
        if not self._can_take(self.blocks_needed(seq_id, len(toks))):
            return None
        copies: list[tuple[int, int]] = []
        n, bs = len(s.tokens), self.block_size
        if toks and n % bs and s.blocks[-1].ref_cnt > 1:
            old = s.blocks[-1]
            new = self._take(self.shard_of(old.block_id))  # same shard: the copy stays on one rank
            self._release(old)
            s.blocks[-1] = new
            copies.append((old.block_id, new.block_id))
        before = len(s.blocks)
        s.blocks += [self._take((s.home + j) % self.shards) for j in range(before, self._blocks_for(n + len(toks)))]
        s.tokens += toks
        parent = s.hashes[-1] if s.hashes else None
        if s.hashes and parent is None:  # chain already broken by unknown tokens
            s.hashes += [None] * (len(s.tokens) // bs - len(s.hashes))
        else:
            s.hashes += self._chain(parent, s.tokens, len(s.hashes))
        if cache:
            self.cache_blocks(seq_id, len(s.tokens))
        return AppendResult([b.block_id for b in s.blocks[before:]], copies)

    def fork(self, parent_seq: SeqId, child_seq: SeqId) -> list[int]:
        """Create ``child_seq`` sharing every block of ``parent_seq``; return its table.

        Never needs a free block (sharing only); the first append to a shared partial block
        pays the copy. The child inherits ``num_cached_tokens``.
        """
        p = self._seq(parent_seq)
        if child_seq in self._seqs:
            raise ValueError(f"sequence {child_seq!r} already exists")
        for b in p.blocks:
            b.ref_cnt += 1
        self._seqs[child_seq] = _Seq(p.home, list(p.blocks), list(p.tokens), list(p.hashes), p.num_cached_tokens,
                                     p.num_registered)
        return [b.block_id for b in p.blocks]

    def free(self, seq_id: SeqId) -> None:
        """Drop a sequence. Its blocks keep their hashes (reusable until evicted).

        Released in reverse order so the tail of a prompt is evicted before its head: a later
        prompt can only hit a prefix, and the head is shared by more prompts.
        """
        s = self._seq(seq_id)
        for b in reversed(s.blocks):
            self._release(b)
        del self._seqs[seq_id]

    def evict(self, num_blocks: int | None = None) -> int:
        """Forget the cached hashes of up to ``num_blocks`` free blocks (LRU first; None = all).

        Frees no memory by itself (free blocks are reusable anyway); use it to drop a stale
        prefix cache, e.g. after the model weights change. Returns how many were evicted.
        """
        if num_blocks is not None and num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0 or None, got {num_blocks}")
        n = 0
        for b in [b for q in self.free_queues for b in q]:
            if num_blocks is not None and n >= num_blocks:
                break
            if b.block_hash is not None:
                self._uncache(b)
                n += 1
        return n

    # ------------------------------------------------------------------ shards
    def migrate(self, block_id: int, dst: int) -> tuple[int, int] | None:
        """Move a used block to shard ``dst``: every table pointing at it now points at a fresh
        block of ``dst`` (ref count and prefix hash move along). Returns ``(old, new)`` for the
        tensor side to copy, or None when ``dst`` has no free block (nothing changed)."""
        if not 0 <= dst < self.shards:
            raise ValueError(f"dst={dst} is not a shard; valid shards: 0..{self.shards - 1}")
        if not 0 <= block_id < len(self.blocks) or self.blocks[block_id].ref_cnt == 0:
            raise ValueError(f"block {block_id} is not in use; only used blocks migrate")
        old = self.blocks[block_id]
        if self.shard_of(block_id) == dst:
            raise ValueError(f"block {block_id} already lives on shard {dst}")
        q = self.free_queues[dst]
        if not q:
            if self.bounded:
                return None
            self._grow()
        new = q.popleft()
        if new.block_hash is not None:
            self._uncache(new)
        new.ref_cnt, old.ref_cnt = old.ref_cnt, 0
        for s in self._seqs.values():
            s.blocks = [new if b is old else b for b in s.blocks]
        if old.block_hash is not None:
            h = old.block_hash
            self._uncache(old)
            new.block_hash, self.cached[h] = h, new
        self.free_queues[self.shard_of(block_id)].append(old)
        self.counters["migrations"] += 1
        return old.block_id, new.block_id

    def rebalance(self, max_moves: int | None = None) -> list[tuple[int, int]]:
        """Migrate used blocks from the fullest to the emptiest shard until they differ by <= 1.

        Deterministic (every rank plans the same moves): the lowest used block id of the fullest
        shard moves first. Returns the ``(old, new)`` copies the tensor side must make."""
        moves: list[tuple[int, int]] = []
        while max_moves is None or len(moves) < max_moves:
            used = self.used_per_shard()
            hi = max(range(self.shards), key=lambda r: (used[r], -r))
            lo = min(range(self.shards), key=lambda r: (used[r], r))
            if used[hi] - used[lo] <= 1:
                break
            block = next(b.block_id for b in self.blocks[hi::self.shards] if b.ref_cnt > 0)
            mv = self.migrate(block, lo)
            if mv is None:
                break
            moves.append(mv)
        return moves

    def digest(self) -> int:
        """63-bit hash of the whole bookkeeping: equal on every rank when the replicas agree."""
        state = (sorted((repr(k), s.home, [b.block_id for b in s.blocks], len(s.tokens)) for k, s in self._seqs.items()),
                 [[b.block_id for b in q] for q in self.free_queues],
                 sorted((b.block_id, b.ref_cnt, b.block_hash or b"") for b in self.blocks))
        return int.from_bytes(hashlib.blake2b(repr(state).encode(), digest_size=8).digest(), "little") >> 1

    # ------------------------------------------------------------------ queries
    def block_table(self, seq_id: SeqId) -> list[int]:
        return [b.block_id for b in self._seq(seq_id).blocks]

    def num_tokens(self, seq_id: SeqId) -> int:
        return len(self._seq(seq_id).tokens)

    def token_ids(self, seq_id: SeqId) -> list[int]:
        """Token ids of a sequence (-1 where only a count was appended)."""
        return list(self._seq(seq_id).tokens)

    def num_cached_tokens(self, seq_id: SeqId) -> int:
        """Prompt tokens found in the prefix cache at :meth:`allocate` (no prefill needed)."""
        return self._seq(seq_id).num_cached_tokens

    def stats(self) -> dict[str, float]:
        """Usage as the serving field names it; ``kv_cache_usage_perc`` is a fraction (1.0 = full)."""
        cap = self.num_blocks if self.bounded else len(self.blocks)
        used = self.num_used_blocks
        return {
            "kv_cache_usage_perc": used / cap if cap else 0.0,
            "num_free_blocks": float(self.num_free_blocks),
            "num_used_blocks": float(used),
            "num_cached_blocks": float(len(self.cached)),
            "spills": float(self.counters["spills"]),
            "migrations": float(self.counters["migrations"]),
            "num_blocks": float(cap),
            "prefix_cache_queries": float(self._queried_tokens),
            "prefix_cache_hits": float(self._hit_tokens),
            "prefix_cache_hit_rate": self._hit_tokens / self._queried_tokens if self._queried_tokens else 0.0,
        }

    def check_invariants(self) -> None:
        """Assert every bookkeeping invariant; each message names the broken one."""
        refs = {b.block_id: 0 for b in self.blocks}
        for sid, s in self._seqs.items():
            assert len(s.blocks) == self._blocks_for(len(s.tokens)), \
                f"seq {sid!r}: {len(s.blocks)} blocks for {len(s.tokens)} tokens (block_size {self.block_size})"
            assert len(s.hashes) == len(s.tokens) // self.block_size, f"seq {sid!r}: hash chain length wrong"
            for b in s.blocks:
                refs[b.block_id] += 1
        free_ids = set()
        for shard, q in enumerate(self.free_queues):
            n = 0
            for b in q:
                assert b.block_id not in free_ids, f"block {b.block_id} twice in the free queues"
                assert self.shard_of(b.block_id) == shard, f"block {b.block_id} in shard {shard}'s free queue"
                free_ids.add(b.block_id)
                n += 1
            assert n == len(q), f"shard {shard}: free queue length counter is wrong"
        for b in self.blocks:
            assert b.ref_cnt == refs[b.block_id], \
                f"block {b.block_id}: ref_cnt {b.ref_cnt} but {refs[b.block_id]} block tables point at it"
            in_free = b.block_id in free_ids
            assert not (in_free and b.ref_cnt > 0), f"block {b.block_id} is both free and used (ref_cnt {b.ref_cnt})"
            assert in_free or b.ref_cnt > 0, f"block {b.block_id} leaked: ref_cnt 0 but not in the free queue"
            if b.block_hash is not None:
                assert self.cached.get(b.block_hash) is b, f"block {b.block_id} hash not registered"
        for h, b in self.cached.items():
            assert b.block_hash == h, f"cached hash maps to block {b.block_id} with another hash"
        if self.bounded:
            assert len(self.blocks) == self.num_blocks, "bounded pool changed size"
