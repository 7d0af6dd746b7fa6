"""A KV cache sharded across ranks, kept coherent by a replicated block directory.

Every rank runs the same calls in the same order (SPMD, as the model does under tensor
parallelism): the model computes ``q``, ``k``, ``v`` for the step on every rank, each rank keeps
its share, and :meth:`ShardedKVCache.attend` returns the full attention output on every rank::

    cache = ShardedKVCache(model_cfg, cache_cfg, ParallelConfig(world_size=ws, strategy="sequence"))
    cache.add_sequence(0)
    step = cache.extend([0], 1)                 # None: no rank has room (evict / preempt, retry)
    with cache.comm.step("decode"):
        for layer in range(n_layers):
            cache.write(layer, k, v)            # [B, T, Hkv, D]: each rank stores its part
            out = cache.attend(layer, q)        # [B, Hq, D]: decode query over every cached token

Strategies (see :mod:`ryzlab.kv.layout`): ``replicated`` (every rank holds everything, no
communication), ``heads`` (KV heads partitioned; one all-gather of the rank's query heads per
layer), ``sequence`` (a sequence's blocks spread over ranks; local attention with log-sum-exp
and one all-gather of ``[B, Hq, D + 1]`` per layer, independent of the context length). At
world_size 1 the collectives are no-ops and the same code runs.

Coherency: :class:`ryzlab.kv.directory.BlockDirectory` (owner, version per block) is updated
identically on every rank; writes stamp the version per layer; :meth:`attend` raises
:class:`CoherencyError` rather than read a stale or freed block; :meth:`check` verifies the
directory, this rank's store against it, and (with ``cross_rank=True``) that every rank holds
the same directory. Migrations move a block's payload, scales and staged rows point to point.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..config import CacheConfig, ModelConfig, ParallelConfig
from .codecs import KVFormat
from .comm import Comm
from .directory import ALL_RANKS, BlockDirectory, Move
from .layout import HeadLayout, head_layout, validate_layout
from .merge import merge_partials, pack_partial, unpack_partials
from .pages import attention_with_lse
from .shard_store import ShardStore

__all__ = ["ShardedKVCache", "ShardedStep", "CoherencyError", "largest_context", "per_rank_block_bytes"]

log = logging.getLogger(__name__)


class CoherencyError(RuntimeError):
    """A rank was about to read a stale or freed block, or the ranks' directories disagree."""


@dataclass(frozen=True)
class ShardedStep:
    """Plan of one step: which new tokens this rank stores, and where."""

    seq_ids: tuple[int, ...]
    query_lens: tuple[int, ...]
    rows: torch.Tensor
    """``[n]`` indices of this rank's tokens in the step's flat ``[N]`` token order."""
    block_ids: list[int]
    offsets: list[int]
    versions: dict[int, int]
    full: set[int]


def _formats(cache: CacheConfig, dtype: torch.dtype) -> tuple[KVFormat, KVFormat]:
    sym = getattr(cache, "symmetric", True)
    return (KVFormat(cache.codec, cache.key_granularity, cache.group_size, sym, dtype),
            KVFormat(cache.codec, cache.value_granularity, cache.group_size, sym, dtype))


