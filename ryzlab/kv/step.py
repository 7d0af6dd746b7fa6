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
from functools import cached_property

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

    # derived once per step on first use, then shared by every layer (a frozen dataclass without
    # slots: cached_property writes the instance dict directly)
    @cached_property
    def is_decode(self) -> bool:
        """Every sequence writes exactly one token (the padded query layout is the token list itself)."""
        return all(w == 1 for w in self.query_lens)

    @cached_property
    def causal_mask(self) -> torch.Tensor:
        """``[B, Tq, S]`` True where a padded query may see a gathered key (same for every layer)."""
        return self._kpos[:, None, :] <= self._q_pos[:, :, None]

    @cached_property
    def blocked(self) -> torch.Tensor:
        """``~causal_mask``: the keys each padded query must not see (built once per step)."""
        return ~self.causal_mask


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

_LONG0 = torch.zeros(0, dtype=torch.long)


def _padded(tables: Sequence[list[int]]) -> torch.Tensor:
    """Block tables ``[B, max len]`` (padded with 0): one tensor, so what follows is tensor ops."""
    width = max([len(t) for t in tables] + [1])
    return torch.tensor([list(t) + [0] * (width - len(t)) for t in tables], dtype=torch.long).view(len(tables), width)


def _ragged(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``counts [B]`` -> (row of each element ``[sum]``, its index within the row ``[sum]``)."""
    row = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    first = counts.cumsum(0) - counts
    return row, torch.arange(row.numel()) - first[row]


def gather_plan(lay: PageLayout, tables: Sequence[list[int]], tail_starts: Sequence[int], slots: Sequence[int],
                ends: Sequence[int], *, padded: torch.Tensor | None = None) -> GatherPlan:
    """What attention gathers for sequences attending to their first ``ends[b]`` tokens.

    ``tables[b]`` is sequence b's block table (global ids), ``tail_starts[b]`` its first position
    ever written by itself (earlier ones are prefix hits: never read from the tail), ``slots[b]``
    its row in the tail tensors. Returns ``tables [B, nb]`` (this rank's page slots per row, padded
    with slot 0), ``kpos [B or 1, nb * bs]`` (position of each gathered key; padding gets a position
    no query reaches), and the tail overlay ``(row b, gathered index, tail row)`` of the positions
    read in full precision (residual window, block not yet committed). With one cp rank every
    block is local and ``kpos`` is simply ``arange``.

    Tensor ops over all sequences at once (no Python loop per sequence); ``padded`` is
    ``tables`` as one padded tensor when the caller has it already.
    """
    bs, cp, me, tl = lay.block_size, lay.cp_size, lay.cp_rank, lay.tail_len
    dev = lay.device
    B = len(ends)
    full = _padded(tables) if padded is None else padded            # [B, W] global block ids
    n = torch.tensor(list(ends), dtype=torch.long)                     # [B]
    col = torch.arange(full.shape[1])
    own = col < (n + bs - 1).div(bs, rounding_mode="floor")[:, None]  # [B, W] blocks attended ...
    if cp > 1:
        own &= full % cp == me                                         # ... that this rank stores
    counts = own.sum(1)                                                # [B]
    nb = max(int(counts.max()) if B else 0, 1)
    # this rank's blocks of each row first, in table order (a stable sort keeps their order)
    order = torch.sort((~own).to(torch.int8), dim=1, stable=True).indices[:, :nb]   # [B, nb]
    keep = torch.arange(nb) < counts[:, None]                                        # [B, nb]
    out = torch.where(keep, full.gather(1, order) // cp, 0)
    if cp == 1:
        kpos = torch.arange(nb * bs).view(1, -1)
    else:
        big = 1 << 62  # beyond every query: padding is masked by causality alone
        kst = torch.where(keep, order * bs, big)
        kpos = (kst[:, :, None] + torch.arange(bs)).view(B, nb * bs)
    if tl and B:
        lo = torch.tensor([max(lay.written_end(e), t0) for e, t0 in zip(ends, tail_starts)], dtype=torch.long)
        width = (n - lo).clamp(min=0)
        assert int(width.max()) <= tl, f"tail window {int(width.max())} exceeds {tl} rows"
        ov_b, k = _ragged(width)
        p = lo[ov_b] + k                                               # positions read from the tail
        j = p // bs
        rank_of = own.cumsum(1) - 1                                    # block j's index among this rank's
        mine = own[ov_b, j]
        ov_b, p, j = ov_b[mine], p[mine], j[mine]
        ov_idx = rank_of[ov_b, j] * bs + p % bs
        ov_row = torch.tensor(list(slots), dtype=torch.long)[ov_b] * tl + p % tl
    else:
        ov_b = ov_idx = ov_row = _LONG0
    return out.to(dev), kpos.to(dev), ov_b.to(dev), ov_idx.to(dev), ov_row.to(dev)


def plan_step(lay: PageLayout, seq_ids: Sequence[SeqId], tables: Sequence[list[int]], tail_starts: Sequence[int],
              slots: Sequence[int], starts: Sequence[int], writes: Sequence[int]) -> Step:
    """The :class:`Step` writing tokens ``[starts[b], starts[b] + writes[b])`` of each sequence.

    Per sequence: its block table, first self-written position and tail row (as in
    :func:`gather_plan`). Built with tensor ops over the step's ``N`` tokens at once; only the
    sequences that fill a block in this step under token-spanning scales (one in ``block_size``
    decode steps) take a Python loop. A decode step on one rank without a tail (codec ``none``)
    is planned from Python lists instead (:func:`_plan_decode`: the same plan, tested).
    """
    bs, tl, dev, cp = lay.block_size, lay.tail_len, lay.device, lay.cp_size
    if not seq_ids:
        return Step(seq_ids=(), query_lens=(), context_lens=(), positions=_LONG0.to(dev), slot_mapping=_LONG0.to(dev),
                    _q_b=_LONG0.to(dev), _q_t=_LONG0.to(dev), _q_pos=torch.zeros(0, 1, dtype=torch.long, device=dev),
                    _tables=torch.zeros(0, 1, dtype=torch.long, device=dev),
                    _kpos=torch.zeros(1, bs, dtype=torch.long, device=dev),
                    _own_tok=None if cp == 1 else _LONG0.to(dev), _own_slots=_LONG0.to(dev),
                    _ov_b=_LONG0.to(dev), _ov_idx=_LONG0.to(dev), _ov_row=_LONG0.to(dev),
                    _commit_blocks=_LONG0.to(dev), _commit_src=torch.zeros(0, bs, dtype=torch.long, device=dev),
                    _tail_src=_LONG0.to(dev), _tail_dst=_LONG0.to(dev))
    if cp == 1 and not tl and lay.commit_unit == 1 and all(w == 1 for w in writes):
        return _plan_decode(bs, dev, seq_ids, tables, starts)
    return _plan_general(lay, seq_ids, tables, tail_starts, slots, starts, writes)


def _plan_general(lay: PageLayout, seq_ids: Sequence[SeqId], tables: Sequence[list[int]],
                  tail_starts: Sequence[int], slots: Sequence[int], starts: Sequence[int],
                  writes: Sequence[int]) -> Step:
    """:func:`plan_step` of any step (at least one sequence): tensor ops over its ``N`` tokens."""
    bs, tl, dev, cp, me = lay.block_size, lay.tail_len, lay.device, lay.cp_size, lay.cp_rank
    ends = [a + w for a, w in zip(starts, writes)]
    B, tq = len(seq_ids), max(writes, default=0)
    full = _padded(tables)                                             # [B, W]
    w_t = torch.tensor(list(writes), dtype=torch.long)                 # [B]
    a_t = torch.tensor(list(starts), dtype=torch.long)                 # [B]
    slot_t = torch.tensor(list(slots), dtype=torch.long)               # [B]
    q_b, q_t = _ragged(w_t)                                            # [N], [N]
    pos = a_t[q_b] + q_t                                               # [N] absolute positions
    blk = full[q_b, pos // bs]                                         # [N] global block of each token
    slot_map = blk * bs + pos % bs
    if cp == 1:
        own_tok, own_slots = None, slot_map
    else:
        mine = blk % cp == me
        own_tok = torch.nonzero(mine).flatten()
        own_slots = (blk[mine] // cp) * bs + pos[mine] % bs
    q_pos = torch.zeros(B, max(tq, 1), dtype=torch.long)
    q_pos[q_b, q_t] = pos
    if tl:
        # the last tl tokens of each sequence (those of this step) are copied into its tail ring
        into = pos >= (a_t + w_t - tl)[q_b]
        tail_src = torch.nonzero(into).flatten()
        tail_dst = slot_t[q_b[into]] * tl + pos[into] % tl
    else:
        tail_src = tail_dst = _LONG0
    commit_blocks, commit_src = [], []
    off = 0
    for b, (s, t0, slot, a, w, n) in enumerate(zip(seq_ids, tail_starts, slots, starts, writes, ends)):
        if lay.commit_unit > 1 and n // bs > a // bs:
            # blocks that become full in this step: their older tokens come from the tail
            i0, i1 = a // bs, n // bs
            assert i0 * bs >= t0, f"seq {s!r}: block {i0} would be re-quantised from a prefix hit"
            bp = torch.arange(i0 * bs, i1 * bs).view(-1, bs)
            src = torch.where(bp >= a, -1 - (off + bp - a), slot * tl + bp % tl)
            cb = full[b, i0:i1]
            keep = cb % cp == me
            commit_src.append(src[keep])
            commit_blocks.append(cb[keep] // cp)
        off += w
    gtables, kpos, ov_b, ov_idx, ov_row = gather_plan(lay, tables, tail_starts, slots, ends, padded=full)
    return Step(
        seq_ids=tuple(seq_ids), query_lens=tuple(writes), context_lens=tuple(ends),
        positions=pos.to(dev), slot_mapping=slot_map.to(dev),
        _q_b=q_b.to(dev), _q_t=q_t.to(dev), _q_pos=q_pos.to(dev),
        _tables=gtables, _kpos=kpos,
        _own_tok=None if own_tok is None else own_tok.to(dev), _own_slots=own_slots.to(dev),
        _ov_b=ov_b, _ov_idx=ov_idx, _ov_row=ov_row,
        _commit_blocks=(torch.cat(commit_blocks) if commit_blocks else _LONG0).to(dev),
        _commit_src=(torch.cat(commit_src) if commit_src else torch.zeros(0, bs, dtype=torch.long)).to(dev),
        _tail_src=tail_src.to(dev), _tail_dst=tail_dst.to(dev))


def _plan_decode(bs: int, dev: torch.device, seq_ids: Sequence[SeqId], tables: Sequence[list[int]],
                 starts: Sequence[int]) -> Step:
    """:func:`plan_step` of a decode step (one new token per sequence) on one rank without a tail:
    the same plan from Python lists, a handful of tensors made once (the general path's ~25
    small tensor ops cost ~0.4 ms a step on a CPU core, more than the lists at serving batch sizes)."""
    B = len(seq_ids)
    blocks = [a // bs + 1 for a in starts]                              # blocks each sequence attends to
    nb = max(blocks)
    slots = [t[a // bs] * bs + a % bs for t, a in zip(tables, starts)]
    rows = [t[:n] + [0] * (nb - n) for t, n in zip(tables, blocks)]
    pos = torch.tensor(list(starts), dtype=torch.long, device=dev)
    slot_map = torch.tensor(slots, dtype=torch.long, device=dev)
    empty = _LONG0.to(dev)
    return Step(
        seq_ids=tuple(seq_ids), query_lens=(1,) * B, context_lens=tuple(a + 1 for a in starts),
        positions=pos, slot_mapping=slot_map,
        _q_b=torch.arange(B, device=dev), _q_t=torch.zeros(B, dtype=torch.long, device=dev), _q_pos=pos.view(B, 1),
        _tables=torch.tensor(rows, dtype=torch.long, device=dev).view(B, nb),
        _kpos=torch.arange(nb * bs, device=dev).view(1, -1),
        _own_tok=None, _own_slots=slot_map,
        _ov_b=empty, _ov_idx=empty, _ov_row=empty,
        _commit_blocks=empty, _commit_src=torch.zeros(0, bs, dtype=torch.long, device=dev),
        _tail_src=empty, _tail_dst=empty)
