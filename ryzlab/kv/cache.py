"""Paged, optionally compressed KV cache with attention over the pages (pure torch, CPU/CUDA).

The model-facing flow: one :meth:`PagedKVCache.extend` per forward step plans the step
(positions, slot mapping, what to quantise), then per layer ``write`` + ``attend``::

    cache = PagedKVCache(ModelConfig(), CacheConfig(codec="int8", block_size=16))
    cached = cache.add_sequence("a", prompt_ids)   # prefix tokens already cached: skip them
    step = cache.extend(["a"])                      # this step writes prompt_ids[cached:]
    h = embed(prompt_ids[cached:])                  # [N, dim]; step.positions [N] for RoPE
    for layer in range(model.n_layers):
        q, k, v = qkv(layer, h, step.positions)     # [N, Hq, D], [N, Hkv, D], [N, Hkv, D]
        cache.write(layer, k, v)                    # stores (quantises) the new tokens
        h = block_rest(layer, cache.attend(layer, q))   # [N, Hq, D], causal over the pages
    step = cache.extend(["a"], [[next_id]])         # decode: append one token, same loop
    cache.free("a")

A batch is ragged and flat (vLLM style): the ``N`` new tokens of every sequence in
``step.seq_ids`` order. A ``[B, T, H, D]`` tensor is accepted when every sequence writes T.

Storage and precision. Per layer, K and V pages hold ``[num_blocks, block_size, H, Dp]``
payload plus scales (see :mod:`ryzlab.kv.codecs`). Attention always reads what the cache
stores (prefill included), so paged attention equals dense attention on the decoded K/V.
Token-local scales (``token_head``, ``group``) are written as tokens arrive. Token-spanning
scales (``tensor``, ``head``, ``channel``) are computed over one *full block* when it fills
(KIVI-style): until then that block's tokens live only in a per-sequence full-precision
*tail*. The tail also holds the ``residual`` most recent tokens (read in full precision
instead of the quantised copy), so it has ``max(residual, block_size - 1)`` rows (or
``residual`` rows with token-local scales). Codec ``none`` has no tail. The ledger counts
the tail as ``residual`` bytes: the staging cost of token-spanning scales is not hidden.

Contract. ``extend`` commits the bookkeeping at once (``num_written`` advances, full blocks
enter the prefix cache), so the caller must ``write`` every layer of a step before planning
the next one; a sequence whose prompt hits cached blocks reads their quantised copy (it never
wrote them, so they are not in its tail). Shortage (bounded ``num_blocks``) returns None from
``add_sequence`` / ``extend`` with nothing changed; misuse raises ``ValueError``.

Mixed precision and rotation. ``CacheConfig.layer_codecs`` gives each layer its own codec
(the pages of layers sharing a format share one allocation: :class:`LayerPages`). With
``CacheConfig.rotation`` every K/V head vector is rotated (:mod:`ryzlab.kv.rotation`) before it
is stored — pages and tail alike; :meth:`attend` rotates the queries the same way and its output
back, so only this step's ``[N, Hq, D]`` queries are touched; :meth:`gather` and
:meth:`read_kv` return K/V in the model's basis unless asked for the rotated one.

Context parallelism: built with ``cp=`` (the :class:`ryzlab.parallel.comm.Comm` of the cp
group), the cache's :class:`BlockPool` is sharded (block ``b`` lives on cp rank ``b % cp``) and
replicated: every rank plans the same steps, stores only its own blocks (``num_blocks / cp``
pages), attends over them with log-sum-exp, and one all-gather of the packed partials
``[N, Hq, D + 1]`` per layer is merged exactly (:func:`ryzlab.kv.merge.merge_partials`) into
what one rank holding everything computes. The full-precision tail (residual window, open
block) is small and kept by every cp rank; each reads only the positions of its own blocks.
Migration, rebalancing and cross-rank coherency checks: :mod:`ryzlab.kv.context`.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F

from ryzlab.config import CacheConfig, ModelConfig
from ryzlab.kv import triton as kv_triton
from ryzlab.kv.blocks import BlockPool, SeqId
from ryzlab.kv.codecs import KVFormat
from ryzlab.kv.ledger import codec_bytes_per_token, paged_ledger
from ryzlab.kv.merge import merge_partials, pack_partial, unpack_partials
from ryzlab.kv.pages import MATH_SCORES, LayerPages, attention_with_lse
from ryzlab.kv.rotation import HeadRotation
from ryzlab.models.transformer import apply_rope, rope_cos_sin, rope_inv_freq
from ryzlab.parallel.comm import Comm

__all__ = ["PagedKVCache", "Step"]

log = logging.getLogger(__name__)

Kernel = Literal["auto", "torch", "triton"]
KERNELS: tuple[str, ...] = get_args(Kernel)
_INITIAL_BLOCKS = 16  # unbounded caches start here and double: amortised O(1) growth
_INITIAL_SLOTS = 4


@dataclass(frozen=True, eq=False)
class Step:
    """Plan of one forward step, made by :meth:`PagedKVCache.extend`; valid until the next one.

    Public fields are what a model or engine needs; ``_``-fields are index tensors the cache
    precomputes once per step so that ``write``/``attend`` run no Python loop per sequence.
    """

    seq_ids: tuple[SeqId, ...]
    query_lens: tuple[int, ...]
    """New tokens written per sequence in this step."""
    context_lens: tuple[int, ...]
    """Tokens each sequence attends to after this step (cached prefix + new)."""
    positions: torch.Tensor
    """``[N]`` absolute position of every new token (for RoPE)."""
    slot_mapping: torch.Tensor
    """``[N]`` slot ``block_id * block_size + offset`` of every new token (global block ids)."""
    _q_b: torch.Tensor            # [N] batch row of each new token
    _q_t: torch.Tensor            # [N] column in the padded [B, Tq] query layout
    _q_pos: torch.Tensor          # [B, Tq] position of each padded query (0 for padding)
    _tables: torch.Tensor         # [B, nb] this rank's page slots per row, padded with slot 0
    _kpos: torch.Tensor           # [B or 1, nb * bs] position of each gathered key (huge = padding)
    _own_tok: torch.Tensor | None  # new tokens whose block this rank stores (None = all)
    _own_slots: torch.Tensor      # [n_own] their page slots on this rank
    _ov_b: torch.Tensor           # tail overlay: batch row,
    _ov_idx: torch.Tensor         #   index in the gathered keys,
    _ov_row: torch.Tensor         #   row in the flattened tail
    _commit_blocks: torch.Tensor  # [nc] page slots that fill in this step (token-spanning scales)
    _commit_src: torch.Tensor     # [nc, bs] tail row (>= 0) or new token j (encoded -1 - j)
    _tail_src: torch.Tensor       # [nt] new-token index copied into the tail
    _tail_dst: torch.Tensor       # [nt] tail row it lands in

    @property
    def num_tokens(self) -> int:
        return int(self.positions.numel())


@dataclass
class _SeqState:
    slot: int
    """Row of this sequence's tail in the tail tensors."""
    num_written: int
    """Tokens whose KV is planned/written (the rest of the pool's tokens are pending)."""
    tail_start: int
    """First position that was ever written by this sequence (earlier ones are prefix hits:
    only their quantised copy exists, so they are never read from the tail)."""


