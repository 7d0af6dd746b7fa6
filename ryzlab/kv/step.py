"""One forward step of the paged cache, planned once: which slots the new tokens fill, what
attention gathers, which blocks commit and which rows enter the tail.

The plan joins the two halves of the cache: the block tables come from the bookkeeping
(:class:`ryzlab.kv.manager.KVCacheManager`), the page layout (block size, commit unit, tail rows,
which cp rank holds which block) from the per-rank store (:class:`ryzlab.kv.store.PageStore`).
Everything here is an index tensor computed once per step, so that the per-layer ``write`` and
``attend`` run no Python loop per sequence.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ryzlab.kv.blocks import SeqId

__all__ = ["Step", "PageLayout", "plan_step", "gather_plan"]


@dataclass(frozen=True, eq=False)
class Step:
    """Plan of one forward step, made by :meth:`ryzlab.kv.cache.PagedKVCache.extend`; valid until the next one.

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


@dataclass(frozen=True)
class PageLayout:
    """How one rank's pages and tail are laid out: what a plan needs from the store."""

    block_size: int
    commit_unit: int
    """Tokens quantised together: a block with token-spanning scales, else 1."""
    residual: int
    """Most recent tokens read from the full-precision tail instead of the pages."""
    tail_len: int
    """Tail rows per sequence."""
    cp_rank: int
    cp_size: int
    device: torch.device

    def written_end(self, n: int) -> int:
        """Positions < this are read from the pages, the rest of ``[0, n)`` from the tail."""
        return min(max(n - self.residual, 0), (n // self.commit_unit) * self.commit_unit)


GatherPlan = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def gather_plan(lay: PageLayout, tables: Sequence[list[int]], tail_starts: Sequence[int], slots: Sequence[int],
                ends: Sequence[int]) -> GatherPlan:
    """What attention gathers for sequences attending to their first ``ends[b]`` tokens.

    ``tables[b]`` is sequence b's block table (global ids), ``tail_starts[b]`` its first position
    ever written by itself (earlier ones are prefix hits: never read from the tail), ``slots[b]``
    its row in the tail tensors. Returns ``tables [B, nb]`` (this rank's page slots per row, padded
    with slot 0), ``kpos [B or 1, nb * bs]`` (position of each gathered key; padding gets a position
    no query reaches), and the tail overlay ``(row b, gathered index, tail row)`` of the positions
    read in full precision (residual window, block not yet committed). With one cp rank every
    block is local and ``kpos`` is simply ``arange``.
    """
    bs, cp, me, tl = lay.block_size, lay.cp_size, lay.cp_rank, lay.tail_len
    rows, starts, ov_b, ov_idx, ov_row = [], [], [], [], []
    for b, (full, t0, slot, n) in enumerate(zip(tables, tail_starts, slots, ends)):
        table = full[:-(-n // bs)]
        own = list(range(len(table))) if cp == 1 else [j for j, blk in enumerate(table) if blk % cp == me]
        rows.append([table[j] // cp for j in own])
        starts.append([j * bs for j in own])
        if tl:
            lo = max(lay.written_end(n), t0)
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
            ov_row.append(slot * tl + p % tl)
    dev = lay.device
    nb = max([len(r) for r in rows] + [1])
    out = torch.tensor([r + [0] * (nb - len(r)) for r in rows], dtype=torch.long).view(len(rows), nb)
    if cp == 1:
        kpos = torch.arange(nb * bs).view(1, -1)
    else:
        big = 1 << 62  # beyond every query: padding is masked by causality alone
        kst = torch.tensor([x + [big] * (nb - len(x)) for x in starts], dtype=torch.long).view(len(rows), nb)
        kpos = (kst[:, :, None] + torch.arange(bs)).view(len(rows), nb * bs)
    cat = lambda xs: torch.cat(xs).to(dev) if xs else torch.zeros(0, dtype=torch.long, device=dev)  # noqa: E731
    return out.to(dev), kpos.to(dev), cat(ov_b), cat(ov_idx), cat(ov_row)


def plan_step(lay: PageLayout, seq_ids: Sequence[SeqId], tables: Sequence[list[int]], tail_starts: Sequence[int],
              slots: Sequence[int], starts: Sequence[int], writes: Sequence[int]) -> Step:
    """The :class:`Step` writing tokens ``[starts[b], starts[b] + writes[b])`` of each sequence.

    Per sequence: its block table, first self-written position and tail row (as in
    :func:`gather_plan`).
    """
    bs, tl, dev, cp, me = lay.block_size, lay.tail_len, lay.device, lay.cp_size, lay.cp_rank
    ends = [a + w for a, w in zip(starts, writes)]
    B, tq = len(seq_ids), max(writes, default=0)
    positions, slot_map, q_t, own_tok, own_slots = [], [], [], [], []
    commit_blocks, commit_src, tail_src, tail_dst = [], [], [], []
    off = 0
    for s, full, t0, slot, a, w, n in zip(seq_ids, tables, tail_starts, slots, starts, writes, ends):
        table = torch.tensor(full, dtype=torch.long)
        p = torch.arange(a, n)
        positions.append(p)
        blk = table[p // bs]
        slot_map.append(blk * bs + p % bs)
        mine = blk % cp == me
        own_tok.append(off + torch.nonzero(mine).flatten())
        own_slots.append((blk[mine] // cp) * bs + p[mine] % bs)
        q_t.append(torch.arange(w))
        if lay.commit_unit > 1 and n // bs > a // bs:
            # blocks that become full in this step: their older tokens come from the tail
            i0, i1 = a // bs, n // bs
            assert i0 * bs >= t0, f"seq {s!r}: block {i0} would be re-quantised from a prefix hit"
            bp = torch.arange(i0 * bs, i1 * bs).view(-1, bs)
            src = torch.where(bp >= a, -1 - (off + bp - a), slot * tl + bp % tl)
            cb = table[i0:i1]
            keep = cb % cp == me
            commit_src.append(src[keep])
            commit_blocks.append(cb[keep] // cp)
        if tl:
            tp = torch.arange(max(a, n - tl), n)
            tail_src.append(off + tp - a)
            tail_dst.append(slot * tl + tp % tl)
        off += w
    long0 = torch.zeros(0, dtype=torch.long)
    cat = lambda xs: torch.cat(xs) if xs else long0  # noqa: E731
    pos = cat(positions)
    q_b = torch.repeat_interleave(torch.arange(B), torch.tensor(writes, dtype=torch.long)) if B else long0
    q_t_ = cat(q_t)
    q_pos = torch.zeros(B, max(tq, 1), dtype=torch.long)
    q_pos[q_b, q_t_] = pos
    if B:
        gtables, kpos, ov_b, ov_idx, ov_row = gather_plan(lay, tables, tail_starts, slots, ends)
    else:
        gtables = torch.zeros(0, 1, dtype=torch.long, device=dev)
        kpos = torch.zeros(1, bs, dtype=torch.long, device=dev)
        ov_b = ov_idx = ov_row = long0.to(dev)
    return Step(
        seq_ids=tuple(seq_ids), query_lens=tuple(writes), context_lens=tuple(ends),
        positions=pos.to(dev), slot_mapping=cat(slot_map).to(dev),
        _q_b=q_b.to(dev), _q_t=q_t_.to(dev), _q_pos=q_pos.to(dev),
        _tables=gtables, _kpos=kpos,
        _own_tok=None if cp == 1 else cat(own_tok).to(dev), _own_slots=cat(own_slots).to(dev),
        _ov_b=ov_b, _ov_idx=ov_idx, _ov_row=ov_row,
        _commit_blocks=cat(commit_blocks).to(dev),
        _commit_src=(torch.cat(commit_src) if commit_src else torch.zeros(0, bs, dtype=torch.long)).to(dev),
        _tail_src=cat(tail_src).to(dev), _tail_dst=cat(tail_dst).to(dev))