class ShardedKVCache:
    """This rank's view of a KV cache sharded over ``parallel.world_size`` ranks.

    ``blocks_per_rank`` bounds each rank's pool (None = grow as needed); ``comm`` defaults to
    the default process group (or a one-rank no-op group without one). The layout is validated
    first, so a bad layout fails before any tensor is allocated.
    """

    def __init__(self, model: ModelConfig, cache: CacheConfig, parallel: ParallelConfig, *,
                 comm: Comm | None = None, blocks_per_rank: int | None = None, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu"):
        validate_layout(model, parallel, cache)
        if cache.residual:
            raise ValueError(f"residual={cache.residual}: the sharded cache has no full-precision residual "
                             f"window yet; use residual=0")
        self.comm = comm or Comm()
        if self.comm.world_size != parallel.world_size:
            raise ValueError(f"parallel.world_size={parallel.world_size} but the process group has "
                             f"{self.comm.world_size} ranks")
        self.model, self.config, self.parallel = model, cache, parallel
        self.strategy = parallel.strategy
        self.rank, self.world_size = self.comm.rank, parallel.world_size
        self.layout: HeadLayout = head_layout(model, parallel, self.rank)
        self.dtype = dtype
        self.device = torch.device(device)  # cuda:<local_rank> under nccl, cpu under gloo
        placement = "spread" if self.strategy == "sequence" else "everywhere"
        self.directory = BlockDirectory(self.world_size, cache.block_size, blocks_per_rank=blocks_per_rank,
                                        placement=placement)
        kf, vf = _formats(cache, dtype)
        self.store = ShardStore(n_layers=model.n_layers, heads=len(self.layout.kv_heads), head_dim=model.head_dim,
                                block_size=cache.block_size, key_format=kf, value_format=vf, dtype=dtype,
                                capacity=blocks_per_rank, device=self.device)
        self._kv_idx = torch.tensor(self.layout.kv_heads, dtype=torch.long, device=self.device)
        self._q_idx = torch.tensor(self.layout.q_heads, dtype=torch.long, device=self.device)
        self._step: ShardedStep | None = None
        self.scale = 1.0 / math.sqrt(model.head_dim)

    # ------------------------------------------------------------------ sequences and steps
    def add_sequence(self, seq_id: int) -> None:
        self.directory.add_sequence(seq_id)

    def num_tokens(self, seq_id: int) -> int:
        return self.directory.num_tokens(seq_id)

    def _blocks_needed(self, seq_id: int, n: int) -> int:
        ids = self.directory.blocks(seq_id)
        room = self.config.block_size - self.directory.entry(ids[-1]).num_tokens if ids else 0
        return -(-max(0, n - room) // self.config.block_size)

    def extend(self, seq_ids: Sequence[int], n_tokens: int | Sequence[int] = 1) -> ShardedStep | None:
        """Reserve ``n_tokens`` new tokens per sequence and plan their writes (same on every rank).

        Returns ``None`` and changes nothing when the ranks together lack the blocks (expected
        shortage); a full rank alone is no shortage: its blocks spill to ranks with room.
        """
        counts = [n_tokens] * len(seq_ids) if isinstance(n_tokens, int) else list(n_tokens)
        if len(counts) != len(seq_ids):
            raise ValueError(f"{len(counts)} token counts for {len(seq_ids)} sequences")
        need = sum(self._blocks_needed(s, n) for s, n in zip(seq_ids, counts))
        d = self.directory
        if d.blocks_per_rank is not None:
            free = [d.free(r) for r in range(self.world_size)]
            if need > (sum(free) if d.placement == "spread" else min(free)):
                return None
        rows, block_ids, offsets, versions = [], [], [], {}
        base = 0
        for s, n in zip(seq_ids, counts):
            slots = d.append(s, n)
            assert slots is not None, f"append of sequence {s} failed after the capacity check passed"
            for i, sl in enumerate(slots):
                if sl.owner in (self.rank, ALL_RANKS):
                    rows.append(base + i)
                    block_ids.append(sl.block_id)
                    offsets.append(sl.offset)
                    versions[sl.block_id] = sl.version
            base += n
        full = {b for b in versions if d.entry(b).num_tokens == self.config.block_size}
        self._step = ShardedStep(tuple(seq_ids), tuple(counts), torch.tensor(rows, dtype=torch.long, device=self.device),
                                 block_ids, offsets, versions, full)
        return self._step

    def _current(self) -> ShardedStep:
        if self._step is None:
            raise ValueError("no step planned: call extend() before write()/attend()")
        return self._step

    # ------------------------------------------------------------------ per layer
    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep this rank's part of the step's new keys/values (``[B, T, Hkv, D]`` or ``[N, Hkv, D]``)."""
        step = self._current()
        if not 0 <= layer < self.model.n_layers:
            raise ValueError(f"layer={layer} out of range [0, {self.model.n_layers})")
        k = k.reshape(-1, *k.shape[-2:]) if k.dim() == 4 else k
        v = v.reshape(-1, *v.shape[-2:]) if v.dim() == 4 else v
        want = (sum(step.query_lens), self.model.n_kv_heads, self.model.head_dim)
        if tuple(k.shape) != want or tuple(v.shape) != want:
            raise ValueError(f"k/v have shapes {tuple(k.shape)}, {tuple(v.shape)}; expected {list(want)} "
                             f"(new tokens, n_kv_heads, head_dim)")
        xk = k.to(self.device)[step.rows][:, self._kv_idx].to(self.dtype)
        xv = v.to(self.device)[step.rows][:, self._kv_idx].to(self.dtype)
        self.store.write(layer, step.block_ids, step.offsets, xk, xv, step.versions, step.full)

    def _local_tables(self, layer: int, seq_ids: Sequence[int]) -> tuple[list[list[int]], torch.Tensor]:
        """This rank's blocks per sequence, each checked against the directory, and the key mask."""
        d, bs = self.directory, self.config.block_size
        tables = [d.blocks(s, rank=self.rank) for s in seq_ids]
        stamps = self.store.stamps[layer]
        nb = max([len(t) for t in tables] + [1])
        lens = torch.zeros(len(seq_ids), nb, dtype=torch.long)
        for i, t in enumerate(tables):
            for j, b in enumerate(t):
                e = d.entry(b)
                got = stamps.get(b)
                if got != e.version:
                    raise CoherencyError(f"rank {self.rank} layer {layer}: block {b} of sequence {e.seq_id} is "
                                         f"{'missing' if got is None else f'stale (v{got})'}; directory "
                                         f"says v{e.version} on rank {e.owner}")
                lens[i, j] = e.num_tokens
        mask = torch.arange(bs)[None, None, :] < lens[:, :, None]            # [B, nb, bs]
        return tables, mask.reshape(len(seq_ids), nb * bs).to(self.device)

    def attend(self, layer: int, q: torch.Tensor, seq_ids: Sequence[int] | None = None) -> torch.Tensor:
        """Decode attention: ``q [B, Hq, D]`` (one query per sequence) over all its cached tokens.

        Returns ``[B, Hq, D]`` (float32) on every rank. ``seq_ids`` default to the last step's.
        """
        seq_ids = tuple(seq_ids) if seq_ids is not None else self._current().seq_ids
        if q.dim() != 3 or q.shape[0] != len(seq_ids) or q.shape[1] != self.model.n_heads:
            raise ValueError(f"q has shape {tuple(q.shape)}; expected [{len(seq_ids)}, {self.model.n_heads}, "
                             f"{self.model.head_dim}] (one decode query per sequence)")
        tables, mask = self._local_tables(layer, seq_ids)
        k, v = self.store.gather(layer, tables)                                  # [B, Hkv_local, S, D]
        q_local = q.to(self.device)[:, self._q_idx].unsqueeze(1)                  # [B, 1, Hq_local, D]
        out, lse = attention_with_lse(q_local, k, v, mask.unsqueeze(1), self.scale)
        out, lse = out.squeeze(1), lse.squeeze(1)                                # [B, Hq_local, (D)]
        if self.strategy == "sequence":
            parts = self.comm.all_gather(pack_partial(out, lse))               # [ws, B, Hq, D + 1]
            out, _ = merge_partials(*unpack_partials(parts))
        elif self.strategy == "heads":
            parts = self.comm.all_gather(out)                                  # [ws, B, Hq / ws, D]
            out = parts.permute(1, 0, 2, 3).reshape(len(seq_ids), self.model.n_heads, -1)
        return out

    # ------------------------------------------------------------------ evict / migrate
    def evict(self, block_id: int) -> None:
        """Free one block on its owner(s); its tokens leave the sequence (every rank calls it)."""
        owner = self.directory.entry(block_id).owner
        self.directory.evict(block_id)
        if owner in (self.rank, ALL_RANKS):
            self.store.release(block_id)

    def free_sequence(self, seq_id: int) -> None:
        for b in self.directory.blocks(seq_id):
            self.evict(b)
        self.directory.free_sequence(seq_id)

    def _transfer(self, mv: Move, staged: bool) -> None:
        with self.comm.step("migrate"):
            if self.rank == mv.src:
                for layer, st in enumerate(self.store.stamps):
                    if st.get(mv.block_id) != mv.version - 1:
                        raise CoherencyError(f"rank {self.rank}: migrating block {mv.block_id} whose layer {layer} "
                                             f"stamp {st.get(mv.block_id)} != v{mv.version - 1}")
                self.comm.send(self.store.export(mv.block_id), mv.dst)
                self.store.release(mv.block_id)
            elif self.rank == mv.dst:
                buf = torch.empty(self.store.export_nbytes(staged), dtype=torch.uint8, device=self.device)
                self.comm.recv(buf, mv.src)
                self.store.load(mv.block_id, buf, mv.version, staged)

    def _staged(self, block_id: int) -> bool:
        return self.store.spans and self.directory.entry(block_id).num_tokens < self.config.block_size

    def migrate(self, block_id: int, dst: int) -> Move | None:
        """Move a block (payload, scales, staged rows) to ``dst``; None if ``dst`` is full."""
        staged = self._staged(block_id)
        mv = self.directory.migrate(block_id, dst)
        if mv is not None:
            self._transfer(mv, staged)
        return mv

    def rebalance(self, max_moves: int | None = None) -> list[Move]:
        """Even out blocks per rank (``sequence`` strategy) by migrations; same plan on every rank."""
        before = {b: self._staged(b) for s in self.directory.sequences() for b in self.directory.blocks(s)}
        moves = self.directory.rebalance(max_moves)
        for mv in moves:
            self._transfer(mv, before[mv.block_id])
        return moves

    # ------------------------------------------------------------------ checks and ledger
    def check(self, *, cross_rank: bool = False) -> None:
        """Assert the directory invariants and this rank's store against them (any step boundary).

        No lost block (every block the directory gives this rank is stored, all layers stamped
        current), no double owner (this rank stores nothing it does not own), no freed block kept.
        ``cross_rank`` also all-gathers directory digests: every rank must hold the same directory.
        """
        d = self.directory
        d.check()
        mine = {b for s in d.sequences() for b in d.blocks(s, rank=self.rank)}
        held = set(self.store.block_ids())
        if held != mine:
            raise CoherencyError(f"rank {self.rank}: stores {sorted(held - mine)[:10]} it does not own and lacks "
                                 f"{sorted(mine - held)[:10]} it owns")
        for layer, st in enumerate(self.store.stamps):
            stale = [b for b in mine if st.get(b) != d.entry(b).version]
            if stale:
                raise CoherencyError(f"rank {self.rank} layer {layer}: stale blocks {stale[:10]}")
        if cross_rank:
            with self.comm.step("check"):
                digests = self.comm.all_gather(torch.tensor([d.digest()], dtype=torch.int64, device=self.device))
            if not bool((digests == digests[0]).all()):
                raise CoherencyError(f"directories differ across ranks: digests {digests.flatten().tolist()}")

    def kv_bytes(self) -> dict[str, float]:
        """This rank's KV bytes by kind (payload, scales, padding, staging, total, blocks, tokens)."""
        d = self.directory
        counts = {b: d.entry(b).num_tokens for s in d.sequences() for b in d.blocks(s, rank=self.rank)}
        return self.store.ledger(counts)


def per_rank_block_bytes(model: ModelConfig, cache: CacheConfig, parallel: ParallelConfig, *,
                         dtype: torch.dtype = torch.float32) -> tuple[int, int]:
    """(bytes of one block on one rank, fixed staging bytes per sequence) for this layout.

    Read off a real :class:`ShardStore` built with the rank's heads, not from a formula.
    """
    validate_layout(model, parallel, cache)
    lay = head_layout(model, parallel, 0)
    kf, vf = _formats(cache, dtype)
    st = ShardStore(n_layers=model.n_layers, heads=len(lay.kv_heads), head_dim=model.head_dim,
                    block_size=cache.block_size, key_format=kf, value_format=vf, dtype=dtype, capacity=1)
    return st.block_nbytes(), st.staging_nbytes()


def largest_context(model: ModelConfig, cache: CacheConfig, parallel: ParallelConfig, budget_bytes: float, *,
                    dtype: torch.dtype = torch.float32) -> int:
    """Longest single sequence whose KV fits ``budget_bytes`` on every rank, found by growing it.

    Each rank's pool gets ``(budget - staging) // block_bytes`` blocks; one sequence then grows a
    block at a time through the same :class:`BlockDirectory` placement the cache uses (spill
    included) until no rank has room.
    """
    block, staging = per_rank_block_bytes(model, cache, parallel, dtype=dtype)
    blocks = int((budget_bytes - staging) // block)
    if blocks < 1:
        return 0
    d = BlockDirectory(parallel.world_size, cache.block_size, blocks_per_rank=blocks,
                       placement="spread" if parallel.strategy == "sequence" else "everywhere")
    d.add_sequence(0)
    while d.append(0, cache.block_size) is not None:
        pass
    return d.num_tokens(0)