class PagedKVCache:
    """Per-layer paged K/V storage owning a :class:`BlockPool`, with attention over the pages.

    ``dtype`` is the model's compute dtype (what ``none`` stores, what the tail holds and what
    attention returns); ``device`` holds every tensor. ``model`` is the shape this rank computes
    (under tensor parallelism: :func:`ryzlab.parallel.tp.local_config`, its own heads); ``cp``
    the context-parallel group (None: one rank holds every block). Raises ``ValueError`` if the
    cache layout does not fit the model (e.g. a group size that does not divide head_dim).

    ``kernel`` picks the attention path: ``torch`` decodes pages then runs matmuls/SDPA (the
    reference, and the CPU path); ``triton`` reads the compressed pages in
    :mod:`ryzlab.kv.triton` kernels (CUDA, or CPU under ``TRITON_INTERPRET=1`` for tests);
    ``auto`` is ``triton`` on CUDA when Triton is installed, else ``torch``. The attribute
    ``kernel`` says which one runs; experiments record it in every row.
    """

    def __init__(self, model: ModelConfig, cache: CacheConfig, *, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", cp: Comm | None = None, kernel: Kernel = "auto"):
        if kernel not in KERNELS:
            raise ValueError(f"kernel={kernel!r} is not valid; choose one of {', '.join(KERNELS)}")
        cache.check_head_dim(model.head_dim)
        cache.check_layers(model.n_layers)
        self.model, self.config = model, cache
        self.dtype, self.device = dtype, torch.device(device)
        self.n_layers, self.n_kv_heads, self.head_dim = model.n_layers, model.n_kv_heads, model.head_dim
        self.block_size = bs = cache.block_size
        self.key_formats = [KVFormat(cache.codec_of(i), cache.key_granularity, cache.group_size, cache.symmetric,
                                     dtype) for i in range(model.n_layers)]
        self.value_formats = [KVFormat(cache.codec_of(i), cache.value_granularity, cache.group_size,
                                       cache.symmetric, dtype) for i in range(model.n_layers)]
        self.key_format, self.value_format = self.key_formats[0], self.value_formats[0]  # layer 0's
        quantized = cache.any_quantized
        # One commit unit for K and V: a block if any layer needs block-wide scales, else a token.
        spans = any(f.spans_tokens for f in self.key_formats + self.value_formats)
        self.commit_unit = bs if spans else 1
        self.rotation = (HeadRotation(cache.rotation, model.head_dim, cache.rotation_seed, self.device)
                         if cache.rotation != "none" else None)
        # keys stored before RoPE: the model's RoPE frequencies (from its config) undo / redo it
        self._inv_freq = rope_inv_freq(model, self.device) if cache.pre_rope_keys else None
        self.residual = cache.residual if quantized else 0  # full precision == the stored copy
        self.tail_len = max(self.residual, self.commit_unit - 1) if quantized else 0
        self.cp = cp if cp is not None else Comm(local=True)
        self.cp_rank, self.cp_size = self.cp.rank, self.cp.world_size
        self.pool = BlockPool(cache.num_blocks, bs, cache.enable_prefix_caching, shards=self.cp_size)
        cap = -(-(cache.num_blocks or _INITIAL_BLOCKS) // self.cp_size)  # this rank's pages
        L, H, D = self.n_layers, self.n_kv_heads, self.head_dim
        self.k = LayerPages(self.key_formats, cap, bs, H, D, self.device)
        self.v = LayerPages(self.value_formats, cap, bs, H, D, self.device)
        tail_dtype = dtype if cache.residual_dtype == "model" else getattr(torch, cache.residual_dtype)
        self._tail_k = torch.zeros(L, _INITIAL_SLOTS, self.tail_len, H, D, dtype=tail_dtype, device=self.device)
        self._tail_v = torch.zeros_like(self._tail_k)
        self._free_slots = list(range(_INITIAL_SLOTS))
        self._seqs: dict[SeqId, _SeqState] = {}
        self._step: Step | None = None
        self.kernel = self._pick_kernel(kernel)
        self.k.kernel = self.v.kernel = self.kernel
        self._kernel_plan: tuple[Step, object] | None = None
        log.debug("PagedKVCache: %s, commit unit %d, tail %d rows", cache, self.commit_unit, self.tail_len)

    # ------------------------------------------------------------------ capacity
    def _ensure_capacity(self) -> None:
        need = -(-len(self.pool.blocks) // self.cp_size)
        if need > self.k.capacity:
            cap = max(need, 2 * self.k.capacity)
            self.k.grow(cap)
            self.v.grow(cap)

    def _take_slot(self) -> int:
        if not self._free_slots:
            n = self._tail_k.shape[1]
            self._tail_k = torch.cat([self._tail_k, torch.zeros_like(self._tail_k)], dim=1)
            self._tail_v = torch.cat([self._tail_v, torch.zeros_like(self._tail_v)], dim=1)
            self._free_slots = list(range(n, 2 * n))
        return self._free_slots.pop()

    def _state(self, seq_id: SeqId) -> _SeqState:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise ValueError(f"unknown sequence {seq_id!r}; live sequences: {list(self._seqs)[:20]}") from None

    # ------------------------------------------------------------------ sequences
    def add_sequence(self, seq_id: SeqId, token_ids: Sequence[int] | int) -> int | None:
        """Register a prompt (ids, or a count when ids are unknown: no prefix caching).

        Returns how many leading tokens are already cached (their KV is reused; the next
        :meth:`extend` writes only the rest), or None when the pool is short of blocks
        (nothing changed: preempt or evict, then retry).
        """
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id!r} already exists")
        if self.pool.allocate(seq_id, token_ids, cache=False) is None:
            return None
        self._ensure_capacity()
        cached = self.pool.num_cached_tokens(seq_id)
        self._seqs[seq_id] = _SeqState(self._take_slot(), cached, cached)
        return cached

    def allocate_slots(self, seq_id: SeqId, token_ids: Sequence[int]) -> list[int] | None:
        """The scheduler's one call (vLLM's ``allocate_slots``): room for ``token_ids`` or None.

        A new ``seq_id`` is registered with ``token_ids`` as its prompt (prefix-cache hits are
        reused: :meth:`num_cached_tokens` tells how many); a live one gets them appended. Returns
        the block ids this call added (possibly none), or None when the pool is short of blocks
        (nothing changed: preempt or wait). The next :meth:`extend` (with ``num_write``) writes
        their K/V. Under context parallelism every rank makes the same calls in the same order.
        """
        if seq_id not in self._seqs:
            before = 0
            if self.add_sequence(seq_id, token_ids) is None:
                return None
        else:
            before = len(self.pool.block_table(seq_id))
            if self.pool.bounded and self.pool.blocks_needed(seq_id, len(token_ids)) > self.pool.num_free_blocks:
                return None
            res = self.pool.append(seq_id, token_ids, cache=False)
            assert res is not None, "append failed after the capacity check passed"
            self._ensure_capacity()
            self._copy_blocks(res.copies)
        return self.pool.block_table(seq_id)[before:]

    def fork(self, parent: SeqId, child: SeqId) -> None:
        """``child`` shares every block of ``parent`` (copy-on-write on its first append)."""
        p = self._state(parent)
        self.pool.fork(parent, child)
        slot = self._take_slot()
        self._tail_k[:, slot] = self._tail_k[:, p.slot]
        self._tail_v[:, slot] = self._tail_v[:, p.slot]
        self._seqs[child] = _SeqState(slot, p.num_written, p.tail_start)

    def free(self, seq_id: SeqId) -> None:
        """Drop a sequence; its written full blocks stay in the prefix cache until reused."""
        st = self._state(seq_id)
        self.pool.free(seq_id)
        self._free_slots.append(st.slot)
        del self._seqs[seq_id]

    def seq_ids(self) -> list[SeqId]:
        return list(self._seqs)

    def __contains__(self, seq_id: SeqId) -> bool:
        return seq_id in self._seqs

    def num_tokens(self, seq_id: SeqId) -> int:
        """Tokens of a sequence, written or pending."""
        self._state(seq_id)
        return self.pool.num_tokens(seq_id)

    def num_written(self, seq_id: SeqId) -> int:
        """Tokens whose KV has been planned by :meth:`extend` (and written by ``write``)."""
        return self._state(seq_id).num_written

    def num_cached_tokens(self, seq_id: SeqId) -> int:
        self._state(seq_id)
        return self.pool.num_cached_tokens(seq_id)

    def block_table(self, seq_id: SeqId) -> list[int]:
        self._state(seq_id)
        return self.pool.block_table(seq_id)

    def extend(self, seq_ids: Sequence[SeqId], new_tokens: Sequence[Sequence[int] | int] | None = None, *,
               num_write: Sequence[int] | None = None) -> Step | None:
        """Append ``new_tokens`` (ids or counts) per sequence and plan the step that writes them.

        The step writes every pending token of each sequence (prompt tokens after
        :meth:`add_sequence`, plus the new ones), or at most ``num_write[i]`` of them (chunked
        prefill). Returns None if the pool cannot hold the new tokens: nothing changed.
        Copy-on-write copies are applied to the tensors here. The caller must then call
        :meth:`write` for every layer before the next ``extend``.
        """
        seq_ids = list(seq_ids)
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError(f"duplicate sequence ids in one step: {seq_ids}")
        states = [self._state(s) for s in seq_ids]
        toks: list[Sequence[int] | int] = list(new_tokens) if new_tokens is not None else [0] * len(seq_ids)
        if len(toks) != len(seq_ids):
            raise ValueError(f"{len(seq_ids)} sequences but {len(toks)} token lists")
        if num_write is not None and len(num_write) != len(seq_ids):
            raise ValueError(f"{len(seq_ids)} sequences but {len(num_write)} num_write values")
        counts = [t if isinstance(t, int) else len(t) for t in toks]
        if self.pool.bounded:
            # conservative for forks sharing a block: each counts its own copy-on-write
            need = sum(self.pool.blocks_needed(s, c) for s, c in zip(seq_ids, counts))
            if need > self.pool.num_free_blocks:
                return None
        copies: list[tuple[int, int]] = []
        for s, t in zip(seq_ids, toks):
            res = self.pool.append(s, t, cache=False)
            assert res is not None, f"append of {s!r} failed after the capacity check passed"
            copies += res.copies
        self._ensure_capacity()
        self._copy_blocks(copies)
        starts, writes = [], []
        for i, (s, st) in enumerate(zip(seq_ids, states)):
            pending = self.pool.num_tokens(s) - st.num_written
            w = pending if num_write is None else num_write[i]
            if not 0 <= w <= pending:
                raise ValueError(f"num_write[{i}]={w} for {s!r}, which has {pending} pending tokens")
            starts.append(st.num_written)
            writes.append(w)
        step = self._plan(seq_ids, starts, writes)
        for s, st, w in zip(seq_ids, states, writes):
            st.num_written += w
            self.pool.cache_blocks(s, st.num_written)
        self._step = step
        return step

    def _copy_blocks(self, copies: Sequence[tuple[int, int]]) -> None:
        """Copy block ``src``'s pages into ``dst`` for each pair (copy-on-write, migration).

        With cp > 1 a pair whose blocks live on two ranks is a point-to-point transfer; every
        rank walks the same list in the same order, so sends and receives pair up.
        """
        if not copies:
            return
        if self.cp_size == 1:
            src = torch.tensor([c[0] for c in copies], device=self.device)
            dst = torch.tensor([c[1] for c in copies], device=self.device)
            self.k.copy_blocks(src, dst)
            self.v.copy_blocks(src, dst)
            return
        cp, me = self.cp_size, self.cp_rank
        for a, b in copies:
            so, do = a % cp, b % cp
            if so == do == me:
                idx = (torch.tensor([a // cp], device=self.device), torch.tensor([b // cp], device=self.device))
                self.k.copy_blocks(*idx)
                self.v.copy_blocks(*idx)
            elif so == me:
                for t in self.k.block_tensors(a // cp) + self.v.block_tensors(a // cp):
                    self.cp.send(t, do)
            elif do == me:
                for pages in (self.k, self.v):
                    bufs = [torch.empty_like(t) for t in pages.block_tensors(b // cp)]
                    for t in bufs:
                        self.cp.recv(t, so)
                    pages.load_block(b // cp, bufs)

    # ------------------------------------------------------------------ planning
    def _written_end(self, n: int) -> int:
        """Positions < this are read from the pages, the rest of ``[0, n)`` from the tail."""
        return min(max(n - self.residual, 0), (n // self.commit_unit) * self.commit_unit)

    def _gather_plan(self, seq_ids: list[SeqId], states: list[_SeqState], ends: list[int]
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """What attention gathers for sequences attending to their first ``ends[b]`` tokens.

        Returns ``tables [B, nb]`` (this rank's page slots per row, padded with slot 0),
        ``kpos [B or 1, nb * bs]`` (position of each gathered key; padding gets a position no
        query reaches), and the tail overlay ``(row b, gathered index, tail row)`` of the
        positions read in full precision (residual window, block not yet committed). With one
        cp rank every block is local and ``kpos`` is simply ``arange``.
        """
        bs, cp, me, tl = self.block_size, self.cp_size, self.cp_rank, self.tail_len
        rows, starts, ov_b, ov_idx, ov_row = [], [], [], [], []
        for b, (s, st, n) in enumerate(zip(seq_ids, states, ends)):
            table = self.pool.block_table(s)[:-(-n // bs)]
            own = list(range(len(table))) if cp == 1 else [j for j, blk in enumerate(table) if blk % cp == me]
            rows.append([table[j] // cp for j in own])
            starts.append([j * bs for j in own])
            if tl:
                lo = max(self._written_end(n), st.tail_start)
                assert n - lo <= tl, f"tail window {n - lo} exceeds {tl} rows"
                p = torch.arange(lo, n)
                if cp == 1:
                    idx = p
                else:  # keep the tail positions whose block is ours; index = our block's rank * bs
                    where = {j: i for i, j in enumerate(own)}
                    keep = torch.tensor([int(x) // bs in where for x in p], dtype=torch.bool)
                    p = p[keep]
                    idx = torch.tensor([where[int(x) // bs] * bs + int(x) % bs for x in p], dtype=torch.long)
                ov_b.append(torch.full_like(p, b))
                ov_idx.append(idx)
                ov_row.append(st.slot * tl + p % tl)
        dev = self.device
        nb = max([len(r) for r in rows] + [1])
        tables = torch.tensor([r + [0] * (nb - len(r)) for r in rows], dtype=torch.long).view(len(rows), nb)
        if cp == 1:
            kpos = torch.arange(nb * bs).view(1, -1)
        else:
            big = 1 << 62  # beyond every query: padding is masked by causality alone
            kst = torch.tensor([x + [big] * (nb - len(x)) for x in starts], dtype=torch.long).view(len(rows), nb)
            kpos = (kst[:, :, None] + torch.arange(bs)).view(len(rows), nb * bs)
        cat = lambda xs: torch.cat(xs).to(dev) if xs else torch.zeros(0, dtype=torch.long, device=dev)
        return tables.to(dev), kpos.to(dev), cat(ov_b), cat(ov_idx), cat(ov_row)

    def _plan(self, seq_ids: list[SeqId], starts: list[int], writes: list[int]) -> Step:
        bs, tl, dev, cp, me = self.block_size, self.tail_len, self.device, self.cp_size, self.cp_rank
        states = [self._seqs[s] for s in seq_ids]
        ends = [a + w for a, w in zip(starts, writes)]
        B, tq = len(seq_ids), max(writes, default=0)
        positions, slots, q_t, own_tok, own_slots = [], [], [], [], []
        commit_blocks, commit_src, tail_src, tail_dst = [], [], [], []
        off = 0
        for st, s, a, w, n in zip(states, seq_ids, starts, writes, ends):
            table = torch.tensor(self.pool.block_table(s), dtype=torch.long)
            p = torch.arange(a, n)
            positions.append(p)
            blk = table[p // bs]
            slots.append(blk * bs + p % bs)
            mine = blk % cp == me
            own_tok.append(off + torch.nonzero(mine).flatten())
            own_slots.append((blk[mine] // cp) * bs + p[mine] % bs)
            q_t.append(torch.arange(w))
            if self.commit_unit > 1 and n // bs > a // bs:
                # blocks that become full in this step: their older tokens come from the tail
                i0, i1 = a // bs, n // bs
                assert i0 * bs >= st.tail_start, f"seq {s!r}: block {i0} would be re-quantised from a prefix hit"
                bp = torch.arange(i0 * bs, i1 * bs).view(-1, bs)
                src = torch.where(bp >= a, -1 - (off + bp - a), st.slot * tl + bp % tl)
                cb = table[i0:i1]
                keep = cb % cp == me
                commit_src.append(src[keep])
                commit_blocks.append(cb[keep] // cp)
            if tl:
                tp = torch.arange(max(a, n - tl), n)
                tail_src.append(off + tp - a)
                tail_dst.append(st.slot * tl + tp % tl)
            off += w
        long0 = torch.zeros(0, dtype=torch.long)
        cat = lambda xs: torch.cat(xs) if xs else long0
        pos = cat(positions)
        q_b = torch.repeat_interleave(torch.arange(B), torch.tensor(writes, dtype=torch.long)) if B else long0
        q_t_ = cat(q_t)
        q_pos = torch.zeros(B, max(tq, 1), dtype=torch.long)
        q_pos[q_b, q_t_] = pos
        if B:
            tables, kpos, ov_b, ov_idx, ov_row = self._gather_plan(seq_ids, states, ends)
        else:
            tables, kpos = torch.zeros(0, 1, dtype=torch.long, device=dev), torch.zeros(1, bs, dtype=torch.long, device=dev)
            ov_b = ov_idx = ov_row = long0.to(dev)
        return Step(
            seq_ids=tuple(seq_ids), query_lens=tuple(writes), context_lens=tuple(ends),
            positions=pos.to(dev), slot_mapping=cat(slots).to(dev),
            _q_b=q_b.to(dev), _q_t=q_t_.to(dev), _q_pos=q_pos.to(dev),
            _tables=tables, _kpos=kpos,
            _own_tok=None if cp == 1 else cat(own_tok).to(dev), _own_slots=cat(own_slots).to(dev),
            _ov_b=ov_b, _ov_idx=ov_idx, _ov_row=ov_row,
            _commit_blocks=cat(commit_blocks).to(dev),
            _commit_src=(torch.cat(commit_src) if commit_src else torch.zeros(0, bs, dtype=torch.long)).to(dev),
            _tail_src=cat(tail_src).to(dev), _tail_dst=cat(tail_dst).to(dev))

    # ------------------------------------------------------------------ per layer
    def _flat(self, x: torch.Tensor, step: Step, name: str, heads: int) -> tuple[torch.Tensor, bool]:
        """Accept ``[N, H, D]`` or ``[B, T, H, D]`` (every sequence writing T tokens)."""
        if x.dim() == 4:
            if x.shape[0] != len(step.seq_ids) or any(t != x.shape[1] for t in step.query_lens):
                raise ValueError(f"{name} has shape {tuple(x.shape)} but the step writes {step.query_lens} "
                                 f"tokens for {len(step.seq_ids)} sequences; pass [N, H, D] for ragged batches")
            x = x.reshape(-1, *x.shape[2:])
            four_d = True
        else:
            four_d = False
        if x.dim() != 3 or x.shape[0] != step.num_tokens or x.shape[1] != heads or x.shape[2] != self.head_dim:
            raise ValueError(f"{name} has shape {tuple(x.shape)}; expected [{step.num_tokens}, {heads}, "
                             f"{self.head_dim}] (N new tokens, heads, head_dim)")
        return x, four_d

    def _current(self, step: Step | None) -> Step:
        step = step or self._step
        if step is None:
            raise ValueError("no step planned: call extend() before write()/attend()")
        return step

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, *, step: Step | None = None) -> None:
        """Store the step's new keys/values ``[N, Hkv, D]`` for ``layer`` (quantising them)."""
        step = self._current(step)
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"layer={layer} out of range [0, {self.n_layers})")
        k, _ = self._flat(k, step, "k", self.n_kv_heads)
        v, _ = self._flat(v, step, "v", self.n_kv_heads)
        k, v = k.to(self.dtype), v.to(self.dtype)
        if self._inv_freq is not None:  # RoPE undone: the key as the projection made it
            k = self._rope(k, step.positions, inverse=True)
        if self.rotation is not None:  # stored rotated, pages and tail alike
            k, v = self.rotation.apply(k), self.rotation.apply(v)
        for pages, tail, x in ((self.k, self._tail_k, k), (self.v, self._tail_v, v)):
            flat_tail = tail[layer].view(-1, self.n_kv_heads, self.head_dim)
            if self.commit_unit == 1:
                if step._own_slots.numel():
                    pages.write_slots(layer, step._own_slots, x if step._own_tok is None else x[step._own_tok])
            elif step._commit_blocks.numel():
                # read the old tail BEFORE this step's tokens overwrite its ring rows; new tokens
                # are indexed after the tail rows (counted now: slots may have grown since)
                rows = flat_tail.shape[0]
                idx = torch.where(step._commit_src < 0, rows - 1 - step._commit_src, step._commit_src)
                src = torch.cat([flat_tail.to(x.dtype), x])[idx]  # [nc, bs, H, D]
                pages.write_blocks(layer, step._commit_blocks, src)
            if step._tail_dst.numel():
                flat_tail[step._tail_dst] = x[step._tail_src].to(flat_tail.dtype)

    def _gather(self, layer: int, pages: LayerPages, tail: torch.Tensor, tables: torch.Tensor,
                ov: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = pages.gather(layer, tables, self.dtype)  # [B, H, S, D]
        if ov[0].numel():
            x[ov[0], :, ov[1]] = tail[layer].view(-1, self.n_kv_heads, self.head_dim)[ov[2]].to(x.dtype)
        return x

    def _gather_heads(self, layer: int, step: Step) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V ``[B, H, S, D]`` in the stored basis; pre-RoPE keys come back post-RoPE in the model's basis."""
        ov = (step._ov_b, step._ov_idx, step._ov_row)
        k = self._gather(layer, self.k, self._tail_k, step._tables, ov)
        if self._inv_freq is not None:
            k = self._keys_at(k, step._kpos)
        return k, self._gather(layer, self.v, self._tail_v, step._tables, ov)

    def _rope(self, x: torch.Tensor, positions: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """RoPE (or its inverse: the angle negated) of ``x [..., T, H, D]`` at ``positions [..., T]``."""
        assert self._inv_freq is not None
        cos, sin = rope_cos_sin(positions, self._inv_freq, torch.float32)
        return apply_rope(x.float(), cos, -sin if inverse else sin).to(x.dtype)

    def _keys_at(self, k: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
        """Stored pre-RoPE keys ``[B, H, S, D]`` -> the model's basis with RoPE at ``kpos [B or 1, S]``."""
        if self.rotation is not None:  # RoPE and the rotation do not commute: rotate back first
            k = self.rotation.invert(k)
        return self._rope(k.transpose(1, 2), kpos).transpose(1, 2).contiguous()

    def gather(self, layer: int, *, step: Step | None = None, heads_first: bool = False,
               rotated: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoded keys and values the step attends to, position-aligned, in ``dtype``.

        ``[B, S, Hkv, D]`` each, or contiguous ``[B, Hkv, S, D]`` with ``heads_first`` (what a
        Hugging Face attention layer wants back from its cache). ``S`` is the longest context
        rounded up to whole blocks; positions ``>= context_lens[b]`` are padding. One cp rank only
        (with cp > 1 no rank holds every position). With a rotation, K/V come back in the model's
        basis (one ``[D, D]`` product per cached vector) unless ``rotated=True``: then the caller
        rotates its queries with :meth:`rotate` and its output back with :meth:`unrotate`.
        """
        self._single_rank("gather")
        if rotated and self._inv_freq is not None:
            raise ValueError("pre_rope_keys: keys come back post-RoPE in the model's basis; use rotated=False")
        k, v = self._gather_heads(layer, self._current(step))
        if self.rotation is not None and not rotated:
            v = self.rotation.invert(v)
            k = k if self._inv_freq is not None else self.rotation.invert(k)
        return (k, v) if heads_first else (k.transpose(1, 2), v.transpose(1, 2))

    def attend(self, layer: int, q: torch.Tensor, *, step: Step | None = None,
               scale: float | None = None) -> torch.Tensor:
        """Causal attention of the step's queries ``[N, Hq, D]`` over the cache -> ``[N, Hq, D]``.

        Each query at position ``p`` sees keys ``0..p`` of its own sequence (cached prefix plus
        this step's tokens), GQA included. Uses ``scaled_dot_product_attention`` on the decoded
        pages (memory-efficient on CPU and CUDA). With cp > 1: attention over this rank's blocks
        with log-sum-exp, one all-gather of the packed partials ``[N, Hq, D + 1]``, exact merge.
        """
        step = self._current(step)
        q, four_d = self._flat(q, step, "q", self.model.n_heads)
        if not step.num_tokens:
            return q.new_zeros(q.shape)
        if self.rotation is not None:  # scores need q in the keys' basis; the output is rotated back
            qk = q if self._inv_freq is not None else self.rotation.apply(q)  # pre-RoPE keys: model basis
            return self.rotation.invert(self._attend(layer, qk, step, scale, four_d))
        return self._attend(layer, q, step, scale, four_d)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """Queries ``[..., D]`` into the basis of the stored keys (identity without a rotation)."""
        return x if self.rotation is None else self.rotation.apply(x)

    def unrotate(self, x: torch.Tensor) -> torch.Tensor:
        """Attention output ``[..., D]`` over stored values back to the model's basis."""
        return x if self.rotation is None else self.rotation.invert(x)

    def _attend(self, layer: int, q: torch.Tensor, step: Step, scale: float | None, four_d: bool) -> torch.Tensor:
        if self.kernel == "triton":
            out = self._attend_triton(layer, q, step, scale)
            return out.view(len(step.seq_ids), -1, *out.shape[1:]) if four_d else out
        k, v = self._gather_heads(layer, step)  # [B, H, S, D]
        qp, mask = self._pad_queries(q, step)
        b, tq, hq, d = qp.shape
        if self.cp_size > 1:
            out, lse = attention_with_lse(qp, k, v, mask, scale)             # this rank's keys only
            part = pack_partial(out[step._q_b, step._q_t], lse[step._q_b, step._q_t])  # [N, Hq, D + 1]
            out = merge_partials(*unpack_partials(self.cp.all_gather(part)))[0].to(q.dtype)  # [N, Hq, D]
            return out.view(len(step.seq_ids), -1, *out.shape[1:]) if four_d else out
        if b * hq * tq * k.shape[2] <= MATH_SCORES:
            # decode and short chunks: two batched matmuls beat SDPA's CPU kernel here
            out = attention_with_lse(qp, k, v, mask, scale)[0]
        else:
            out = F.scaled_dot_product_attention(qp.transpose(1, 2), k.to(q.dtype), v.to(q.dtype),
                                                 attn_mask=mask[:, None], scale=scale,
                                                 enable_gqa=True).transpose(1, 2)  # [B, Tq, Hq, D]
        out = out[step._q_b, step._q_t].to(q.dtype)
        return out.view(len(step.seq_ids), -1, *out.shape[1:]) if four_d else out

    # ------------------------------------------------------------------ Triton dispatch
    # Everything the Triton path needs from the cache lives here (kernels: ryzlab.kv.triton).
    def _pick_kernel(self, kernel: Kernel) -> str:
        why = kv_triton.unavailable_reason(self.device) or next(
            (r for f in (*self.key_formats, *self.value_formats) if (r := kv_triton.unreadable_reason(f))), None)
        if not why and self._inv_freq is not None:
            why = "keys stored before RoPE (pre_rope_keys) need RoPE applied on read, which the kernel does not do"
        if kernel == "triton" and why:
            raise ValueError(f"kernel='triton' cannot run here: {why}; choose 'torch' or 'auto'")
        if kernel == "auto":
            if self.device.type == "cuda" and why:
                log.warning("PagedKVCache on %s falls back to the torch attention path: %s", self.device, why)
            return "triton" if self.device.type == "cuda" and not why else "torch"
        return kernel

    def _attend_triton(self, layer: int, q: torch.Tensor, step: Step, scale: float | None) -> torch.Tensor:
        """:meth:`attend` in the Triton kernels: ``q [N, Hq, D]`` -> ``[N, Hq, D]`` (cp partials merged)."""
        from ryzlab.kv.triton.decode import paged_attention, plan_from_gather
        if self._kernel_plan is None or self._kernel_plan[0] is not step:  # once per step, not per layer
            plan = plan_from_gather(step._q_b, step.positions, step._tables, step._kpos, self.block_size,
                                    step._ov_b, step._ov_idx, step._ov_row)
            self._kernel_plan = (step, plan)
        tail = lambda t: t[layer].view(-1, self.n_kv_heads, self.head_dim)  # noqa: E731
        (kp, kl), (vp, vl) = self.k.where(layer), self.v.where(layer)  # a layer's pages and index in its group
        out, lse = paged_attention(q, kp, vp, kl, self._kernel_plan[1],
                                   tail(self._tail_k), tail(self._tail_v), scale=scale)  # [N, Hq, D], [N, Hq]
        if self.cp_size > 1:
            out = merge_partials(*unpack_partials(self.cp.all_gather(pack_partial(out, lse))))[0]
        return out.to(q.dtype)

    def _pad_queries(self, q: torch.Tensor, step: Step) -> tuple[torch.Tensor, torch.Tensor]:
        qp = q.new_zeros(len(step.seq_ids), step._q_pos.shape[1], *q.shape[1:])  # [B, Tq, Hq, D]
        qp[step._q_b, step._q_t] = q
        return qp, step._kpos[:, None, :] <= step._q_pos[:, :, None]  # [B, Tq, S] causal = in-context

    def _single_rank(self, what: str) -> None:
        if self.cp_size > 1:
            raise ValueError(f"{what} reads every position of a sequence, which no rank holds under context "
                             f"parallelism (cp={self.cp_size}); use attend()")

    # ------------------------------------------------------------------ inspection
    def read_kv(self, seq_id: SeqId, layer: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoded K and V of the written tokens, exactly as attention sees them.

        ``[n, Hkv, D]`` each for one layer, ``[L, n, Hkv, D]`` for ``layer=None``. For the
        accuracy harness (reconstruction error against the unquantised K/V). One cp rank only.
        """
        self._single_rank("read_kv")
        st = self._state(seq_id)
        n = st.num_written
        tables, kpos, *ov = self._gather_plan([seq_id], [st], [n])
        layers = range(self.n_layers) if layer is None else [layer]

        def keys(i: int) -> torch.Tensor:
            k = self._gather(i, self.k, self._tail_k, tables, ov)
            k = self._keys_at(k, kpos) if self._inv_freq is not None else self.unrotate(k)
            return k[0, :, :n].transpose(0, 1)

        ks = [keys(i) for i in layers]
        vs = [self.unrotate(self._gather(i, self.v, self._tail_v, tables, ov)[0, :, :n].transpose(0, 1))
              for i in layers]
        return (torch.stack(ks), torch.stack(vs)) if layer is None else (ks[0], vs[0])

    def stats(self) -> dict[str, float]:
        """The pool's stats plus the number of live sequences."""
        return {**self.pool.stats(), "num_seqs": float(len(self._seqs))}

    def bytes_per_token_codec(self) -> float:
        """Asymptotic bytes per token, all layers, K + V: payload + amortised scales only."""
        return codec_bytes_per_token(self.key_formats, self.value_formats, self.n_kv_heads, self.head_dim,
                                     self.block_size)

    def ledger(self) -> dict[str, float]:
        """Exact bytes this rank holds for the live sequences, by kind: :func:`ryzlab.kv.ledger.paged_ledger`."""
        return paged_ledger(self)
