"""Context parallelism on top of the per-rank caches: which rank holds which blocks, migration,
rebalancing and coherency checks. Never a second store: the bytes live in each rank's
:class:`ryzlab.kv.store.PageStore` (inside its :class:`ryzlab.kv.cache.PagedKVCache`), the placement
in its (replicated) :class:`BlockPool`. The attention merge across ranks is
:func:`ryzlab.kv.merge.merge_over_ranks`.

Every cp rank holds an identical replica of the block pool and makes the same calls in the same
order (SPMD), so "where does block ``b`` live" has one answer everywhere (``b % cp``) without a
message. The functions here are collective over the cp group: every cp rank calls them together.

* :func:`migrate` / :func:`rebalance` move blocks between ranks (the pool re-points every block
  table, the owner sends the pages point-to-point to the new owner);
* :func:`check` asserts the pool's invariants and, with ``cross_rank``, that every rank's
  replica is the same (one all-gather of a 63-bit digest): a rank that missed or reordered a
  call is caught before it reads a block it does not hold.
"""
from __future__ import annotations

import logging

import torch

from ryzlab.kv.cache import PagedKVCache

__all__ = ["CoherencyError", "migrate", "rebalance", "check", "blocks_per_rank"]

log = logging.getLogger(__name__)


class CoherencyError(RuntimeError):
    """The cp ranks' block pools disagree (a rank missed or reordered a call)."""


def migrate(cache: PagedKVCache, block_id: int, dst: int) -> tuple[int, int] | None:
    """Move a used block to cp rank ``dst`` (pages sent by its owner). None if ``dst`` is full."""
    move = cache.pool.migrate(block_id, dst)
    if move is not None:
        cache.store.apply([move], cache.manager.num_allocated_blocks)
    return move


def rebalance(cache: PagedKVCache, max_moves: int | None = None) -> list[tuple[int, int]]:
    """Even out used blocks per cp rank (to within one) by migrations; same plan on every rank."""
    moves = cache.pool.rebalance(max_moves)
    cache.store.apply(moves, cache.manager.num_allocated_blocks)
    if moves:
        log.debug("rebalanced %d block(s) across %d cp ranks", len(moves), cache.cp_size)
    return moves


def blocks_per_rank(cache: PagedKVCache) -> list[int]:
    """Used blocks each cp rank holds (read off the replicated pool)."""
    return cache.pool.used_per_shard()


def check(cache: PagedKVCache, *, cross_rank: bool = False) -> None:
    """Assert the pool invariants; with ``cross_rank`` (collective), that all replicas agree."""
    cache.pool.check_invariants()
    if cross_rank and cache.cp_size > 1:
        mine = torch.tensor([cache.pool.digest()], dtype=torch.int64, device=cache.device)
        digests = cache.cp.all_gather(mine).flatten().tolist()
        if len(set(digests)) != 1:
            raise CoherencyError(f"cp rank {cache.cp_rank}: block pools differ across ranks (digests {digests})")
